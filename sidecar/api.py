"""The public Python API. The CLI calls only these functions.

    from sidecar.api import create_backup, list_backups, restore_backup, verify_backup
    backup = create_backup()            # config from config.yaml / environment
    for b in list_backups(): print(b.id, b.size, b.status)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import check as _check
from sidecar.check import CheckReport
from sidecar.config import Config, load_config
from sidecar.errors import ChecksumMismatch, ConfigError, NotFound, SidecarError, UsageError
from sidecar.logical import backup as _backup
from sidecar.logical import restore as _restore
from sidecar.logical import server as _server
from sidecar.logical.restore import DrillReport, RestoreReport, VerifyReport
from sidecar.logical.server import SetRestoreReport
from sidecar.logical.validation import ValidationResult, validate
from sidecar.repository import Entry, Repository, iso_timestamp
from sidecar.retention import Policy, classify
from sidecar.storage import offsite as _offsite
from sidecar.storage.base import Deleted, StoreUnusable
from sidecar.storage.copy import Uploaded, add_fact, delete_remote, find_remote, last_checked, remote_entries, remote_leftovers, verify_remote
from sidecar.storage.offsite import PendingReport

if TYPE_CHECKING:
    from sidecar.logical.tables import TableRestoreReport
    from sidecar.physical.find import Moment
    from sidecar.storage.objectstore import ObjectStore

log = logging.getLogger(__name__)

__all__ = [
    "Backup", "PruneReport", "RemotePruneReport", "RestoreReport", "SetRestoreReport", "VerifyReport",
    "ValidationResult", "validate_data_consistency", "DrillReport", "drill_backup",
    "CheckReport", "check_setup",
    "PendingReport", "check_remote", "copy_offsite", "pending_backups", "last_remote_verification",
    "create_backup", "list_backups", "get_backup", "restore_backup", "verify_backup", "prune_backups", "set_pinned",
    "create_base_backup", "list_base_backups", "wal_timelines", "recovery_window", "window_reader", "wal_watcher",
    "verify_base_backup", "set_base_pinned", "receive_wal", "fetch_wal", "restore_to_point", "restore_tables", "find_moment",
]


@dataclass(frozen=True)
class Backup:
    id: str
    timestamp: str
    status: str
    size: int | None = None
    checksum: str | None = None
    compression: str | None = None
    encrypted: bool | None = None
    label: str | None = None
    keep: bool = False
    problem: str = ""
    drill: str = "never"  # passed | failed | never | skipped: the last restore drill
    drill_at: str | None = None
    validation: str = "not run"  # clean | N findings | not run: the consistency checks before the backup
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_entry(cls, entry: Entry) -> Backup:
        meta = entry.metadata or {}
        return cls(
            id=entry.id,
            timestamp=meta.get("timestamp") or entry.timestamp.isoformat(),
            status=entry.status,
            size=meta.get("size"),
            checksum=meta.get("checksum"),
            compression=meta.get("compression"),
            encrypted=meta.get("encrypted"),
            label=meta.get("label"),
            keep=bool(meta.get("keep")),
            problem=entry.problem,
            drill=entry.drill,
            drill_at=entry.drill_at,
            validation=entry.validation,
            metadata=meta,
        )

    def to_json(self) -> dict[str, Any]:
        """The metadata with `status`, `drillStatus` and `validationStatus` (the metadata's own `verified`
        and `validation` hold the details); without readable metadata, what is known."""
        if self.metadata:
            return {**self.metadata, "status": self.status, "drillStatus": self.drill, "validationStatus": self.validation}
        return {"id": self.id, "timestamp": self.timestamp, "status": self.status, "problem": self.problem}


@dataclass
class RemotePruneReport:
    """Retention on the remote store: what was deleted, kept, kept by the bucket's lock, and the leftovers of
    interrupted deletes or copies that were removed (or, in a dry run, would be)."""

    store: str
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    kept_by_lock: dict[str, str] = field(default_factory=dict)  # backup id -> what the lock kept
    leftovers: list[str] = field(default_factory=list)          # object names
    decisions: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # the store could not be pruned (the volume's prune is done regardless)


@dataclass
class PruneReport:
    deleted: list[str]
    kept: list[str]
    reported: list[str]
    dry_run: bool
    decisions: list[dict[str, str]] = field(default_factory=list)  # {id, action, reason} for every backup, newest first
    remote: RemotePruneReport | None = None  # with a remote store configured
    volume: bool = True  # False: no backup volume (BACKUP_VOLUME=false), only `remote` means anything
    physical: Any = None  # sidecar.physical.base.PhysicalPruneReport: base backups and WAL (point-in-time recovery), if any


def _config(config: Config | None) -> Config:
    return config if config is not None else load_config()


def create_backup(config: Config | None = None, label: str | None = None, keep: bool = False, prune: bool = True) -> Backup:
    """Take a backup now, then prune by the retention policy (a failed prune does not fail the backup)."""
    cfg = _config(config)
    copied = True
    create = _server.create_set if cfg.databases else _backup.create_backup  # BACKUP_DATABASES: a whole server's set
    if not cfg.volume:  # straight to the remote store
        store = remote_store(cfg)
        metadata = create(cfg, label=label, keep=keep, store=store)
    elif cfg.remote is None:
        metadata = create(cfg, label=label, keep=keep)
    elif cfg.databases:  # a set: copied after the commit (the tee streams single-database backups)
        metadata = create(cfg, label=label, keep=keep)
        copied = _copy_after_commit(cfg, metadata["id"])
    else:  # on the volume and, while it is written, to the remote (the tee); the copy then only writes the metadata object
        metadata, copied = _backup_and_copy(cfg, label, keep)
    if prune:  # after the copy, so the remote is pruned with the new backup in it; not when the copy just failed (one error is enough)
        try:
            pruned = prune_backups(cfg, remote=copied)
            if pruned.remote is not None and pruned.remote.error:
                log.error("backup %s succeeded but pruning %s failed: %s", metadata["id"], pruned.remote.store, pruned.remote.error)
        except SidecarError as exc:
            log.error("backup %s succeeded but pruning failed: %s", metadata["id"], exc)
    if not cfg.volume:
        return Backup.from_entry(find_remote(store, metadata["id"]))
    return Backup.from_entry(Repository(cfg.backup_dir).get(metadata["id"]))


def _backup_and_copy(config: Config, label: str | None, keep: bool) -> tuple[dict[str, Any], bool]:
    """A backup on the volume, each file streamed to the remote store while it is written (if the store can be
    reached), then its off-site copy completed from what the tee uploaded. The local backup is what matters: a store
    that cannot be reached, or fails or stalls during the backup, leaves it committed and pending (one error line)."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    try:
        store = remote_store(config)
    except SidecarError as exc:
        _offsite.count_error(repo, "copy")  # pg_backup_remote_errors_total
        metadata = _backup.create_backup(config, label=label, keep=keep)
        _log_not_copied(metadata["id"], exc)
        return metadata, False
    tee = _backup.TeeDestination(repo, store)
    metadata = _backup.create_backup(config, label=label, keep=keep, tee=tee)
    if tee.failure is not None:  # the store failed while the backup was written: do not wait for it a second time now
        _offsite.count_error(repo, "copy")
        _log_not_copied(metadata["id"], tee.failure)
        return metadata, False
    return metadata, _copy_new_backup(config, metadata["id"], store, tee.uploaded)


