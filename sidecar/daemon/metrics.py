"""Prometheus metrics. State that lives on the volume is read by a collector at scrape time, so the
numbers are right after a restart; events (a backup finished) are counted directly."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.config import CHECK_NAMES
from sidecar.physical.observe import SLOT_STATUSES
from sidecar.repository import FUTURE_TOLERANCE, Entry, Repository, newest_good
from sidecar.storage import offsite
from sidecar.storage.remote import RemoteConfig

log = logging.getLogger(__name__)

Listing = Callable[[], list[Entry]]


class CachedListing:
    """The backups in the bucket, for a sidecar without a volume (BACKUP_VOLUME=false): a listing costs a request per
    metadata object, so it is refreshed at most every `ttl` seconds; while the store fails, the last good listing stays
    (and the failure is logged), so an unreachable bucket does not make every backup look gone."""

    def __init__(self, fetch: Listing, ttl: float = 60.0) -> None:
        self.fetch, self.ttl = fetch, ttl
        self._entries: list[Entry] = []
        self._at = -math.inf
        self._lock = threading.Lock()

    def __call__(self) -> list[Entry]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._entries = self.fetch()
                except Exception as exc:  # noqa: BLE001 - a scrape must answer; the next one tries again
                    log.warning("the backups in the remote store could not be listed for the metrics: %s", exc)
                self._at = time.monotonic()
            return list(self._entries)

    def forget(self) -> None:
        """A backup was just made: list again at the next scrape."""
        with self._lock:
            self._at = -math.inf


# no `*_created` series next to every counter and histogram: nothing reads them, and they double the exposition
disable_created_metrics()  # type: ignore[no-untyped-call]


def completed_at(entry: Entry) -> float:
    """When a backup ended (its metadata's completedAt), as a Unix time."""
    meta = entry.metadata or {}
    return _iso(meta.get("completedAt") or meta.get("timestamp")) or entry.timestamp.timestamp()


class RepositoryCollector(Collector):
    def __init__(self, repo: Repository, entries: Listing | None = None) -> None:
        self.repo = repo
        self.entries = entries or repo.entries  # without a volume: the bucket's backups (CachedListing)

    def collect(self) -> Iterator[Metric]:
        entries = self.entries()
        now = time.time()
        # a backup stamped in the future (the clock was ahead, then corrected) would make the age
        # negative for as long as the jump was, and PgBackupTooOld could not fire; it is counted instead
        moment = datetime.fromtimestamp(now, UTC)
        future = sum(1 for e in entries if e.timestamp > moment + FUTURE_TOLERANCE)
        newest = newest_good(entries, moment, include_future=False)
        last = completed_at(newest) if newest else 0.0
        yield GaugeMetricFamily("pg_backup_last_success_timestamp_seconds", "End time of the newest good backup (0 if none).", value=last)
        yield GaugeMetricFamily("pg_backup_age_seconds", "Seconds since the newest good backup ended (+Inf if none).",
                                value=now - last if newest else math.inf)
        yield GaugeMetricFamily("pg_backup_future_backups", "Backups stamped more than 5 minutes in the future: the clock jumped back.",
                                value=future)
        yield GaugeMetricFamily("pg_backup_last_size_bytes", "Size of the newest good backup.",
                                value=float(newest.metadata["size"]) if newest and newest.metadata else 0.0)
        yield GaugeMetricFamily("pg_backup_repository_backups", "Backups on the volume.", value=len(entries))
        total = sum(item["size"] for e in entries if e.metadata for item in e.metadata["files"].values())
        yield GaugeMetricFamily("pg_backup_repository_size_bytes", "Bytes of backups on the volume.", value=total)
        try:
            stat = os.statvfs(self.repo.dir)
            free = float(stat.f_bavail * stat.f_frsize)
        except OSError:
            free = math.nan
        yield GaugeMetricFamily("pg_backup_volume_free_bytes", "Free bytes on the backup volume.", value=free)
        drills = [e for e in entries if e.metadata and (e.metadata.get("verified") or {}).get("ok")]
        yield GaugeMetricFamily("pg_backup_drill_last_success_timestamp_seconds", "Last restore drill that passed (0 if none).",
                                value=max((_iso(e.metadata["verified"]["at"]) for e in drills if e.metadata), default=0.0))
        last_drill = max(((_iso(e.metadata["verified"].get("at")), e.metadata["verified"]) for e in entries
                          if e.metadata and isinstance(e.metadata.get("verified"), dict)), key=lambda item: item[0], default=None)
        yield GaugeMetricFamily("pg_backup_drill_last_preexisting_findings",
                                "Validation findings the last drill saw that were recorded already when its backup was taken (reported, not failed on).",
                                value=len(last_drill[1].get("preexisting") or []) if last_drill else 0)


REMOTE_OPERATIONS = ("copy", "wal-copy")  # always exported (at 0 until the first one), so increase() sees the first event


class RemoteCollector(Collector):
    """The off-site copies, from what is on the volume (sidecar/storage/offsite.py): the copy records, and the counters
    that every process writing to the store adds to (the daemon, its backup children, `copy` run by hand), so every
    upload and failure is counted once whichever process did it. Right while the store is down and after a restart, and
    no request to the store per scrape. No label carries the URL, the bucket or a key."""

    def __init__(self, repo: Repository, remote: RemoteConfig, in_bucket: Listing | None = None) -> None:
        self.repo, self.remote, self.in_bucket = repo, remote, in_bucket

    def collect(self) -> Iterator[Metric]:
        if self.in_bucket is not None:  # no volume: every backup is written to the bucket, nothing waits for a copy
            newest = newest_good(self.in_bucket(), datetime.now(UTC), include_future=False)
            yield GaugeMetricFamily("pg_backup_remote_last_copy_timestamp_seconds", "End time of the last completed off-site copy (0 if none).",
                                    value=completed_at(newest) if newest else 0.0)
            yield GaugeMetricFamily("pg_backup_remote_pending_backups", "Good local backups not yet copied to the remote store.", value=0)
            yield GaugeMetricFamily("pg_backup_remote_age_seconds",
                                    "Seconds since the newest backup that is off-site ended: what a lost cluster would lose (+Inf if none).",
                                    value=time.time() - completed_at(newest) if newest else math.inf)
            yield from self._shared()
            return
        entries, copied = self.repo.entries(), offsite.copies(self.repo, self.remote)  # each record read once per scrape
        yield GaugeMetricFamily("pg_backup_remote_last_copy_timestamp_seconds", "End time of the last completed off-site copy (0 if none).",
                                value=offsite.last_copy_time(self.repo, self.remote, copied))
        yield GaugeMetricFamily("pg_backup_remote_pending_backups", "Good local backups not yet copied to the remote store.",
                                value=len(offsite.pending(self.repo, self.remote, entries, copied)))
        newest = offsite.newest_copied(self.repo, self.remote, entries, copied)
        yield GaugeMetricFamily("pg_backup_remote_age_seconds",
                                "Seconds since the newest backup that is off-site ended: what a lost cluster would lose (+Inf if none).",
                                value=time.time() - completed_at(newest) if newest else math.inf)
        yield from self._shared()

    def _shared(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pg_backup_remote_last_verify_timestamp_seconds",
                                "Time a remote copy was last read back whole and matched its metadata (verify --remote; 0 if never).",
                                value=offsite.last_verified_time(self.repo, self.remote))
        totals = offsite.counters(self.repo)
        for family, name, text in (
                ("upload_bytes", "pg_backup_remote_upload_bytes_total", "Bytes written to the remote store, by operation (objects found already there count nothing)."),
                ("upload_seconds", "pg_backup_remote_upload_seconds_total", "Seconds spent writing objects to the remote store, by operation."),
                ("errors", "pg_backup_remote_errors_total", "Failed operations on the remote store (after their retries), by operation, whichever process ran them.")):
            counter = CounterMetricFamily(name.removesuffix("_total"), text, labels=["operation"])
            values = totals.get(family, {})
            always = (*REMOTE_OPERATIONS, "verify", "drill") if family == "errors" else REMOTE_OPERATIONS  # reads fail too, never upload
            for operation in sorted({*always, *values}):
                counter.add_metric([operation], values.get(operation, 0.0))
            yield counter


class WalCollector(Collector):
    """WAL archiving (WAL_ARCHIVING=true, issue 13), from `state()` (api.wal_watcher): label-free gauges, and the slot's
    wal_status as one series per value of a fixed set (1 for the current one), so no label grows without bound."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.state()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer
            log.warning("the WAL archiving state could not be read for the metrics: %s", exc)
            s = {}
        now = time.time()
        nan = math.nan

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        yield gauge("pg_backup_wal_receiver_up", "1 if a WAL receiver streams from the replication slot (the slot is active), else 0.",
                    s.get("receiver_up", 0.0))
        last = s.get("last_archived", nan)
        yield gauge("pg_backup_wal_last_archived_timestamp_seconds", "When the newest WAL segment was archived (NaN if none).", last)
        yield gauge("pg_backup_wal_archive_age_seconds", "Seconds since the newest WAL segment was archived (+Inf if none).",
                    now - last if not math.isnan(last) else math.inf)
        yield gauge("pg_backup_wal_unarchived_segments", "WAL segments the server has completed that are not archived yet (NaN if unknown).",
                    s.get("unarchived_segments", nan))
        yield gauge("pg_backup_wal_slot_retained_bytes", "WAL bytes the replication slot holds back on the database server (NaN if no slot).",
                    s.get("slot_retained", nan))
        yield gauge("pg_backup_wal_slot_keep_limit_bytes",
                    "The server's max_slot_wal_keep_size in bytes: a slot holding back more loses WAL (+Inf: no limit, the disk fills instead).",
                    s.get("slot_keep_limit", nan))
        status = GaugeMetricFamily("pg_backup_wal_slot_status", "The replication slot's wal_status (missing: no slot; unknown: not asked).",
                                   labels=["status"])
        for value in SLOT_STATUSES:
            status.add_metric([value], 1.0 if s.get("slot_status", "unknown") == value else 0.0)
        yield status
        yield gauge("pg_backup_wal_spool_bytes", "Bytes in the WAL spool on the backup volume (the newest partial segment and any not yet archived).",
                    s.get("spool_bytes", nan))
        yield gauge("pg_backup_wal_gaps", "Missing runs of segments in the WAL archived since the newest good base backup began.",
                    s.get("gaps", nan))
        yield gauge("pg_backup_recovery_window_first_timestamp_seconds", "Earliest moment a point-in-time restore reaches (NaN if none).",
                    s.get("first", nan))
        yield gauge("pg_backup_recovery_window_last_timestamp_seconds",
                    "Latest moment a point-in-time restore --to-time reaches: the last archived commit (NaN if none).", s.get("last", nan))
        base = s.get("base_finished", nan)
        yield gauge("pg_backup_base_backup_last_success_timestamp_seconds", "End time of the newest good base backup (NaN if none).", base)
        yield gauge("pg_backup_base_backup_age_seconds", "Seconds since the newest good base backup ended (+Inf if none).",
                    now - base if not math.isnan(base) else math.inf)


class PitrDrillCollector(Collector):
    """PITR drills (issue 16), from their record on the volume (wal/.pitr-drill.json), which every process that runs one
    writes (the daemon's children, `drill --pitr` by hand): right after a restart, each drill counted once."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def collect(self) -> Iterator[Metric]:
        from sidecar.physical.drill import read_record

        data = read_record(self.repo.dir)
        last = data.get("last") or {}
        yield GaugeMetricFamily("pg_backup_pitr_drill_last_success_timestamp_seconds", "End time of the last PITR drill that passed (0 if none).",
                                value=_iso((data.get("lastSuccess") or {}).get("finishedAt")))
        yield GaugeMetricFamily("pg_backup_pitr_drill_last_failure_timestamp_seconds", "End time of the last PITR drill that failed (0 if none).",
                                value=_iso((data.get("lastFailure") or {}).get("finishedAt")))
        yield GaugeMetricFamily("pg_backup_pitr_drill_last_ok", "1 if the last PITR drill passed, 0 if it failed (NaN before the first).",
                                value=(1.0 if last.get("ok") else 0.0) if last else math.nan)
        yield GaugeMetricFamily("pg_backup_pitr_drill_last_duration_seconds", "Wall time of the last PITR drill (NaN before the first).",
                                value=float(last.get("duration_seconds", math.nan)) if last else math.nan)
        yield CounterMetricFamily("pg_backup_pitr_drill_failures", "PITR drills that failed (a restore to their restore point failed or "
                                  "gave other row counts).", value=float(data.get("failed", 0)))
        yield CounterMetricFamily("pg_backup_pitr_drill_passes", "PITR drills that passed.", value=float(data.get("passed", 0)))


def _iso(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class Metrics:
    def __init__(self, repo: Repository, registry: CollectorRegistry | None = None, in_bucket: CachedListing | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.in_bucket = in_bucket  # without a volume: the backups are listed from the bucket
        r = self.registry
        self.duration = Histogram("pg_backup_duration_seconds", "Wall time of backups.", registry=r,
                                  buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, math.inf))
        self.runs = Counter("pg_backup_runs_total", "Backups by result.", ["result"], registry=r)
        self.last_failure = Gauge("pg_backup_last_failure_timestamp_seconds", "Time of the last failed backup (0 if none).", registry=r)
        self.validation_failures = Counter("pg_backup_validation_failures_total", "Consistency findings by check.", ["check"], registry=r)
        self.last_validation_ok = Gauge("pg_backup_last_validation_ok", "1 if the last validation was clean, else 0.", registry=r)
        self.restores = Counter("pg_backup_restores_total", "Restores by result.", ["result"], registry=r)
        self.drills = Counter("pg_backup_drills_total", "Restore drills by result.", ["result"], registry=r)
        self.in_progress = Gauge("pg_backup_in_progress", "1 while a backup/restore/drill runs.", ["operation"], registry=r)
        self.database_up = Gauge("pg_backup_database_up", "1 if the sidecar could connect to PostgreSQL at its last probe (every few seconds), else 0.",
                                 registry=r)
        info = Gauge("pg_backup_info", "Sidecar version.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        for result in ("success", "failure"):
            self.runs.labels(result=result)
            self.restores.labels(result=result)
            self.drills.labels(result=result)
        self.drills.labels(result="skipped")  # an encrypted backup and no identity here: checksums verified only
        for check in CHECK_NAMES:  # present from the start, so increase() sees the first finding
            self.validation_failures.labels(check=check)
        for operation in ("backup", "restore", "drill"):
            self.in_progress.labels(operation=operation).set(0)
        self.last_validation_ok.set(1)
        self.repo = repo
        r.register(RepositoryCollector(repo, in_bucket))
        r.register(PitrDrillCollector(repo))
        self.in_progress.labels(operation="pitr_drill").set(0)
        self.pitr_drill_scheduled = Gauge("pg_backup_pitr_drill_scheduled", "1 if the daemon runs PITR drills (PITR_DRILL_SCHEDULE), else 0.",
                                          registry=r)

    def watch_remote(self, remote: RemoteConfig) -> None:
        """Export the off-site copies' state and counters (a remote store is configured): see RemoteCollector."""
        self.registry.register(RemoteCollector(self.repo, remote, self.in_bucket))

    def watch_wal(self, state: Callable[[], dict[str, Any]]) -> None:
        """Export WAL archiving's state (WAL_ARCHIVING=true): see WalCollector."""
        self.registry.register(WalCollector(state))

    def backup_finished(self, seconds: float, metadata: dict[str, Any] | None) -> None:
        self.duration.observe(seconds)
        if metadata is None:
            self.runs.labels(result="failure").inc()
            self.last_failure.set(time.time())
            return
        self.runs.labels(result="success").inc()
        if self.in_bucket is not None:
            self.in_bucket.forget()
        validation = metadata.get("validation")
        if validation is not None:
            self.last_validation_ok.set(1 if validation["ok"] else 0)
            for finding in validation["findings"]:
                self.validation_failures.labels(check=finding["check"]).inc()
