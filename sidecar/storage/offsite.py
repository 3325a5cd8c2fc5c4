"""Which local backups are off-site, and copying the ones that are not.

A backup copied to the remote gets a small record on the volume, `.offsite/<id>.json` (the remote's URL, when, how
many bytes), written only once copy_backup has written the remote metadata object, i.e. once the remote backup is
complete. A good local backup without a record for the configured remote is pending. The records make the pending
count and the time of the last copy known without asking the store (so the metrics stay right while it is down and
after a restart); a lost record only means one more copy, which finds every object already there and writes nothing.

What was uploaded and what failed is counted on the volume too, in `.offsite/counters.json` (bytes and seconds of
uploads, failures, by operation), by whichever process did it: a backup runs as a child of the daemon and copies its
new backup itself, so counters in the daemon's memory would miss those. The daemon's metrics read the file at scrape
time. Each object actually written is counted once, when the store says it was written (an object found already
there counts nothing), so a copy interrupted and completed later counts each byte once."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.errors import SidecarError
from sidecar.repository import ID_PATTERN, Entry, Repository, iso_timestamp, write_atomically
from sidecar.storage.base import Chunks, Deleted, ObjectInfo, PutResult, StorageError, Store
from sidecar.storage.copy import CopyResult, Uploaded, copy_backup
from sidecar.storage.remote import RemoteConfig

log = logging.getLogger(__name__)

OFFSITE_DIR = ".offsite"
COUNTERS_NAME = "counters.json"  # {"upload_bytes": {operation: n}, "upload_seconds": {...}, "errors": {...}}
VERIFIED_NAME = "verified.json"  # the newest successful verify --remote: {"url", "endpoint", "id", "at"}
COUNTERS_LOCK = ".counters.lock"


def record_path(repo: Repository, backup_id: str) -> Path:
    return repo.dir / OFFSITE_DIR / (backup_id + ".json")


def read_record(repo: Repository, backup_id: str) -> dict[str, object] | None:
    try:
        record = json.loads(record_path(repo, backup_id).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_copied(repo: Repository, backup_id: str, remote: RemoteConfig) -> bool:
    record = read_record(repo, backup_id)
    return record is not None and same_remote(record, remote)


def copies(repo: Repository, remote: RemoteConfig) -> dict[str, float]:
    """{backup id: Unix time of its copy} for every completed copy to `remote` recorded on the volume, each record read
    once (a scrape of the metrics uses it for the pending count, the newest off-site backup and the last copy)."""
    found: dict[str, float] = {}
    try:
        paths = list((repo.dir / OFFSITE_DIR).glob("*.json"))
    except OSError:
        return found
    for path in paths:
        if not ID_PATTERN.fullmatch(backup_id := path.name.removesuffix(".json")):
            continue  # counters.json, verified.json: not copy records
        record = _read_json(path)
        if same_remote(record, remote):
            found[backup_id] = _iso_time(record.get("at"))
    return found


def pending(repo: Repository, remote: RemoteConfig, entries: list[Entry] | None = None, copied: dict[str, float] | None = None) -> list[Entry]:
    """Good local backups not yet copied to `remote`, oldest first (the order they are copied in)."""
    listed = repo.entries() if entries is None else entries
    done = copies(repo, remote) if copied is None else copied
    return sorted((e for e in listed if e.good and e.id not in done), key=lambda e: e.id)


def _iso_time(text: object) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def same_remote(record: dict[str, Any], remote: RemoteConfig) -> bool:
    return record.get("url") == remote.url and record.get("endpoint") == remote.endpoint


def last_copy_time(repo: Repository, remote: RemoteConfig, copied: dict[str, float] | None = None) -> float:
    """Unix time of the newest completed copy to `remote` recorded on the volume (0 if none)."""
    return max((copies(repo, remote) if copied is None else copied).values(), default=0.0)


def newest_copied(repo: Repository, remote: RemoteConfig, entries: list[Entry] | None = None,
                  copied: dict[str, float] | None = None) -> Entry | None:
    """The newest good local backup that is off-site in `remote` (None if none is): what a lost cluster restores."""
    listed = repo.entries() if entries is None else entries
    done = copies(repo, remote) if copied is None else copied
    return max((e for e in listed if e.good and e.id in done), key=lambda e: e.id, default=None)


# --- counters and facts on the volume, for the daemon's metrics ---------------------------------------------------

def _offsite_dir(repo: Repository) -> Path:
    path = repo.dir / OFFSITE_DIR
    repo.make_dir(path)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _update(repo: Repository, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and atomically rewrite one of our small JSON files, under a lock that every process on this volume
    takes (the daemon, its backup children, a `copy` run by hand). Metrics never stop a copy: a volume that cannot be
    written (full, read-only) is a warning."""
    try:
        directory = _offsite_dir(repo)
        fd = os.open(directory / COUNTERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, repo.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = _read_json(directory / name)
            change(data)
            write_atomically(directory / name, json.dumps(data, sort_keys=True).encode(), repo.file_mode)
        finally:
            os.close(fd)  # closing releases the lock
    except OSError as exc:
        log.warning("cannot record off-site %s on the backup volume (%s); the pg_backup_remote_* metrics miss it",
                    name.removesuffix(".json"), exc.strerror or exc)


def _add(data: dict[str, Any], family: str, operation: str, amount: float) -> None:
    values = data.setdefault(family, {})
    values[operation] = values.get(operation, 0) + amount


def count_upload(repo: Repository, operation: str, nbytes: int, seconds: float) -> None:
    """Bytes written to the remote store (objects that were not there before) and the time the writes took."""
    def change(data: dict[str, Any]) -> None:
        _add(data, "upload_bytes", operation, nbytes)
        _add(data, "upload_seconds", operation, seconds)
    _update(repo, COUNTERS_NAME, change)


def count_error(repo: Repository, operation: str) -> None:
    """One failed operation on the remote store (a copy that did not complete, after its retries)."""
    _update(repo, COUNTERS_NAME, lambda data: _add(data, "errors", operation, 1))


def counters(repo: Repository) -> dict[str, dict[str, float]]:
    """{"upload_bytes"|"upload_seconds"|"errors": {operation: total}} since the volume was new (never decreasing)."""
    data = _read_json(repo.dir / OFFSITE_DIR / COUNTERS_NAME)
    return {family: {str(op): float(v) for op, v in values.items() if isinstance(v, int | float)}
            for family, values in data.items() if isinstance(values, dict)}


def record_verified(repo: Repository, remote: RemoteConfig, backup_id: str, at: datetime) -> None:
    """A remote copy of `backup_id` in `remote` was read back whole and matched its metadata at `at` (verify --remote,
    a drill from the remote). Only the newest is kept; an older time never replaces a newer one."""
    moment = iso_timestamp(at)

    def change(data: dict[str, Any]) -> None:
        if same_remote(data, remote) and _iso_time(data.get("at")) >= at.timestamp():
            return
        data.clear()
        data.update(url=remote.url, endpoint=remote.endpoint, id=backup_id, at=moment)
    _update(repo, VERIFIED_NAME, change)


def last_verified_time(repo: Repository, remote: RemoteConfig) -> float:
    """Unix time of the newest verified remote copy in `remote` recorded on the volume (0 if none)."""
    data = _read_json(repo.dir / OFFSITE_DIR / VERIFIED_NAME)
    return _iso_time(data.get("at")) if same_remote(data, remote) else 0.0


class _Counted:
    """A store whose writes are counted on the volume as they complete (see count_upload)."""

    def __init__(self, store: Store, repo: Repository, operation: str) -> None:
        self.store, self.repo, self.operation = store, repo, operation
        self.bytes, self.seconds = 0, 0.0

    @property
    def description(self) -> str:
        return self.store.description

    def put_stream(self, name: str, data: Chunks, *, create_only: bool = True, sha256: str | None = None) -> PutResult:
        began = time.monotonic()
        put = self.store.put_stream(name, data, create_only=create_only, sha256=sha256)
        if not put.existed:
            seconds = time.monotonic() - began
            self.bytes, self.seconds = self.bytes + put.size, self.seconds + seconds
            count_upload(self.repo, self.operation, put.size, seconds)
        return put

    def open_read(self, name: str) -> Iterator[bytes]:
        return self.store.open_read(name)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self.store.list(prefix)

    def stat(self, name: str) -> ObjectInfo | None:
        return self.store.stat(name)

    def delete(self, name: str) -> Deleted:
        return self.store.delete(name)


def forget(repo: Repository, backup_id: str) -> None:
    """The local backup is gone (pruned): its record goes too."""
    record_path(repo, backup_id).unlink(missing_ok=True)


def copy_entry(repo: Repository, entry: Entry, store: Store, remote: RemoteConfig, uploaded: Mapping[str, Uploaded] | None = None) -> CopyResult:
    """Copy one good local backup (data objects first, metadata last), then record it as off-site. `uploaded`: the
    objects the backup uploaded while it was written (see copy_backup); they are counted here, once."""
    counted = _Counted(store, repo, "copy")
    began = time.monotonic()
    try:
        if entry.metadata is None:
            raise StorageError(f"cannot copy {entry.id}: {entry.problem or 'no readable metadata'}")
        result = copy_backup(repo.dir, entry.metadata, counted, uploaded)
    except (SidecarError, OSError):
        count_error(repo, "copy")
        raise
    if result.teed_bytes:  # written by the backup's tee, not through `counted`
        count_upload(repo, "copy", result.teed_bytes, result.teed_seconds)
    repo.make_dir(repo.dir / OFFSITE_DIR)
    # bytes: every object this copy wrote, the metadata object too (copy_backup's own count leaves it out)
    record = {"id": entry.id, "url": remote.url, "endpoint": remote.endpoint, "at": iso_timestamp(datetime.now(UTC)),
              "bytes": counted.bytes + result.teed_bytes, "seconds": round(time.monotonic() - began, 3),
              "upload_seconds": round(counted.seconds + result.teed_seconds, 3),
              "objects": len(result.uploaded) + len(result.present)}
    write_atomically(record_path(repo, entry.id), json.dumps(record).encode(), repo.file_mode)
    return result


@dataclass
class PendingReport:
    copied: list[CopyResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # backup id -> the error
    left: int = 0  # still pending afterwards

    @property
    def ok(self) -> bool:
        return not self.failed


def copy_pending(repo: Repository, store: Store, remote: RemoteConfig, ids: list[str] | None = None) -> PendingReport:
    """Copy the pending backups (or those of `ids`), oldest first. A store that cannot be used at all stops the round
    (the rest would fail the same way); a backup that fails alone is reported and the others still go."""
    report = PendingReport()
    entries = repo.entries()
    todo = pending(repo, remote, entries) if ids is None else [e for e in sorted(entries, key=lambda e: e.id) if e.id in ids]
    for entry in todo:
        try:
            report.copied.append(copy_entry(repo, entry, store, remote))
        except SidecarError as exc:  # StorageError, or ChecksumMismatch: the local file no longer matches its metadata
            report.failed[entry.id] = str(exc)
            log.error("off-site copy of %s to %s failed: %s; it stays pending and is retried", entry.id, store.description, exc,
                      extra={"event": "offsite_copy_failed", "backup_id": entry.id})
            if getattr(exc, "reason", None) is not None or getattr(exc, "transient", False):
                break
        except OSError as exc:  # the local file vanished or cannot be read (pruned while we copied)
            report.failed[entry.id] = f"cannot read it locally ({exc.strerror})"
    report.left = len(pending(repo, remote))
    return report