def _copy_after_commit(config: Config, backup_id: str) -> bool:
    """The off-site copy of a backup just committed locally, sent whole; a failure leaves it pending (one error line)."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    try:
        store = remote_store(config)
    except SidecarError as exc:
        _offsite.count_error(repo, "copy")  # pg_backup_remote_errors_total
        _log_not_copied(backup_id, exc)
        return False
    return _copy_new_backup(config, backup_id, store, {})


def _log_not_copied(backup_id: str, exc: BaseException) -> None:
    log.error("backup %s is on the volume but was not copied off-site: %s; it is pending: run 'pg-backup-sidecar copy pending' "
              "(the daemon retries by itself)", backup_id, exc, extra={"event": "offsite_copy_failed", "backup_id": backup_id})


def _copy_new_backup(config: Config, backup_id: str, store: ObjectStore, uploaded: Mapping[str, Uploaded]) -> bool:
    """The off-site copy of a backup just committed locally, the objects its tee uploaded accepted as they are. A
    failure does not fail the backup: it is logged (one error line naming the backup and the cause) and the backup
    stays pending for `copy pending` and the daemon."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    try:
        copied = _offsite.copy_entry(repo, repo.get(backup_id), store, store.remote, uploaded)
    except SidecarError as exc:
        _log_not_copied(backup_id, exc)
        return False
    log.info("backup %s copied off-site to %s (%d bytes)", backup_id, store.description, copied.bytes,
             extra={"event": "offsite_copied", "backup_id": backup_id})
    return True


def copy_offsite(ref: str = "pending", config: Config | None = None) -> PendingReport:
    """Copy backups to the remote store: 'pending' (every good local backup not copied yet, oldest first), or one
    backup by id or 'latest'. A backup already complete there is recorded and not uploaded again."""
    cfg = _config(config)
    store = remote_store(cfg)
    if not cfg.volume:
        return PendingReport()  # every backup is written to the remote store directly: nothing is ever pending
    repo = Repository(cfg.backup_dir, group_readable=cfg.group_readable)
    ids = None if ref == "pending" else [repo.get(ref).id]
    return _offsite.copy_pending(repo, store, store.remote, ids)


