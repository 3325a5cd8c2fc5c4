"""Off-site copies of the WAL archive and of base backups (BACKUP_REMOTE_URL), their retention on the remote, and a
point-in-time restore read from the bucket alone (a lost volume).

Object names are flat, apart from the logical backups' `backup_*` names (which the remote listing of dumps reads):
    wal_<system>_<segment>.zst[.age]        an archived WAL segment, the bytes stored on the volume
    wal_<system>_<segment>.json             its record (sha256 of the stored and of the raw bytes), written after it
    wal_<system>_<TLI>.history[...]         timeline history files, the same way
    base_<id>.tar.zst[.age]                 a base backup's stored file
    base_<id>.metadata.json                 its metadata, written last: a base backup is on the remote once it is there
Every object is written create-only: the same sha256 already there is fine, another one is an alarm (an error in the
log, counted in pg_backup_remote_errors_total{operation="wal-copy"}), never overwritten.

What is copied is remembered on the volume, so a restart of the daemon resumes where it stopped: per system
`wal/<system>/.offsite.json` (the newest segment copied per timeline, the history files, the conflicts) and
`base/.offsite.json` (the base backups copied), each for one remote (URL and endpoint)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import streams
from sidecar.config import Config
from sidecar.errors import ChecksumMismatch, NotFound, SidecarError
from sidecar.physical import tar
from sidecar.physical.base import BaseBackup, base_dir, chain_facts, chain_of, identities, list_base_backups
from sidecar.physical.hold import copying
from sidecar.physical.wal import HISTORY, SEGMENT, WalArchive, parse_lsn, parse_segment, segment_name, segment_of, segment_size_of
from sidecar.repository import METADATA_SUFFIX, Repository, write_atomically
from sidecar.retention import classify_base, wal_cutoffs, wal_to_delete
from sidecar.storage.base import ChunkReader, Deleted, ObjectExists, StorageError, Store
from sidecar.storage.copy import LEFTOVER_AGE
from sidecar.storage.offsite import count_error, count_upload

log = logging.getLogger(__name__)
STATE = ".offsite.json"
WAL_PREFIX = "wal_"
BASE_PREFIX = "base_"
OPERATION = "wal-copy"  # the operation label of the counters (pg_backup_remote_*{operation="wal-copy"})
RETRY = (15.0, 900.0)   # seconds: the first retry after a failed round, and the longest wait (doubling)
POLL = 2.0              # seconds between looks for newly archived WAL


def wal_object(system_id: str, file_name: str) -> str:
    return f"{WAL_PREFIX}{system_id}_{file_name}"


def base_object(file_name: str) -> str:
    return BASE_PREFIX + file_name


# --- what is copied, on the volume ----------------------------------------------------------------------------------

def _load_state(path: Path, store: Any, fresh: dict[str, Any]) -> dict[str, Any]:
    remote = getattr(store, "remote", None)
    url, endpoint = getattr(remote, "url", store.description), getattr(remote, "endpoint", None)
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and state.get("url") == url and state.get("endpoint") == endpoint:
            return state
    except (OSError, ValueError):
        pass
    return {"url": url, "endpoint": endpoint, **fresh}


def _save_state(path: Path, state: dict[str, Any], mode: int) -> None:
    write_atomically(path, json.dumps(state, sort_keys=True).encode(), mode)


@dataclass
class CopyReport:
    copied: list[str] = field(default_factory=list)      # objects written now
    present: int = 0                                     # objects already there with the same content
    conflicts: list[str] = field(default_factory=list)   # objects there with another content (alarms)
    error: str | None = None                             # the round stopped here; what is left is pending

    @property
    def ok(self) -> bool:
        return self.error is None


class _Copier:
    def __init__(self, config: Config, store: Store, report: CopyReport) -> None:
        self.config, self.store, self.report = config, store, report
        self.repo = Repository(config.backup_dir, group_readable=config.group_readable)

    def put(self, name: str, data: Any, sha256: str | None = None) -> bool:
        """Create-only; True when written or already there with the same content, False on a conflict (the alarm)."""
        began = time.monotonic()
        try:
            put = self.store.put_stream(name, data, sha256=sha256)
        except ObjectExists as exc:
            self.report.conflicts.append(name)
            count_error(self.repo, OPERATION)
            log.error("off-site copy: %s", exc, extra={"event": "offsite_conflict", "object": name})
            return False
        if put.existed:
            self.report.present += 1
        else:
            self.report.copied.append(name)
            count_upload(self.repo, OPERATION, put.size, time.monotonic() - began)
        return True


def copy_wal(config: Config, store: Store, report: CopyReport | None = None) -> CopyReport:
    """Copy every archived WAL file not copied yet (history files first, segments in order), each stored file before
    its record. A failure stops the round (the rest stays pending); a conflict is an alarm and the copy goes on."""
    report = report or CopyReport()
    copier = _Copier(config, store, report)
    archive = WalArchive(config.backup_dir)
    by_system: dict[str, list[Any]] = {}
    for line in archive.timelines():
        by_system.setdefault(line.system_id, []).append(line)
    history_systems = [p.parent.name for p in archive.root.glob("*/history")] if archive.root.is_dir() else []
    for system in sorted(set(by_system) | set(history_systems)):
        path = archive.root / system / STATE
        state = _load_state(path, store, {"copied": {}, "history": [], "conflicts": []})
        try:
            history = archive.root / system / "history"
            names = sorted(n.removesuffix(".json") for n in os.listdir(history) if HISTORY.fullmatch(n.removesuffix(".json"))) \
                if history.is_dir() else []
            for name in names:
                if name not in state["history"]:
                    if not _copy_file(copier, archive, system, name):
                        state["conflicts"].append(name)
                    state["history"].append(name)
                    _save_state(path, state, copier.repo.file_mode)
            for line in by_system.get(system, []):
                key = f"{line.timeline:08X}"
                for segno in line.segnos:
                    if segno <= state["copied"].get(key, -1):
                        continue
                    name = segment_name(line.timeline, segno, line.segment_size)
                    if not _copy_file(copier, archive, system, name):
                        state["conflicts"].append(name)
                    state["copied"][key] = segno
                    _save_state(path, state, copier.repo.file_mode)
        except (SidecarError, OSError) as exc:
            report.error = str(exc)
            if isinstance(exc, StorageError):
                count_error(copier.repo, OPERATION)
            return report
    return report


def _copy_file(copier: _Copier, archive: WalArchive, system: str, name: str) -> bool:
    record = archive.record(system, name)
    if record is None:
        raise NotFound(f"WAL file {name} has no record")
    directory = archive.directory(system, name)
    with open(directory / str(record["file"]), "rb") as handle:
        if not copier.put(wal_object(system, str(record["file"])), handle, sha256=str(record["sha256"])):
            return False
    return copier.put(wal_object(system, name + ".json"), [(directory / (name + ".json")).read_bytes()])


def copied_marks(config: Config) -> tuple[set[str], dict[tuple[str, int], int]]:
    """For the configured remote, from the volume's records: the ids of the base backups copied, and per (system,
    timeline) the number of the newest segment copied (every archived one up to it is off-site)."""
    remote = config.remote
    url, endpoint = (remote.url, remote.endpoint) if remote is not None else ("", None)

    def read(path: Path) -> dict[str, Any]:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) and state.get("url") == url and state.get("endpoint") == endpoint else {}

    copied = {str(i) for i in read(base_dir(config) / STATE).get("copied", [])}
    marks: dict[tuple[str, int], int] = {}
    root = WalArchive(config.backup_dir).root
    for path in root.glob(f"*/{STATE}") if root.is_dir() else []:
        state = read(path)
        for tli, segno in state.get("copied", {}).items():
            marks[(path.parent.name, int(tli, 16))] = int(segno)
        for name in state.get("conflicts", []):  # not off-site (another object holds its name): kept on the volume
            if SEGMENT.fullmatch(str(name)):
                key = (path.parent.name, int(name[:8], 16))
                below = parse_segment(str(name), segment_size_of(path.parent))[1] - 1
                if key in marks:
                    marks[key] = min(marks[key], below)
    return copied, marks


def copy_base(config: Config, store: Store, report: CopyReport | None = None, only: str | None = None) -> CopyReport:
    """Copy the base backups not copied yet (or `only` that one), oldest first: the stored file, then the metadata."""
    report = report or CopyReport()
    copier = _Copier(config, store, report)
    directory = base_dir(config)
    if not directory.is_dir():
        return report
    with copying(directory, wait=only is not None) as mine:  # the daemon's copier skips a round the command is copying in
        if mine:
            _copy_base(config, store, copier, report, directory, only)
    return report


def _copy_base(config: Config, store: Store, copier: _Copier, report: CopyReport, directory: Path, only: str | None) -> None:
    path = directory / STATE
    state = _load_state(path, store, {"copied": []})
    backups = list_base_backups(config)
    for backup in reversed(backups):
        if backup.id in state["copied"] or backup.status not in ("ok", "waiting-for-wal") or (only and backup.id != only):
            continue
        item = backup.metadata["files"]["base"]
        try:
            with open(directory / item["name"], "rb") as handle:
                written = copier.put(base_object(item["name"]), handle, sha256=item["checksum"])
            if written:
                written = copier.put(base_object(backup.id + METADATA_SUFFIX), [(directory / (backup.id + METADATA_SUFFIX)).read_bytes()])
        except (SidecarError, OSError) as exc:
            report.error = f"base backup {backup.id}: {exc}"
            if isinstance(exc, StorageError):
                count_error(copier.repo, OPERATION)
            return
        if written:
            log.info("base backup %s copied off-site to %s", backup.id, store.description, extra={"event": "offsite_copied", "backup_id": backup.id})
        listed = {b.id for b in backups}
        # a conflict (another object under its name) is an alarm, not a copy: the volume keeps it (retention holds it)
        state["copied"] = [i for i in state["copied"] if i in listed] + ([backup.id] if written else [])
        _save_state(path, state, copier.repo.file_mode)


def copy_loop(config: Config, stop: threading.Event) -> None:
    """The daemon's off-site copier of WAL and base backups (WAL_ARCHIVING=true with a remote): every POLL seconds, and
    after a failure again with a doubling wait (15 s to 15 min). What is pending survives a restart (see STATE)."""
    from sidecar import api

    wait = 0.0
    backoff = RETRY[0]
    failing = False
    seen: tuple[tuple[str, int], ...] | None = None
    while not stop.wait(wait):
        now_seen = _archive_signature(config)
        if not failing and now_seen == seen:  # nothing archived or taken since the last good round: no listing
            continue
        try:
            store = api.remote_store(config)
            report = copy_base(config, store)
            if report.ok:
                copy_wal(config, store, report)
        except Exception as exc:  # the store cannot even be set up; never let the copier die
            report = CopyReport(error=str(exc))
        if report.ok:
            if failing:
                log.info("off-site copies of WAL and base backups resumed", extra={"event": "offsite_resumed"})
            failing, wait, backoff, seen = False, POLL, RETRY[0], now_seen
            continue
        log.error("off-site copy of WAL or base backups failed: %s; pending, next try in %.0fs", report.error, backoff,
                  extra={"event": "offsite_copy_failed"})
        failing, wait, backoff = True, backoff, min(backoff * 2, RETRY[1])


def _archive_signature(config: Config) -> tuple[tuple[str, int], ...]:
    """The modification times of the directories a new WAL file or base backup lands in (a few stats, not a listing of
    every archived segment): unchanged, there is nothing new to copy."""
    root = WalArchive(config.backup_dir).root
    paths = [base_dir(config)] + ([p for system in root.iterdir() if system.is_dir() for p in system.iterdir() if p.is_dir()]
                                  if root.is_dir() else [])
    out = []
    recent = time.time_ns() - 2_000_000_000
    for path in paths:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            continue
        # two files landing within one tick of the clock share an mtime: a directory changed in the last 2 s is looked at
        # again on the next round, so the second file is never missed
        out.append((str(path), mtime if mtime < recent else -time.monotonic_ns()))
    return tuple(sorted(out))


# --- what the remote holds -------------------------------------------------------------------------------------------

def _load(store: Store, name: str) -> Any:
    return json.loads(b"".join(store.open_read(name)))


def remote_wal(store: Store, system_id: str) -> dict[str, int]:
    """{WAL file name: stored object size} of the files of `system_id` whose record is on the remote."""
    prefix = wal_object(system_id, "")
    objects = {info.name.removeprefix(prefix): info.size for info in store.list(prefix)}
    return {name.removesuffix(".json"): objects.get(name, 0) for name in objects if name.endswith(".json")}


def remote_base_backups(store: Store) -> list[BaseBackup]:
    """The base backups on the remote (their metadata object exists), newest first, with the volume's statuses:
    `waiting-for-wal` until every segment from its start to its end is on the remote too."""
    objects = {info.name: info.size for info in store.list(BASE_PREFIX)}
    wal: dict[str, dict[str, int]] = {}
    found = []
    for name in sorted(objects, reverse=True):
        if not name.endswith(METADATA_SUFFIX):
            continue
        backup_id = name.removeprefix(BASE_PREFIX).removesuffix(METADATA_SUFFIX)
        try:
            meta = _load(store, name)
            item = meta["files"]["base"]
            size = int(meta["walSegmentSize"])
            first, last = segment_of(parse_lsn(meta["startLsn"]), size), parse_segment(meta["endWal"], size)[1]
            system, timeline = str(meta["systemIdentifier"]), int(meta["timeline"])
        except (ValueError, KeyError, TypeError, StorageError) as exc:
            found.append(BaseBackup(backup_id, "unreadable-metadata", f"{name} cannot be read ({exc})", {}))
            continue
        if objects.get(base_object(item["name"])) != item["size"]:
            found.append(BaseBackup(backup_id, "missing-file", f"{base_object(item['name'])} is missing or of another size", meta))
            continue
        have = wal.setdefault(system, remote_wal(store, system))
        missing = next((segment_name(timeline, s, size) for s in range(first, last + 1) if segment_name(timeline, s, size) not in have), None)
        found.append(BaseBackup(backup_id, "waiting-for-wal" if missing else "ok", f"WAL segment {missing} is not on the remote" if missing else "", meta))
    return found


# --- retention on the remote: the same rule as on the volume -------------------------------------------------------------

@dataclass
class RemotePhysicalPrune:
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    wal_deleted: int = 0
    kept_by_lock: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # objects of an interrupted delete or copy, removed (or, dry run, to remove)
    error: str | None = None


def leftovers(store: Store, now: datetime, pending: set[str]) -> list[str]:
    """Stored files on the remote without their metadata/record object, every one older than LEFTOVER_AGE: a prune
    interrupted between the record and the file, or a copy that never finished (`pending`: base backup ids the volume
    still has to copy, never counted). Deleting one a copy still needs is harmless: the copy writes it again."""
    out = []
    infos = list(store.list(BASE_PREFIX)) + list(store.list(WAL_PREFIX))
    names = {info.name for info in infos}
    for info in infos:
        if info.modified > now - LEFTOVER_AGE or info.name.endswith(".json"):
            continue
        if info.name.startswith(BASE_PREFIX):
            backup_id = info.name.removeprefix(BASE_PREFIX).split(".", 1)[0]
            if backup_id in pending or base_object(backup_id + METADATA_SUFFIX) in names:
                continue
        else:
            wal_name = info.name.removesuffix(".age")
            for extension in streams.EXTENSIONS.values():
                if extension and wal_name.endswith(extension):
                    wal_name = wal_name.removesuffix(extension)
            if wal_name + ".json" in names:
                continue
        out.append(info.name)
    return sorted(out)


def prune_remote(config: Config, store: Store, dry_run: bool, now: datetime) -> RemotePhysicalPrune:
    """Base backups on the remote past BASE_BACKUP_RETENTION_DAYS (never the newest good one there, nor pinned ones), then per
    system the WAL objects below the start of the oldest base backup kept there; each metadata/record object first."""
    report = RemotePhysicalPrune()
    try:
        backups = remote_base_backups(store)
        pinned_here = {b.id for b in list_base_backups(config) if b.metadata.get("keep")}  # pinned after it was copied
        # a chain is kept whole (classify_base), and an incremental whose chain is broken on the remote is not good there
        facts = [replace(f, keep=True) if f.id in pinned_here else f for f in chain_facts(backups)]
        decisions = classify_base(facts, config.base_backup_retention_days, now)
        by_id = {b.id: b for b in backups}
        for decision in decisions:
            if decision.action != "delete":
                report.kept.append(decision.id)
                continue
            report.deleted.append(decision.id)
            if not dry_run:
                item = by_id[decision.id].metadata["files"]["base"]
                for name in (base_object(decision.id + METADATA_SUFFIX), base_object(item["name"])):
                    if store.delete(name) is Deleted.KEPT_BY_LOCK:
                        report.kept_by_lock.append(name)
        cutoffs = wal_cutoffs(facts, decisions)
        for system in cutoffs:
            have = remote_wal(store, system)
            size = next((int(b.metadata["walSegmentSize"]) for b in backups if b.metadata.get("systemIdentifier") == system), 16 << 20)
            segments: dict[tuple[str, int], list[int]] = {}
            for name in have:
                if SEGMENT.fullmatch(name):
                    timeline, segno = parse_segment(name, size)
                    segments.setdefault((system, timeline), []).append(segno)
            for (_, timeline), segnos in wal_to_delete(segments, cutoffs).items():
                for segno in segnos:
                    name = segment_name(timeline, segno, size)
                    report.wal_deleted += 1
                    if dry_run:
                        continue
                    try:
                        record = _load(store, wal_object(system, name + ".json"))
                    except ValueError as exc:
                        raise SidecarError(f"the record {wal_object(system, name + '.json')} is damaged ({exc}); the segment is past "
                                           f"retention: delete the objects named wal_{system}_{name}.* by hand") from None
                    for obj in (wal_object(system, name + ".json"), wal_object(system, str(record["file"]))):
                        if store.delete(obj) is Deleted.KEPT_BY_LOCK:
                            report.kept_by_lock.append(obj)
        pending = {b.id for b in list_base_backups(config)} - copied_marks(config)[0] if config.volume else set()
        report.leftovers = leftovers(store, now, pending)
        for name in [] if dry_run else report.leftovers:
            if store.delete(name) is Deleted.KEPT_BY_LOCK:
                report.kept_by_lock.append(name)
            log.info("removed leftover object %s from %s (its record is gone: an interrupted prune or copy)", name, store.description)
    except (SidecarError, ValueError, KeyError) as exc:
        report.error = str(exc)
        log.error("pruning base backups and WAL on %s failed: %s", store.description, exc)
    return report


# --- point-in-time restore from the remote alone ------------------------------------------------------------------

def _fetch_wal(store: Store, system: str, name: str, dest: Path, config: Config, meta: dict[str, Any]) -> None:
    """One WAL file from the remote into `dest`: the stored object's sha256 and the raw sha256 both checked against its
    record before it is renamed into place (a damaged one stops the restore, named)."""
    try:
        record = _load(store, wal_object(system, name + ".json"))
        stored = wal_object(system, str(record["file"]))
    except StorageError as exc:
        raise NotFound(f"WAL file {name} is not on the remote ({exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ChecksumMismatch(f"WAL file {name}: its record {wal_object(system, name + '.json')} on the remote is damaged ({exc}); "
                               "nothing was started: restore to a target before it, or copy the volume's record back") from None
    tmp = dest.with_name("." + dest.name + ".tmp")
    out = streams.HashingFile(tmp)
    try:
        reader = ChunkReader(store.open_read(stored))
        tap = streams.ReadTap(reader, hashing=True)
        streams.decode(tap, out, str(record.get("compression", "none")), identities(config, meta) if record.get("encrypted") else None)
        raw = out.close()
        if tap.hexdigest() != record.get("sha256") or raw != record.get("rawSha256"):
            raise ChecksumMismatch(f"WAL segment {name} on the remote is damaged: what was read back does not match its record")
    except BaseException:
        out.abort()
        raise
    os.rename(tmp, dest)


def _remote_wal_chain(have: dict[str, int], meta: dict[str, Any], target: Any, path: Any = None, through: int | None = None) -> tuple[list[str], str]:
    """The WAL segments on the remote from a base backup's start, one after the other along the timeline path (to the
    target's segment for an LSN target; to the segment after `through`, the target's, when the remote has it), and what
    is missing ('' when they reach the target, or, for another target, at least the base backup's end)."""
    from sidecar.physical.pitr import chain_along

    size = int(meta["walSegmentSize"])
    last = segment_of(target.lsn, size) if target.kind == "lsn" and target.lsn is not None else None
    chain, missing = chain_along(lambda name: name in have, meta, last if through is None else through + 1, path)
    needed = last if last is not None else max(through or 0, parse_segment(str(meta["endWal"]), size)[1])
    if not chain or parse_segment(chain[-1], size)[1] < needed:
        return chain, f"segment {missing} is missing"
    return chain, ""


def _remote_candidates(backups: list[BaseBackup], target: Any, wal_of: Callable[[str], dict[str, int]]) -> list[tuple[BaseBackup, list[str]]]:
    """The base backups a restore from the bucket tries, in order, with the WAL each replays (pure but for `wal_of`, the
    remote's WAL of a system): pitr.restorable's, the WAL being the remote's. NotFound, naming what is missing, when none can."""
    return _remote_options(backups, target, wal_of)[0]


def _remote_options(backups: list[BaseBackup], target: Any, wal_of: Callable[[str], dict[str, int]], path: Any = None,
                    pool: list[BaseBackup] | None = None, choice: Any = None, through: int | None = None) -> tuple[list[tuple[BaseBackup, list[str]]], str]:
    """_remote_candidates along a timeline `path`, of the base backups `pool` on it, the base backup chosen for `choice`
    (default: the target), the WAL staged up to the segment after `through` (a restore point's or transaction's)."""
    from sidecar.physical.pitr import choose_base, restorable

    chosen = choose_base(backups if pool is None else pool, target if choice is None else choice)
    have = wal_of(str(chosen.metadata["systemIdentifier"]))
    wal, missing = _remote_wal_chain(have, chosen.metadata, target, path, through)
    if missing:
        raise NotFound(f"WAL up to {target.describe()} is not on the remote: {missing}")
    return restorable(backups, chosen, wal, target, lambda backup: _remote_wal_chain(have, backup.metadata, target, path, through),
                      pool=pool, where=" on the remote")


def _remote_history(config: Config, store: Store, system: str, timeline: int, have: dict[str, int], meta: dict[str, Any]) -> Any:
    """A timeline's path from its history file on the remote (the timeline alone when there is none)."""
    import tempfile

    from sidecar.physical.pitr import parse_history

    name = f"{timeline:08X}.history"
    if timeline == 1 or name not in have:
        return [(timeline, None)]
    with tempfile.TemporaryDirectory(prefix="pg-backup-sidecar-history-") as scratch:
        _fetch_wal(store, system, name, Path(scratch) / name, config, meta)
        return parse_history((Path(scratch) / name).read_text(errors="replace"), timeline)


def _remote_locate(config: Config, store: Store, meta: dict[str, Any], target: Any, path: Any, have: dict[str, int]) -> int | None:
    """pitr.locate over the remote's WAL: the LSN of a restore point or of the end of a transaction, the segments from
    the newest back to the start of `meta` (the oldest base backup that can reach it) streamed one at a time into a
    scratch file (sha256 checked) and read by pg_waldump, each beside the next; at most two kept, and the search stops
    at the newest segment that has it. None without a pg_waldump of that major version; NotFound if it is not there."""
    import shutil
    import tempfile

    from sidecar.physical.pitr import chain_along, scan_segment, search_wal, waldump_tool

    tool = waldump_tool(config, meta.get("serverMajor"))
    if tool is None:
        return None
    system = str(meta["systemIdentifier"])
    chain, _ = chain_along(lambda name: name in have, meta, None, path)
    with tempfile.TemporaryDirectory(prefix="pg-backup-sidecar-remote-wal-") as cache:
        kept: list[Path] = []

        def fetch(name: str, dest: Path) -> None:
            cached = Path(cache) / name
            if not cached.exists():
                _fetch_wal(store, system, name, cached, config, meta)
                kept.append(cached)
                while len(kept) > 2:  # newest first: a segment is read once as itself and once as the next one's follower
                    kept.pop(0).unlink(missing_ok=True)
            try:
                os.link(cached, dest)
            except OSError:
                shutil.copyfile(cached, dest)

        return search_wal(chain, lambda name, following: scan_segment(None, system, name, tool, None, following, fetch=fetch), target, system,
                          "the WAL on the remote", "; nothing was written")


def restore_from_remote(config: Config, target: Any, directory: Path) -> dict[str, Any]:
    """restore --to-... --from-remote --into-data-dir (every target, as from the volume): the newest good base backup on
    the remote that ends before the target, on the target's timeline path (from the history files on the remote), streamed
    from the bucket into `directory` (every file checked against its manifest; an incremental one with its chain, combined
    by pg_combinebackup as on the volume), the WAL it needs staged in pg_wal (each file's sha256 checked), recovery
    configured. A restore point or transaction is looked for first in the remote's WAL (pg_waldump, newest segment first,
    one segment at a time): its LSN chooses the base backup and the WAL staged ends just after it; not there: refused
    before anything is written. An incremental whose chain is broken there (a link missing, or read back damaged) gives
    way to the newest base backup before it whose chain is whole there (a full one, or an incremental) and whose WAL
    there reaches as far; none: refused, naming what is missing. Nothing is read from the volume."""
    from sidecar import api
    from sidecar.physical.pitr import Target, _chown, _conf_quote, _wipe, materialise_first, recovery_settings, timeline_plan

    directory = directory.absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        from sidecar.errors import UsageError

        raise UsageError(f"{directory} is not an empty directory; give a new or empty directory to --into-data-dir")
    store = api.remote_store(config)
    backups = remote_base_backups(store)
    wal_seen: dict[str, dict[str, int]] = {}

    def wal_of(system: str) -> dict[str, int]:
        return wal_seen.setdefault(system, remote_wal(store, system))

    good = [b for b in backups if b.good]
    newest = good[0].metadata if good else {}
    pool, path = timeline_plan(backups, target, lambda system: {int(n[:8], 16) for n in wal_of(system) if SEGMENT.fullmatch(n) or HISTORY.fullmatch(n)},
                               lambda system, timeline: _remote_history(config, store, system, timeline, wal_of(system), newest),
                               "the WAL on the remote")
    choice, through = target, None
    if target.kind in ("name", "xid") and [b for b in pool if b.good]:  # its LSN chooses the base backup, and bounds the WAL staged
        oldest = [b for b in pool if b.good][-1]
        found = _remote_locate(config, store, oldest.metadata, target, path, wal_of(str(oldest.metadata["systemIdentifier"])))
        if found is None:  # not looked for: the oldest base backup, which reaches it if anything does; PostgreSQL stops there
            log.warning("pg_waldump of PostgreSQL %s is not here: %s cannot be looked for in the WAL on the remote before the restore; "
                        "restoring from the oldest base backup there (%s), and PostgreSQL refuses to promote if it is not reached",
                        oldest.metadata.get("serverMajor"), target.describe(), oldest.id)
            choice = Target("lsn", lsn=parse_lsn(oldest.metadata["endLsn"]))
        else:
            choice, through = Target("lsn", lsn=found), segment_of(found, int(oldest.metadata["walSegmentSize"]))
    candidates, why = _remote_options(backups, target, wal_of, path, pool, choice, through)
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    try:
        backup, chain = materialise_first(config, backups, candidates, directory, source=lambda link: ChunkReader(
            store.open_read(base_object(link.metadata["files"]["base"]["name"]))), where=" on the remote", why=why)
        have = wal_of(str(backup.metadata["systemIdentifier"]))
        meta = backup.metadata
        system, timeline = str(meta["systemIdentifier"]), int(meta["timeline"])
        wal_dir = directory / "pg_wal"
        wal_dir.mkdir(mode=0o700, exist_ok=True)
        highest = max([timeline, *(t for t, _ in path)])
        for name in [f"{t:08X}.history" for t in range(2, highest + 1) if f"{t:08X}.history" in have] + chain:
            _fetch_wal(store, system, name, wal_dir / name, config, meta)
        recover_along = str(path[-1][0]) if path and target.timeline != "current" else target.timeline
        settings = ["restore_command = '/bin/false'", "recovery_target_action = 'promote'", f"recovery_target_timeline = {_conf_quote(recover_along)}"]
        settings += recovery_settings(target)
        with open(directory / "postgresql.auto.conf", "a") as conf:
            conf.write(f"\n# point-in-time recovery written by pg-backup-sidecar from {store.description} (WAL staged in pg_wal)\n")
            conf.write("".join(line + "\n" for line in settings))
        (directory / "recovery.signal").touch(mode=0o600)
        tar.fix_modes(directory)
        if os.geteuid() == 0:
            _chown(directory, "postgres")
    except BaseException:
        _wipe(directory, created)
        raise
    links = [link.id for link in chain_of(backups, backup)[0]]
    log.info("data directory %s written from base backup %s on %s, recovering to %s", directory, backup.id, store.description,
             target.describe(), extra={"event": "pitr_data_dir_written", "backup_id": backup.id})
    return {"dataDir": str(directory), "baseBackup": backup.id, "target": target.describe(), "walSegments": len(chain), "walStaged": True,
            "serverMajor": meta.get("serverMajor"), "systemIdentifier": system, "source": store.description,
            "chain": links, "at": datetime.now(UTC).isoformat()}
