"""What the metrics say about WAL archiving (issue 13): read at scrape time from the volume (the archive, the spool, the
base backups) and from the server (the slot; one short query, answered from a cache for `ttl` seconds). Label-free
numbers, and the slot's wal_status as one of a fixed set of values."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from datetime import datetime
from typing import Any

from sidecar.config import Config
from sidecar.physical.base import list_base_backups
from sidecar.physical.receiver import spool_dir
from sidecar.physical.wal import SEGMENT, WalArchive, parse_segment, segment_name
from sidecar.physical.window import WindowReader

log = logging.getLogger(__name__)
SLOT_STATUSES = ("reserved", "extended", "unreserved", "lost", "missing", "unknown")  # unknown: the server could not be asked


def _when(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.nan


class SlotProbe:
    """The slot's state on the server: active (a receiver streams from it), wal_status, the bytes it holds back
    (pg_current_wal_lsn() - restart_lsn) and the server's current WAL file. Asked at most every `ttl` seconds."""

    def __init__(self, config: Config, ttl: float = 5.0) -> None:
        self.config, self.ttl = config, ttl
        self._at = -math.inf
        self._state: dict[str, Any] = {"status": "unknown"}
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                self._state = self._ask()
                self._at = time.monotonic()
            return dict(self._state)

    def _ask(self) -> dict[str, Any]:
        from sidecar.postgres import connect

        try:
            with connect(self.config) as conn:
                current = conn.execute("SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END").fetchone()
                keep = conn.execute("SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'").fetchone()
                row = conn.execute("SELECT active, coalesce(wal_status, 'missing'), CASE WHEN restart_lsn IS NULL OR pg_is_in_recovery() THEN NULL "
                                   "ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) END FROM pg_replication_slots WHERE slot_name = %s",
                                   (self.config.wal_slot_name,)).fetchone()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer; the database probe logs why
            log.debug("the replication slot could not be read for the metrics: %s", exc)
            return {"status": "unknown"}
        limit = math.inf if keep is None or keep[0] < 0 else float(keep[0]) * (1 << 20)  # MB; -1: the slot may keep any amount
        state: dict[str, Any] = {"current": current[0] if current else None, "keep_limit": limit}
        if row is None:
            return {**state, "status": "missing", "active": False}
        status = str(row[1]) if str(row[1]) in SLOT_STATUSES else "unknown"
        return {**state, "status": status, "active": bool(row[0]), "retained": float(row[2]) if row[2] is not None else math.nan}


def _holes(good: list[Any], mine: list[Any]) -> list[str]:
    """The first missing segment of each run missing from the WAL archived since the newest good base backup began
    (on its timeline and later ones): what a restore from it to a later moment could not replay."""
    if not good:
        return []
    newest_base = good[0].metadata
    size = int(newest_base["walSegmentSize"])
    start = parse_segment(str(newest_base["startWal"]), size)[1]
    out = []
    for line in mine:
        if line.timeline >= int(newest_base["timeline"]):
            after = [n for n in line.segnos if n >= start] if line.timeline == int(newest_base["timeline"]) else line.segnos
            out += [segment_name(line.timeline, a + 1, size) for a, b in zip(after, after[1:], strict=False) if b > a + 1]
    return out


def archive_hole(config: Config) -> tuple[str, str] | None:
    """(system, first missing segment) when the archive has a hole after the newest good base backup's start, the same
    rule as pg_backup_wal_gaps: the daemon answers it with a base backup as it answers a gap the receiver noted."""
    good = [b for b in list_base_backups(config) if b.good]
    if not good:
        return None
    system = str(good[0].metadata["systemIdentifier"])
    holes = _holes(good, [t for t in WalArchive(config.backup_dir).timelines() if t.system_id == system and t.segnos])
    return (system, holes[0]) if holes else None


def wal_state(config: Config, reader: WindowReader, probe: SlotProbe) -> dict[str, Any]:
    """The numbers behind the WAL metrics (see sidecar/daemon/metrics.py WalCollector)."""
    archive = WalArchive(config.backup_dir)
    slot = probe()
    timelines = archive.timelines()
    windows = reader.windows()
    good = [b for b in list_base_backups(config) if b.good]
    system = str(good[0].metadata["systemIdentifier"]) if good else (timelines[-1].system_id if timelines else None)
    mine = [t for t in timelines if t.system_id == system and t.segnos]
    last_archived = math.nan
    if mine:
        newest = max(mine, key=lambda t: (t.segnos[-1], t.timeline))
        record = archive.record(newest.system_id, newest.last or "") or {}
        last_archived = _when(record.get("archivedAt"))
    unarchived = math.nan
    current = slot.get("current")
    if current and SEGMENT.fullmatch(str(current)) and mine:
        size = mine[0].segment_size
        timeline, segno = parse_segment(str(current), size)
        on = [t for t in mine if t.timeline == timeline]
        if on:
            unarchived = float(max(0, segno - on[0].segnos[-1] - 1))
    window = max((w for w in windows if w.system_id == system and w.earliest), key=lambda w: w.timeline, default=None)
    gaps = len(_holes(good, mine)) if window is not None else 0
    spool = 0
    try:
        with os.scandir(spool_dir(config)) as entries:
            spool = sum(e.stat().st_size for e in entries if e.is_file() and not e.name.startswith("."))
    except OSError:
        pass
    base_finished = max((_when(b.metadata.get("finishedAt")) for b in good), default=math.nan)
    return {"receiver_up": 1.0 if slot.get("active") else 0.0, "slot_status": slot.get("status", "unknown"),
            "slot_retained": slot.get("retained", math.nan), "slot_keep_limit": slot.get("keep_limit", math.nan), "last_archived": last_archived, "unarchived_segments": unarchived,
            "spool_bytes": float(spool), "gaps": float(gaps),
            "first": window.earliest.timestamp() if window and window.earliest else math.nan,
            "last": window.latest.timestamp() if window and window.latest else math.nan, "base_finished": base_finished}