def list_backups(config: Config | None = None, remote: bool = False) -> list[Backup]:
    """Every backup on the volume (or, with `remote`, in the remote store: those whose metadata object exists),
    newest first, with its status."""
    cfg = _config(config)
    if remote or not cfg.volume:
        return [Backup.from_entry(e) for e in remote_entries(remote_store(cfg))]
    return [Backup.from_entry(e) for e in Repository(cfg.backup_dir).entries()]


def pending_backups(config: Config | None = None) -> list[str]:
    """Ids of good local backups not yet copied to the remote store, oldest first (none without a remote)."""
    cfg = _config(config)
    if cfg.remote is None or not cfg.volume:
        return []
    return [e.id for e in _offsite.pending(Repository(cfg.backup_dir), cfg.remote)]


def get_backup(ref: str, config: Config | None = None) -> Backup:
    cfg = _config(config)
    if not cfg.volume:
        return Backup.from_entry(find_remote(remote_store(cfg), ref))
    return Backup.from_entry(Repository(cfg.backup_dir).get(ref))


def verify_backup(ref: str, config: Config | None = None, remote: bool = False) -> VerifyReport:
    """Check a backup's checksums and that it decodes; with `remote`, stream every object of the remote copy and
    compare its sha256 and size with the metadata."""
    cfg = _config(config)
    if not remote and cfg.volume:
        return _restore.verify_backup(cfg, ref)
    store = remote_store(cfg)
    entry = find_remote(store, ref)
    report = VerifyReport(entry.id, ok=False)
    if not entry.good or entry.metadata is None:
        report.problems.append(f"{entry.status}: {entry.problem}")
        return report
    try:
        verify_remote(store, entry.metadata)
    except ChecksumMismatch as exc:
        _count_remote_error(cfg, "verify")  # pg_backup_remote_errors_total{operation="verify"}: a damaged off-site copy
        report.problems.append(str(exc))
        return report
    except SidecarError:
        _count_remote_error(cfg, "verify")  # the store failed while it was read back
        raise
    report.ok = True
    report.notes.append(f"every object read back from {store.description}; sha256 and sizes match the metadata")
    now = datetime.now(UTC)
    try:  # a new 'checked' fact object: `list --remote` and last_remote_verification show it
        add_fact(store, entry.id, "checked", {"at": iso_timestamp(now), "by": "verify"})
    except SidecarError as exc:
        report.notes.append(f"not recorded on the remote ({exc})")
    _note_remote_verified(cfg, entry.id, now)
    return report


def _count_remote_error(cfg: Config, operation: str) -> None:
    if cfg.remote is None:
        return
    try:
        _offsite.count_error(Repository(cfg.backup_dir), operation)
    except OSError as exc:
        log.warning("a failed %s of the remote copy could not be counted on the volume: %s", operation, exc)


def _note_remote_verified(cfg: Config, backup_id: str, at: datetime) -> None:
    """On the volume too (pg_backup_remote_last_verify_timestamp_seconds is read from there at scrape time)."""
    if cfg.remote is None:
        return
    try:
        _offsite.record_verified(Repository(cfg.backup_dir), cfg.remote, backup_id, at)
    except OSError as exc:
        log.warning("the remote verification of %s could not be noted on the volume: %s", backup_id, exc)


def last_remote_verification(config: Config | None = None) -> datetime | None:
    """When a backup in the remote store was last read back whole with every sha256 matching its metadata (a
    `verify --remote` that passed, or a restore drill from the remote that passed), UTC; None if never, or if no
    remote is configured. One listing of the store (no object is read); StorageError if the store cannot be listed."""
    cfg = _config(config)
    if cfg.remote is None:
        return None
    return last_checked(remote_store(cfg))


def restore_backup(ref: str, config: Config | None = None, target_db: str | None = None, in_place: bool = False, force: bool = False,
                   from_remote: bool = False, database: str | None = None) -> RestoreReport | SetRestoreReport:
    """Restore a backup from the volume, or with `from_remote` straight from the remote store (one streaming pass, each
    file's sha256 checked before anything it carries is committed, and before the swap). A whole server's set
    (BACKUP_DATABASES) restores every database, roles first, or only `database`: a SetRestoreReport."""
    cfg = _config(config)
    store = remote_store(cfg) if from_remote or not cfg.volume else None
    if database is not None or _is_set(cfg, ref, store):
        if target_db is not None or in_place:
            raise UsageError("a whole server's backup set restores each database under its own name: leave out --target-db and --in-place")
        return _server.restore_set(cfg, ref, database=database, force=force, store=store)
    return _restore.restore_backup(cfg, ref, target_db=target_db, in_place=in_place, force=force, store=store)


def _is_set(cfg: Config, ref: str, store: ObjectStore | None) -> bool:
    try:
        entry = find_remote(store, ref) if store is not None else Repository(cfg.backup_dir).get(ref)
    except (NotFound, OSError):
        return False  # the restore itself says what is wrong
    return _server.is_set(entry.metadata)


