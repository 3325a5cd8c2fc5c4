"""The recovery window: per system and timeline, the earliest and the latest moment a point-in-time restore can reach.

- earliest: when the oldest good base backup that can reach the timeline finished (a restore `--to-time` needs a base
  backup that ended before its target: `choose_base`).
- latest: the commit (or abort) time of the newest transaction in the archived WAL that a good base backup reaches
  without a gap, read from that segment with pg_waldump: the database as it was then is recoverable, exactly. PostgreSQL
  stops a `--to-time T` recovery before the first commit later than T, and ends with an error when the archived WAL has
  none; so `--to-time` reaches every moment before `latest`, and `--to-latest` (everything archived, and the receiver's
  newest partial segment when WAL is staged) reaches `latest` itself. When pg_waldump cannot read the WAL here (another
  major version; encrypted WAL and no key), the newest segment's archive time stands in, marked `archived-at`: an upper
  bound (commits after the last archived one may be before it).

`windows` is pure (the archive's segment numbers, the base backups' metadata and a lookup of a segment's last commit
time); `WindowReader` does the reading and remembers each segment's answer (archived segments never change)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar import age
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.physical.wal import Timeline, WalArchive, parse_lsn, segment_name, segment_of
from sidecar.repository import iso_timestamp

log = logging.getLogger(__name__)
LOOK_BACK = 8  # segments searched backwards for the newest commit (a quiet server switches segments with no commit in them)


@dataclass(frozen=True)
class SegmentTimes:
    last_commit: datetime | None  # the last commit/abort in the segment; None if it has none (or it could not be read)
    readable: bool  # pg_waldump read it
    archived_at: datetime | None


Lookup = Callable[[str, str], SegmentTimes]


@dataclass
class Window:
    system_id: str
    timeline: int
    earliest: datetime | None = None
    earliest_backup: str | None = None
    latest: datetime | None = None
    latest_basis: str = "none"  # last-commit | archived-at | none
    latest_segment: str | None = None
    gaps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"systemIdentifier": self.system_id, "timeline": self.timeline,
                "earliest": iso_timestamp(self.earliest) if self.earliest else None, "earliestBaseBackup": self.earliest_backup,
                # to the microsecond, as PostgreSQL records it: a --to-time cut to the millisecond would stop before the last commit
                "latest": self.latest.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z") if self.latest else None,
                "latestBasis": self.latest_basis,
                "latestSegment": self.latest_segment, "gaps": self.gaps}


def _finished(meta: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(meta["finishedAt"]).replace("Z", "+00:00"))


def _run_end(segnos: list[int], start: int) -> int | None:
    """The last segment of the contiguous run of `segnos` (sorted) that contains `start`; None if `start` is missing."""
    if start not in segnos:
        return None
    at = segnos.index(start)
    while at + 1 < len(segnos) and segnos[at + 1] == segnos[at] + 1:
        at += 1
    return segnos[at]


def windows(timelines: list[Timeline], bases: list[dict[str, Any]], lookup: Lookup) -> list[Window]:
    """Each archived timeline's recovery window from the good base backups' metadata (pure but for `lookup`). A base backup
    reaches its own timeline up to the end of the contiguous WAL from its start; a later timeline of the same system from
    that timeline's first archived segment up to its first gap (a promoted server's WAL continues its parent's)."""
    found = []
    for line in timelines:
        window = Window(line.system_id, line.timeline, gaps=line.gap_names())
        found.append(window)
        mine = [b for b in bases if str(b.get("systemIdentifier")) == line.system_id and int(b.get("timeline", 0)) <= line.timeline]
        if not mine or not line.segnos:
            continue
        ends = []
        for meta in mine:
            size = int(meta["walSegmentSize"])
            start = segment_of(parse_lsn(meta["startLsn"]), size) if int(meta["timeline"]) == line.timeline else line.segnos[0]
            end = _run_end(line.segnos, start)
            if end is not None:
                ends.append((end, meta))
        if not ends:
            continue
        oldest = min((meta for _, meta in ends), key=_finished)
        window.earliest, window.earliest_backup = _finished(oldest), str(oldest["id"])
        end = max(e for e, _ in ends)
        reaching = [m for e, m in ends if e == end]
        starts = [segment_of(parse_lsn(m["startLsn"]), int(m["walSegmentSize"])) for m in reaching if int(m["timeline"]) == line.timeline]
        floor = min(starts) if len(starts) == len(reaching) else line.segnos[0]
        window.latest_segment = segment_name(line.timeline, end, line.segment_size)
        newest = lookup(line.system_id, window.latest_segment)
        for segno in range(end, max(floor, end - LOOK_BACK + 1) - 1, -1):
            times = newest if segno == end else lookup(line.system_id, segment_name(line.timeline, segno, line.segment_size))
            if not times.readable:
                break
            if times.last_commit is not None:
                window.latest, window.latest_basis = max(times.last_commit, window.earliest), "last-commit"
                break
        if window.latest is None and not newest.readable and newest.archived_at is not None:
            window.latest, window.latest_basis = newest.archived_at, "archived-at"
        if window.latest is None and newest.readable and end - floor < LOOK_BACK:  # no commit since the base backups began
            window.latest, window.latest_basis = max(_finished(m) for m in reaching), "last-commit"
    return found


class WindowReader:
    """The lookup for `windows`: a segment's last commit time by pg_waldump (decoded into a scratch file, sha256 checked),
    remembered per segment (at most `keep`), since an archived segment never changes."""

    def __init__(self, config: Config, keep: int = 256) -> None:
        self.config = config
        self.archive = WalArchive(config.backup_dir)
        self.keep = keep
        self._seen: OrderedDict[tuple[str, str], SegmentTimes] = OrderedDict()
        self._lock = threading.Lock()
        self.major: int | None = None  # pg_waldump reads the WAL of its own major version only
        self._identity: age.Identities | None = None
        if config.identity_file:
            try:
                self._identity = age.parse_identities(config.identity_file)
            except (SidecarError, OSError):
                self._identity = None

    def __call__(self, system: str, name: str) -> SegmentTimes:
        with self._lock:
            if (system, name) in self._seen:
                self._seen.move_to_end((system, name))
                return self._seen[(system, name)]
        times = self._read(system, name)
        with self._lock:
            self._seen[(system, name)] = times
            while len(self._seen) > self.keep:
                self._seen.popitem(last=False)
        return times

    def _read(self, system: str, name: str) -> SegmentTimes:
        from sidecar.physical.pitr import scan_segment, waldump_tool

        record = self.archive.record(system, name) or {}
        try:
            archived_at = datetime.fromisoformat(str(record.get("archivedAt", "")).replace("Z", "+00:00"))
        except ValueError:
            archived_at = None
        tool = waldump_tool(self.config, self.major)
        if tool is None or (record.get("encrypted") and self._identity is None):
            return SegmentTimes(None, False, archived_at)
        try:
            scan = scan_segment(self.archive, system, name, tool, self._identity)
        except (SidecarError, OSError) as exc:
            log.warning("the commit times of WAL segment %s cannot be read: %s", name, exc)
            scan = None
        if scan is None:
            return SegmentTimes(None, False, archived_at)
        return SegmentTimes(scan.last_commit, True, archived_at)

    def windows(self) -> list[Window]:
        from sidecar.physical.base import list_base_backups

        good = [b.metadata for b in list_base_backups(self.config) if b.good]
        self.major = int(good[0]["serverMajor"]) if good and good[0].get("serverMajor") else None
        return windows(self.archive.timelines(), good, self)
