"""The off-site copy of a backup set: data objects first, the metadata object last (a remote backup exists only
once its metadata does), idempotent, each upload checked against the sha256 recorded at backup time.

Objects are never rewritten. Later facts about a remote backup (a pin, a drill's result) are new small objects
beside it, `<id>.<kind>.<time>.json`; the newest of each kind wins (see add_fact and remote_entries)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sidecar.errors import ChecksumMismatch, NotFound
from sidecar.repository import ID_PATTERN, METADATA_SUFFIX, Entry, format_id, parse_id
from sidecar.storage.base import Deleted, ObjectInfo, ObjectMissing, StorageError, Store, sha256_of

log = logging.getLogger(__name__)

# fact kind in the object name -> the metadata field it sets: a pin, the last restore drill's result (as the local
# metadata's `verified`), and the last time every object was read back and matched its sha256 (verify --remote, or a
# drill from the remote that passed)
FACT_KINDS = {"pin": "keep", "verified": "verified", "checked": "checked"}


@dataclass
class CopyResult:
    id: str
    uploaded: list[str] = field(default_factory=list)   # objects written now
    present: list[str] = field(default_factory=list)    # objects already there with the same content
    bytes: int = 0
    teed_bytes: int = 0        # of `bytes`: objects the backup uploaded while it was written (see Uploaded), not sent again
    teed_seconds: float = 0.0

    @property
    def already_complete(self) -> bool:
        return not self.uploaded


@dataclass(frozen=True)
class Uploaded:
    """A data object the backup uploaded while it was written (the tee): the sha256 and size it sent, and how long
    the upload took. copy_backup accepts it after a stat, without reading it back or sending it again."""
    sha256: str
    size: int
    seconds: float = 0.0


def metadata_bytes(metadata: Mapping[str, Any]) -> bytes:
    return json.dumps(metadata, indent=2, sort_keys=True).encode() + b"\n"


def copy_backup(local_dir: Path, metadata: Mapping[str, Any], store: Store, uploaded: Mapping[str, Uploaded] | None = None) -> CopyResult:
    """Copy one committed local backup to `store`. Re-running after any interruption finishes the copy; an object
    already there with the same sha256 is kept, one with different content stops the copy (ObjectExists).

    `uploaded`: objects the backup itself uploaded while it was written (object name -> what it sent). One whose
    sha256 and size match the metadata and whose object is there with that size is accepted as it is: nothing is read
    back or sent again. Anything else is copied as usual."""
    backup_id = metadata["id"]
    parse_id(backup_id)
    result = CopyResult(backup_id)
    meta_name = backup_id + METADATA_SUFFIX
    if store.stat(meta_name) is not None:  # complete already (its metadata is written last)
        result.present.append(meta_name)
        return result
    for item in metadata["files"].values():
        name, expected, size = item["name"], item["checksum"], item["size"]
        teed = (uploaded or {}).get(name)
        if teed is not None and teed.sha256 == expected and teed.size == size:
            info = store.stat(name)
            if info is not None and info.size == size:
                result.uploaded.append(name)
                result.bytes += size
                result.teed_bytes += size
                result.teed_seconds += teed.seconds
                continue
            log.warning("%s was uploaded while %s was taken but %s; it is copied again", name, backup_id,
                        "is not in the store" if info is None else f"the store holds {info.size} bytes, not {size}")
        path = Path(local_dir) / name
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise StorageError(f"cannot copy {backup_id} to {store.description}: {path} is missing locally") from None
        except OSError as exc:
            raise StorageError(f"cannot copy {backup_id} to {store.description}: cannot read {path} ({exc.strerror})") from None
        with handle:
            put = store.put_stream(name, handle, sha256=expected)  # checked while streaming; aborted on mismatch
        if put.size != size:
            raise ChecksumMismatch(f"{store.description}: {name} is {put.size} bytes, the metadata says {size}; run 'verify {backup_id}'")
        (result.present if put.existed else result.uploaded).append(name)
        result.bytes += 0 if put.existed else put.size
    store.put_stream(meta_name, [metadata_bytes(metadata)])
    result.uploaded.append(meta_name)
    log.info("copied %s to %s (%d objects written, %d already there)", backup_id, store.description, len(result.uploaded), len(result.present))
    return result


def fact_name(backup_id: str, kind: str, at: datetime) -> str:
    if kind not in FACT_KINDS:
        raise ValueError(f"unknown fact kind {kind!r}")
    return f"{backup_id}.{kind}.{format_id(at).removeprefix('backup_')}.json"


def add_fact(store: Store, backup_id: str, kind: str, value: Any, at: datetime | None = None) -> str:
    """Record a later fact about a remote backup as a new object: kind 'pin' (value: bool), 'verified' (the
    drill's result dict) or 'checked' (every object read back and matched: {at, by}). Nothing is rewritten, so a bucket with Object Lock accepts it."""
    moment = at or datetime.now(UTC)
    name = fact_name(backup_id, kind, moment)
    store.put_stream(name, [json.dumps({"id": backup_id, "kind": kind, "at": moment.astimezone(UTC).isoformat(), "value": value}).encode()])
    return name


def last_checked(store: Store) -> datetime | None:
    """When a remote backup whose metadata object exists was last read back whole with every sha256 matching (its
    newest 'checked' fact), from the object names alone: one listing, no reads. None if never."""
    names = {info.name for info in store.list("backup_")}
    newest: datetime | None = None
    for name in names:
        parts = name.split(".")
        if len(parts) == 4 and parts[1] == "checked" and parts[3] == "json" and parts[0] + METADATA_SUFFIX in names:
            try:
                at = parse_id("backup_" + parts[2])
            except NotFound:  # not one of our names
                continue
            newest = at if newest is None or at > newest else newest
    return newest


def _load_json(store: Store, name: str) -> Any:
    data = b"".join(store.open_read(name))
    return json.loads(data)


def remote_entries(store: Store) -> list[Entry]:
    """Backups in `store` whose metadata object exists, newest first, with the local listing's statuses (ok,
    missing-file, size-mismatch, unreadable-metadata); the newest pin and verified facts are folded into the metadata.
    Data objects without metadata (a copy in progress or interrupted) are not listed."""
    objects: dict[str, ObjectInfo] = {info.name: info for info in store.list("backup_")}
    facts: dict[str, dict[str, str]] = {}
    for name in sorted(objects):  # time-stamped names: sorted means oldest first, so the newest wins
        parts = name.split(".")
        if len(parts) == 4 and parts[1] in FACT_KINDS and parts[3] == "json" and ID_PATTERN.fullmatch(parts[0]):
            facts.setdefault(parts[0], {})[parts[1]] = name
    entries = []
    for name in objects:
        if not name.endswith(METADATA_SUFFIX) or not ID_PATTERN.fullmatch(backup_id := name.removesuffix(METADATA_SUFFIX)):
            continue
        try:
            metadata = _load_json(store, name)
            files = metadata["files"].values()
            if metadata.get("id") != backup_id:
                entries.append(Entry(backup_id, None, "unreadable-metadata", f"{name} describes {metadata.get('id')!r}, not this backup"))
                continue
        except ObjectMissing:
            continue  # deleted while we listed
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            entries.append(Entry(backup_id, None, "unreadable-metadata", f"{name} cannot be read ({exc})"))
            continue
        for kind, fact in facts.get(backup_id, {}).items():
            try:
                metadata[FACT_KINDS[kind]] = _load_json(store, fact)["value"]
            except (ObjectMissing, ValueError, KeyError, TypeError):
                log.warning("remote fact %s cannot be read; ignored", fact)
        status, problem = "ok", ""
        for item in files:
            info = objects.get(item["name"])
            if info is None:
                status, problem = "missing-file", f"{item['name']} is missing"
                break
            if info.size != item["size"]:
                status, problem = "size-mismatch", f"{item['name']} is {info.size} bytes, metadata says {item['size']}"
                break
        entries.append(Entry(backup_id, metadata, status, problem))
    return sorted(entries, key=lambda e: e.id, reverse=True)


def find_remote(store: Store, ref: str) -> Entry:
    """A remote backup by id, or 'latest' (the same choice as on the volume: the newest good backup that has not
    failed its restore drill)."""
    from sidecar.repository import choose_latest

    entries = remote_entries(store)
    if ref == "latest":
        entry, note = choose_latest(entries, datetime.now(UTC))
        if entry is None:
            raise NotFound(f"no good backup in {store.description}; copy one with 'pg-backup-sidecar copy pending'")
        log.info("%s", note)
        return entry
    parse_id(ref)
    for entry in entries:
        if entry.id == ref:
            return entry
    raise NotFound(f"no backup {ref} in {store.description}; run 'pg-backup-sidecar list --remote' to see the ids")


def verify_remote(store: Store, metadata: Mapping[str, Any]) -> None:
    """Stream every file of a remote backup and compare its sha256 and size with the metadata; ChecksumMismatch
    naming the first file that differs (a flipped byte, a truncated object)."""
    for item in metadata["files"].values():
        try:
            digest, size = sha256_of(store.open_read(item["name"]))
        except ObjectMissing:
            raise ChecksumMismatch(f"{store.description}: {item['name']} of {metadata['id']} is missing") from None
        if digest != item["checksum"] or size != item["size"]:
            raise ChecksumMismatch(f"{store.description}: {item['name']} of {metadata['id']} does not match its metadata "
                                   f"(sha256 {digest}, {size} bytes; expected {item['checksum']}, {item['size']} bytes); "
                                   "the off-site copy is damaged: do not restore from it")


# --- retention on the remote ------------------------------------------------------------------------

LEFTOVER_AGE = timedelta(days=1)  # data objects without metadata younger than this may be a copy in progress
TOMBSTONE_SUFFIX = ".deleting.json"  # written before a delete begins: what remains of an interrupted delete is removed at once


@dataclass
class RemoteDeletion:
    id: str
    outcome: str                                               # deleted | kept-by-lock
    removed: list[str] = field(default_factory=list)           # objects deleted
    locked: list[str] = field(default_factory=list)            # objects the store refused to delete (Object Lock, retention)

    @property
    def note(self) -> str:
        if self.outcome == "kept-by-lock":
            return "kept by the bucket's lock or retention policy (its metadata could not be deleted); still listed, tried again by the next prune"
        if self.locked:
            return f"deleted; {len(self.locked)} of its objects are kept by the bucket's lock or retention policy, tried again by the next prune"
        return "deleted"


def delete_remote(store: Store, backup_id: str) -> RemoteDeletion:
    """Delete one remote backup: a small tombstone object (`<id>.deleting.json`) first, then its metadata object (from
    then on it is not listed, so an interrupted delete never leaves a half backup in the listing), then its data
    objects and facts, the tombstone last. A delete the store refuses (Object Lock, a retention or immutability
    policy) is not an error: a refused metadata object leaves the backup whole and listed; refused data objects stay
    as leftovers that a later prune removes once the lock allows it."""
    parse_id(backup_id)
    result = RemoteDeletion(backup_id, "deleted")
    meta_name, tombstone = backup_id + METADATA_SUFFIX, backup_id + TOMBSTONE_SUFFIX
    store.put_stream(tombstone, [b'{"deleting": true}\n'])  # create-only; the same content again is accepted
    if store.delete(meta_name) is Deleted.KEPT_BY_LOCK:
        result.outcome = "kept-by-lock"
        result.locked.append(meta_name)
        return result
    result.removed.append(meta_name)
    _delete_all(store, [info.name for info in store.list(backup_id + ".") if info.name != tombstone] + [tombstone], result)
    return result


def _delete_all(store: Store, names: list[str], result: RemoteDeletion) -> None:
    for name in names:
        (result.locked if store.delete(name) is Deleted.KEPT_BY_LOCK else result.removed).append(name)


def remote_leftovers(store: Store, now: datetime, in_progress: frozenset[str] | set[str] = frozenset()) -> dict[str, list[str]]:
    """{backup id: its objects} for the objects of a backup that has no metadata object: those of an interrupted delete
    (its tombstone is there), or those of a copy that never finished, once every one of them is older than
    LEFTOVER_AGE and the backup is not in `in_progress` (a local backup still waiting for its copy)."""
    groups: dict[str, list[ObjectInfo]] = {}
    for info in store.list("backup_"):
        stem = info.name.split(".", 1)[0]
        if ID_PATTERN.fullmatch(stem):
            groups.setdefault(stem, []).append(info)
    leftovers = {}
    for backup_id, infos in sorted(groups.items()):
        names = [i.name for i in infos]
        if backup_id + METADATA_SUFFIX in names:
            continue
        if backup_id + TOMBSTONE_SUFFIX in names:
            leftovers[backup_id] = [n for n in names if n != backup_id + TOMBSTONE_SUFFIX] + [backup_id + TOMBSTONE_SUFFIX]
        elif backup_id not in in_progress and all(i.modified <= now - LEFTOVER_AGE for i in infos):
            leftovers[backup_id] = names
    return leftovers