def retention_policy(config: Config) -> Policy:
    return Policy(days=config.retention_days, last=config.keep_last, daily=config.keep_daily, weekly=config.keep_weekly,
                  monthly=config.keep_monthly, timezone=config.schedule_timezone)


def remote_retention_policy(config: Config) -> Policy:
    """The local rules with the remote's own days (BACKUP_REMOTE_RETENTION_DAYS; unset: the local days; 0: keep everything)."""
    local = retention_policy(config)
    days = config.remote.retention_days if config.remote is not None else None
    if days is None:
        return local
    return replace(local, days=days) if days else Policy(days=0, timezone=local.timezone)


def prune_backups(config: Config | None = None, dry_run: bool = False, now: datetime | None = None, remote: bool = True) -> PruneReport:
    """Delete what the retention policy lets go, on the volume and (with a remote store, unless `remote` is False) on the
    remote with its own days. A remote that cannot be reached is reported in `report.remote.error`; the volume is
    pruned regardless."""
    cfg = _config(config)
    moment = now or datetime.now(UTC)
    repo = Repository(cfg.backup_dir, group_readable=cfg.group_readable)
    with repo.lock("prune"):
        report = PruneReport([], [], [], dry_run, volume=cfg.volume)
        local = repo.entries() if cfg.volume else []
        for decision in classify(local, retention_policy(cfg), moment):
            report.decisions.append({"id": decision.entry.id, "action": decision.action, "reason": decision.reason})
            if decision.action == "delete":
                report.deleted.append(decision.entry.id)
                if not dry_run:
                    repo.delete(decision.entry)
                    _offsite.forget(repo, decision.entry.id)
                    log.info("pruned %s (%s)", decision.entry.id, decision.reason)
            elif decision.action == "report":
                report.reported.append(f"{decision.entry.id}: {decision.reason}")
                log.warning("%s: %s", decision.entry.id, decision.reason)
            else:
                report.kept.append(decision.entry.id)
        if cfg.volume and ((cfg.backup_dir / "base").is_dir() or (cfg.backup_dir / "wal").is_dir()):
            from sidecar.physical.base import PhysicalPruneReport, prune_physical
            from sidecar.physical.hold import pruning

            with pruning(cfg.backup_dir) as free:
                if free:
                    report.physical = prune_physical(cfg, dry_run, moment)
                else:
                    report.physical = PhysicalPruneReport(busy="a point-in-time restore is reading the archive")
                    log.warning("base backups and WAL not pruned: a point-in-time restore is reading them; the next prune will")
            if cfg.remote is not None and remote and report.physical.busy is None:  # the same rule on the remote's base backups and WAL
                from sidecar.physical.offsite import RemotePhysicalPrune, prune_remote

                try:
                    report.physical.remote = prune_remote(cfg, remote_store(cfg), dry_run, moment)
                except ConfigError as exc:
                    report.physical.remote = RemotePhysicalPrune(error="; ".join(exc.problems))
                    log.error("base backups and WAL on the remote not pruned: %s", report.physical.remote.error)
        if cfg.remote is not None and remote:
            report.remote = _prune_remote(cfg, repo, local, dry_run, moment)
    return report


def _prune_remote(config: Config, repo: Repository, local: list[Entry], dry_run: bool, now: datetime) -> RemotePruneReport:
    """Retention on the remote store: the same rules (never the newest good remote backup, nor one pinned there or on
    the volume), its own days; then the leftovers of interrupted deletes and copies (see copy.remote_leftovers)."""
    try:
        store = remote_store(config)
    except ConfigError as exc:
        return RemotePruneReport(config.remote.url if config.remote else "remote", error="; ".join(exc.problems))
    report = RemotePruneReport(store.description)
    pinned_here = {e.id for e in local if e.metadata and e.metadata.get("keep")}
    try:
        entries = [Entry(e.id, {**e.metadata, "keep": True}, e.status, e.problem) if e.id in pinned_here and e.metadata else e
                   for e in remote_entries(store)]
        for decision in classify(entries, remote_retention_policy(config), now):
            report.decisions.append({"id": decision.entry.id, "action": decision.action, "reason": decision.reason})
            if decision.action == "report":
                report.reported.append(f"{decision.entry.id}: {decision.reason}")
            elif decision.action == "keep":
                report.kept.append(decision.entry.id)
            elif dry_run:
                report.deleted.append(decision.entry.id)
            else:
                deleted = delete_remote(store, decision.entry.id)
                if deleted.outcome == "kept-by-lock":
                    report.kept_by_lock[deleted.id] = deleted.note
                    log.info("remote backup %s is past retention (%s) but %s", deleted.id, decision.reason, deleted.note)
                else:
                    report.deleted.append(deleted.id)
                    if deleted.locked:
                        report.kept_by_lock[deleted.id] = deleted.note
                    log.info("pruned %s from %s (%s)", deleted.id, store.description, decision.reason)
        in_progress = {e.id for e in _offsite.pending(repo, config.remote)} if config.volume and config.remote else set()
        for backup_id, names in remote_leftovers(store, now, in_progress).items():
            for name in names:
                if dry_run or store.delete(name) is not Deleted.KEPT_BY_LOCK:
                    report.leftovers.append(name)
            if not dry_run:
                log.info("removed the leftovers of %s from %s (data without metadata: an interrupted delete or copy)", backup_id, store.description)
    except SidecarError as exc:
        report.error = str(exc)
        log.error("pruning %s failed: %s", store.description, exc)
    return report


