"""Which local backups are off-site, and copying the ones that are not.

A backup copied to the remote gets a small record on the volume, `.offsite/<id>.json` (the remote's URL, when, how
many bytes), written only once copy_backup has written the remote metadata object, i.e. once the remote backup is
complete. A good local backup without a record for the configured remote is pending. The records make the pending
count and the time of the last copy known without asking the store (so the metrics stay right while it is down and
after a restart); a lost record only means one more copy, which finds every object already there and writes nothing."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sidecar.errors import SidecarError
from sidecar.repository import Entry, Repository, iso_timestamp, write_atomically
from sidecar.storage.base import StorageError, Store
from sidecar.storage.copy import CopyResult, copy_backup
from sidecar.storage.remote import RemoteConfig

log = logging.getLogger(__name__)

OFFSITE_DIR = ".offsite"


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
    return record is not None and record.get("url") == remote.url and record.get("endpoint") == remote.endpoint


def pending(repo: Repository, remote: RemoteConfig, entries: list[Entry] | None = None) -> list[Entry]:
    """Good local backups not yet copied to `remote`, oldest first (the order they are copied in)."""
    listed = repo.entries() if entries is None else entries
    return sorted((e for e in listed if e.good and not is_copied(repo, e.id, remote)), key=lambda e: e.id)


def last_copy_time(repo: Repository, remote: RemoteConfig) -> float:
    """Unix time of the newest completed copy to `remote` recorded on the volume (0 if none)."""
    newest = 0.0
    try:
        paths = list((repo.dir / OFFSITE_DIR).glob("*.json"))
    except OSError:
        return newest
    for path in paths:
        record = read_record(repo, path.name.removesuffix(".json"))
        if record and record.get("url") == remote.url and record.get("endpoint") == remote.endpoint:
            try:
                newest = max(newest, datetime.fromisoformat(str(record["at"]).replace("Z", "+00:00")).timestamp())
            except (KeyError, ValueError):
                continue
    return newest


def forget(repo: Repository, backup_id: str) -> None:
    """The local backup is gone (pruned): its record goes too."""
    record_path(repo, backup_id).unlink(missing_ok=True)


def copy_entry(repo: Repository, entry: Entry, store: Store, remote: RemoteConfig) -> CopyResult:
    """Copy one good local backup (data objects first, metadata last), then record it as off-site."""
    if entry.metadata is None:
        raise StorageError(f"cannot copy {entry.id}: {entry.problem or 'no readable metadata'}")
    result = copy_backup(repo.dir, entry.metadata, store)
    repo.make_dir(repo.dir / OFFSITE_DIR)
    record = {"id": entry.id, "url": remote.url, "endpoint": remote.endpoint, "at": iso_timestamp(datetime.now(UTC)),
              "bytes": result.bytes, "objects": len(result.uploaded) + len(result.present)}
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