def set_pinned(ref: str, keep: bool, config: Config | None = None) -> Backup:
    """Pin a backup (retention never deletes it) or release it."""
    cfg = _config(config)
    repo = Repository(cfg.backup_dir, group_readable=cfg.group_readable)
    if not cfg.volume:  # a pin on the remote store is a new fact object beside the backup (objects are never rewritten)
        store = remote_store(cfg)
        with repo.lock("pin"):
            found = find_remote(store, ref)
            add_fact(store, found.id, "pin", keep)
            return Backup.from_entry(find_remote(store, found.id))
    with repo.lock("pin"):
        entry = repo.get(ref)
        if entry.metadata is None:
            raise NotFound(f"backup {entry.id} has no readable metadata ({entry.problem}); cannot pin it")
        repo.write_metadata({**entry.metadata, "keep": keep})
        return Backup.from_entry(repo.get(entry.id))


def set_base_pinned(ref: str, keep: bool, config: Config | None = None) -> dict[str, Any]:
    """Pin a base backup (retention never deletes it, nor the WAL from its start on; on the remote too) or release it.
    Returns its listing (metadata with `status`)."""
    import json

    from sidecar.physical.base import base_dir, get_base_backup
    from sidecar.repository import METADATA_SUFFIX, write_atomically

    cfg = _config(config)
    if not cfg.volume:
        raise UsageError("base backups live on the backup volume; there is none here (BACKUP_VOLUME=false)")
    repo = Repository(cfg.backup_dir, group_readable=cfg.group_readable)
    with repo.lock("pin"):
        backup = get_base_backup(cfg, ref)
        if not backup.metadata:
            raise NotFound(f"base backup {backup.id} has no readable metadata ({backup.problem}); cannot pin it")
        metadata = {**backup.metadata, "keep": keep}
        write_atomically(base_dir(cfg) / (backup.id + METADATA_SUFFIX), json.dumps(metadata, indent=2, sort_keys=True).encode() + b"\n",
                         repo.file_mode)
        return get_base_backup(cfg, backup.id).to_json()


def remote_store(config: Config) -> ObjectStore:
    """The off-site store of the configuration; UsageError if none is configured."""
    if config.remote is None:
        raise UsageError("no remote store is configured; set BACKUP_REMOTE_URL (remote.url in config.yaml), see the README's \"Off-site copies\"")
    from sidecar.storage.objectstore import ObjectStore

    try:
        return ObjectStore(config.remote)
    except StoreUnusable as exc:
        raise ConfigError([str(exc)]) from None


def check_remote(config: Config | None = None) -> None:
    """ConfigError (one line naming the problem: bad URL, missing bucket, credentials, unreachable endpoint) if the
    configured remote store cannot be used."""
    store = remote_store(_config(config))
    try:
        store.check(attempts=1)  # obstore's own retries are enough for a yes/no at start-up
    except StoreUnusable as exc:
        raise ConfigError([str(exc)]) from None


def validate_data_consistency(config: Config | None = None, dbname: str | None = None) -> ValidationResult:
    """Run the consistency checks now; `result.is_valid`, `result.errors`, `result.findings`."""
    return validate(_config(config), dbname=dbname)


def check_setup(config: Config | None = None) -> CheckReport:
    """Connect and check what backups, restores and drills need (see sidecar.check); `report.ok`."""
    return _check.check_setup(_config(config))


def drill_backup(ref: str = "latest", config: Config | None = None, from_remote: bool | None = None) -> DrillReport:
    """Restore into a scratch database, validate, compare row counts, drop it; records `verified`. With `from_remote`
    (default: drill.from_remote / DRILL_FROM_REMOTE; always without a volume) the backup is streamed from the remote
    store, and the outcome is also recorded there."""
    cfg = _config(config)
    remote = not cfg.volume or (cfg.drill_from_remote if from_remote is None else from_remote)
    report = _restore.drill_backup(cfg, ref, store=remote_store(cfg) if remote else None)
    if remote and report.ok is True and report.skipped is None:
        _note_remote_verified(cfg, report.backup_id, datetime.fromisoformat(report.at))
    return report


# --- physical: base backups, WAL archiving, point-in-time restore (sidecar/physical, issue 13) -----

def create_base_backup(config: Config | None = None, incremental: bool | None = None) -> dict[str, Any]:
    """pg_basebackup through our stages into BACKUP_DIR/base/; returns its metadata. It is good (`list --base`)
    once the WAL up to its end LSN is archived by `wal-receive`."""
    from sidecar.physical.base import create_base_backup as create

    cfg = _config(config)
    metadata = create(cfg.replication(), incremental)  # pg_basebackup as WAL_REPLICATION_URL's role when one is set
    if cfg.remote is not None:  # off-site at once; a failure leaves it pending for the daemon's copier
        from sidecar.physical.offsite import copy_base

        try:
            copied = copy_base(cfg, remote_store(cfg), only=metadata["id"])
            if copied.error:
                log.error("base backup %s is on the volume but was not copied off-site: %s; it is pending (the daemon retries it)",
                          metadata["id"], copied.error, extra={"event": "offsite_copy_failed", "backup_id": metadata["id"]})
        except SidecarError as exc:
            log.error("base backup %s is on the volume but was not copied off-site: %s", metadata["id"], exc)
    try:  # base backup retention (and the WAL it frees) after each base backup; a failed prune does not fail it
        prune_backups(cfg)
    except SidecarError as exc:
        log.error("base backup %s succeeded but pruning failed: %s", metadata["id"], exc)
    return metadata


def list_base_backups(config: Config | None = None) -> list[dict[str, Any]]:
    """Every base backup, newest first: its metadata with `status` (ok | waiting-for-wal | missing-file | ...) and `problem`."""
    from sidecar.physical.base import list_base_backups as listing

    return [b.to_json() for b in listing(_config(config))]


def wal_timelines(config: Config | None = None) -> list[dict[str, Any]]:
    """What the WAL archive holds per system and timeline: segments, first, last, gaps."""
    from sidecar.physical.wal import WalArchive

    return [t.to_json() for t in WalArchive(_config(config).backup_dir).timelines()]


def window_reader(config: Config | None = None) -> Any:
    """What computes the recovery window, remembering each archived segment's last commit time (for the daemon, which
    asks on every scrape): pass it to `recovery_window`."""
    from sidecar.physical.window import WindowReader

    return WindowReader(_config(config))


def recovery_window(config: Config | None = None, reader: Any = None) -> list[dict[str, Any]]:
    """Per system and timeline: the earliest recoverable moment (the end of the oldest good base backup that reaches it),
    the latest (the last commit archived without a gap after a good base backup, by pg_waldump; `latestBasis`
    says `archived-at` where the WAL cannot be read here and the newest segment's archive time stands in), and gaps."""
    return [w.to_json() for w in (reader or window_reader(config)).windows()]


def wal_watcher(config: Config | None = None) -> Any:
    """For the daemon's metrics: a callable returning the WAL archiving state (receiver up, slot, spool, archive age,
    recovery window, gaps, base backup age); the slot is asked at most every 5 s, segment commit times are remembered."""
    from sidecar.physical.observe import SlotProbe, wal_state
    from sidecar.physical.window import WindowReader

    cfg = _config(config)
    reader, probe = WindowReader(cfg), SlotProbe(cfg)
    return lambda: wal_state(cfg, reader, probe)


def verify_base_backup(ref: str, config: Config | None = None) -> VerifyReport:
    """sha256 of a base backup's stored file, then every file in its tar against its backup_manifest."""
    from sidecar.physical.base import verify_base_backup as verify

    backup_id, problems, notes = verify(_config(config), ref)
    return VerifyReport(backup_id, ok=not problems, problems=problems, notes=notes)


def is_base_backup(ref: str, config: Config | None = None) -> bool:
    """Whether `ref` is the id of a base backup (anything that is not exactly an id is not: never a path)."""
    from sidecar.physical.base import base_dir
    from sidecar.repository import ID_PATTERN, METADATA_SUFFIX

    return bool(ID_PATTERN.fullmatch(ref)) and (base_dir(_config(config)) / (ref + METADATA_SUFFIX)).is_file()


def receive_wal(config: Config | None = None) -> int:
    """Stream WAL into the archive until SIGTERM/SIGINT (pg_receivewal with a slot, restarted with backoff)."""
    from sidecar.physical.receiver import Receiver

    return Receiver(_config(config)).run()


def fetch_wal(backup_dir: Path, name: str, dest: Path, system_id: str | None = None, identity_file: Path | None = None,
              spool_dir: Path | None = None) -> str:
    """restore_command's helper: an archived WAL file into `dest`, sha256 checked; a segment not archived yet comes from
    the receiver's spool (`spool_dir`, default BACKUP_DIR/wal/spool) when it has it, completed or `.partial`, its first
    page header checked (no sha256 was recorded for it). Returns where it came from ("archive", "spool", "spool-partial").
    NotFound if it is in neither, ChecksumMismatch naming it if the archived one is damaged. Needs no DATABASE_URL."""
    from sidecar import age
    from sidecar.physical.wal import PARTIAL, SPOOL_SYSTEM_FILE, WalArchive, copy_into_place, spool_segment

    archive = WalArchive(backup_dir)
    spool = spool_dir or backup_dir / "wal" / "spool"
    if system_id is None:
        systems = sorted({t.system_id for t in archive.timelines()})
        if not systems:
            try:
                systems = [(spool / SPOOL_SYSTEM_FILE).read_text().strip()]
            except OSError:
                pass
        if len(systems) != 1:
            raise UsageError(f"the archive in {backup_dir} holds {len(systems)} systems; give --system-id")
        system_id = systems[0]
    identities = age.parse_identities(identity_file) if identity_file else None
    for _attempt in range(2):  # the receiver may archive the spool's file (and remove it) while we look
        if archive.record(system_id, name) is not None:
            archive.fetch(system_id, name, dest, identities)
            return "archive"
        source = spool_segment(spool, system_id, name)
        if source is None:
            continue
        try:
            copy_into_place(source, dest)
        except FileNotFoundError:
            continue
        return "spool-partial" if source.name.endswith(PARTIAL) else "spool"
    archive.fetch(system_id, name, dest, identities)  # NotFound, named
    return "archive"


def restore_to_point(config: Config | None, to_time: str | None, to_lsn: str | None, to_latest: bool, into_data_dir: Path,
                     stage_wal: bool | None = None, from_remote: bool = False, *, to_restore_point: str | None = None,
                     to_xid: str | None = None, exclusive: bool = False, timeline: str | None = None) -> dict[str, Any]:
    """Write a data directory that recovers to the target (base backup + WAL, recovery configured, promote). `stage_wal`:
    copy the WAL into its pg_wal (self-contained; the default when running as root) or read it through wal-fetch.
    `exclusive` stops just before a time, LSN or transaction; `timeline` is latest (default), current or a number.
    `from_remote`: base backup and WAL read from the remote store alone (a lost volume), every target as from the volume;
    the WAL is then always staged."""
    from sidecar.physical.pitr import parse_target, restore_to_data_dir

    target = parse_target(to_time, to_lsn, to_latest, to_restore_point, to_xid, exclusive, timeline)
    cfg = _config(config)
    if from_remote:
        from sidecar.physical.offsite import restore_from_remote

        with _reading(cfg):  # a prune run beside it (the daemon's, with the volume) leaves the remote's objects alone too
            return restore_from_remote(cfg, target, into_data_dir)
    from sidecar.physical.hold import reading

    with reading(cfg.backup_dir):  # what is staged is read here; without staging, the new server reads it later (unheld)
        return restore_to_data_dir(cfg, target, into_data_dir, stage_wal)


def describe_point_in_time_target(to_time: str | None = None, to_lsn: str | None = None, to_latest: bool = False,
                                  to_restore_point: str | None = None, to_xid: str | None = None, exclusive: bool = False,
                                  timeline: str | None = None, from_remote: bool = False) -> str:
    """Check a point-in-time target as `restore --to-*` would, before anything starts (UsageError naming the problem);
    what it restores to, in words. The daemon checks a `POST /v1/restores` target with it. Every target restores from the
    remote store too (`from_remote`, kept for the callers: nothing is refused for it any more)."""
    from sidecar.physical.pitr import parse_target

    target = parse_target(to_time, to_lsn, to_latest, to_restore_point, to_xid, exclusive, timeline)
    return target.describe()


def pitr_drill(config: Config | None = None) -> Any:
    """A PITR drill (issue 16): a restore point with the exact row counts at it, its WAL archived, a restore to it into a
    scratch server, the counts compared; recorded on the volume (wal/.pitr-drill.json) for the metrics. `report.ok`."""
    from sidecar.physical.drill import run_pitr_drill

    cfg = _config(config)
    with _reading(cfg):
        return run_pitr_drill(cfg)


def _reading(cfg: Config) -> contextlib.AbstractContextManager[None]:
    """The volume's archive held against `prune` while a restore, a drill or `pitr find` reads it (physical/hold.py)."""
    from sidecar.physical.hold import reading

    return reading(cfg.backup_dir) if cfg.volume and cfg.backup_dir.is_dir() else contextlib.nullcontext()  # no volume: nothing to hold


def start_wal_receiver(config_path: str | None, stop: Any, pid_variable: str) -> Any:
    """The daemon's WAL receiver (WAL_ARCHIVING=true): `wal-receive` supervised in a thread until `stop` is set."""
    from sidecar.physical.receiver import supervise

    return supervise(config_path, stop, pid_variable)


def restore_to_point_in_database(config: Config | None, to_time: str | None, to_lsn: str | None, to_latest: bool, target_db: str,
                                 from_remote: bool = False, *, to_restore_point: str | None = None, to_xid: str | None = None,
                                 exclusive: bool = False, timeline: str | None = None) -> RestoreReport:
    """The database of DATABASE_URL as it was at the target, into `target_db` of the live server: base backup + WAL
    into a scratch directory, a scratch PostgreSQL (same major version) recovers and promotes, the database is backed up
    from it (pg_dump, row counts) into a scratch repository and restored through the logical restore (new database,
    row counts, validation, swap when `target_db` exists). The live server's data directory is never touched."""
    import shutil
    from dataclasses import replace

    from sidecar.physical.pitr import ScratchServer, parse_target, restore_to_data_dir, scratch_directory

    cfg = _config(config)
    target = parse_target(to_time, to_lsn, to_latest, to_restore_point, to_xid, exclusive, timeline)

    root = scratch_directory()
    try:
        with _reading(cfg):  # until replayed: prune leaves them
            if from_remote:  # base backup and WAL from the remote store alone
                from sidecar.physical.offsite import restore_from_remote

                result = restore_from_remote(cfg, target, root / "data")
            else:
                result = restore_to_data_dir(cfg, target, root / "data")
            server = ScratchServer(cfg, root, result.get("serverMajor"))
            scratch_url = server.start_promoted(cfg, target.describe())
        try:
            log.info("scratch server recovered to %s; backing up %s from it", result["target"], cfg.database_name)
            dump_cfg = replace(cfg, database_url=scratch_url, password_file=None, backup_dir=root / "repository", encryption=False, recipients=(),
                               remote=None, data_dir=None, drill_database_url=None, retention_days=0)
            taken = _backup.create_backup(dump_cfg, label=f"point-in-time {result['target']} from base backup {result['baseBackup']}")
        finally:
            server.stop()
        return _restore.restore_backup(replace(cfg, backup_dir=root / "repository"), taken["id"], target_db=target_db)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def restore_tables(config: Config | None, tables: list[str], ref: str | None = None, *, suffix: str | None = None, target_db: str | None = None,
                   to_time: str | None = None, to_lsn: str | None = None, to_latest: bool = False, to_restore_point: str | None = None,
                   to_xid: str | None = None, exclusive: bool = False, timeline: str | None = None, from_remote: bool = False,
                   database: str | None = None) -> TableRestoreReport:
    """Chosen tables (`schema.name`) beside the live ones: from the backup `ref`, or as they were at a point in time (a
    target as for restore_to_point). Into the live database under new names (`suffix`, default `_pitr` for a point in
    time, `_restored` for a backup), or into `target_db` under their own; with their rows, indexes and constraints that
    stand alone (foreign keys to tables not restored are left out). A name already taken is refused before anything.
    `from_remote` (always without a volume): the backup, or the base backup and WAL, read from the remote store alone
    (for a point in time: every target, as from the volume). `database`: of a whole server's backup set, the database
    whose tables to restore (they go back into it); a set needs it, a point in time refuses it (DATABASE_URL's database)."""
    from sidecar.logical import tables as _tables

    cfg = _config(config)
    if not tables:
        raise UsageError("give at least one --table schema.name")
    remote = from_remote or not cfg.volume
    if ref is not None:
        if any((to_time, to_lsn, to_latest, to_restore_point, to_xid, exclusive, timeline)):
            raise UsageError("give a backup id or a point in time (--to-time ...), not both")
        return _tables.restore_tables_from_backup(cfg, ref, tables, suffix, target_db, database=database,
                                                  store=remote_store(cfg) if remote else None)
    from sidecar.physical.pitr import parse_target

    target = parse_target(to_time, to_lsn, to_latest, to_restore_point, to_xid, exclusive, timeline)
    if database is not None:
        raise UsageError("a point in time restores tables of DATABASE_URL's database (the one the base backups were taken with); "
                         "leave out --database, or restore from a logical backup set: restore ID --database NAME --table S.T")
    with _reading(cfg):  # a prune run beside it (the daemon's, with the volume) leaves the base backups and WAL alone
        return _tables.restore_tables_to_point(cfg, target, tables, suffix, target_db, from_remote=remote)


def find_moment(config: Config | None, table: str, kind: str, before: str | None = None, existed_at: str | None = None) -> Moment:
    """The transaction that dropped the table (kind `dropped`), emptied or rewrote it (`truncated`) or last wrote to it
    (`last-write`), committed before `before` (ISO 8601, with a time zone), read from the archived WAL; its Moment gives
    the target that stops just before it. NothingFound (exit 1) when the table is unknown or nothing is found."""
    from sidecar.physical.find import find_moment as _find

    cfg = _config(config)
    with _reading(cfg):
        return _find(cfg, table, kind, _moment(before, "--before"), _moment(existed_at, "--existed-at"))


def _moment(text: str | None, option: str) -> datetime | None:
    from sidecar.physical.pitr import parse_moment

    return None if text is None else parse_moment(text, option)
