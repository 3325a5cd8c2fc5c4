"""Point-in-time restore into a data directory (disaster recovery of a whole server): the newest good base backup
that ends before the target, extracted (streaming, every file checked against its manifest), WAL from our archive
through `restore_command` (`wal-fetch`, sha256 checked), the recovery target, `recovery.signal`, promote."""

from __future__ import annotations

import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import age
from sidecar.config import Config
from sidecar.errors import ChecksumMismatch, NotFound, SidecarError, UsageError
from sidecar.physical import tar
from sidecar.physical.base import BaseBackup, DamagedBase, chain_of, identities, list_base_backups, materialise
from sidecar.physical.receiver import spool_dir
from sidecar.physical.wal import HISTORY, PARTIAL, SEGMENT, WalArchive, copy_into_place, format_lsn, parse_lsn, parse_segment, segment_name, segment_of, spool_segment
from sidecar.repository import iso_timestamp

log = logging.getLogger(__name__)
SERVER_USER = "postgres"


@dataclass(frozen=True)
class Target:
    kind: str  # time | lsn | latest | name (a restore point) | xid
    time: datetime | None = None
    lsn: int | None = None
    name: str | None = None
    xid: int | None = None
    inclusive: bool = True  # PostgreSQL's recovery_target_inclusive: stop just after the target (or, false, just before)
    timeline: str = "latest"  # latest | current | a timeline number

    def describe(self) -> str:
        if self.kind == "time" and self.time:
            text = f"time {iso_timestamp(self.time)}"
        elif self.kind == "lsn" and self.lsn is not None:
            text = f"LSN {format_lsn(self.lsn)}"
        elif self.kind == "name":
            text = f"restore point '{self.name}'"
        elif self.kind == "xid":
            text = f"transaction {self.xid}"
        else:
            text = "the latest archived WAL"
        if not self.inclusive:
            text = "just before " + text
        return text + (f" on timeline {self.timeline}" if self.timeline != "latest" else "")


MAX_RESTORE_POINT = 63  # PostgreSQL's MAXFNAMELEN - 1


def parse_moment(text: str, option: str) -> datetime:
    """An ISO 8601 time with a time zone (`option` names it in the error), in UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{option} '{text[:60]}' is not a time; write it like 2026-11-26T14:32:05Z") from None
    if moment.tzinfo is None:
        raise UsageError(f"{option} '{text[:60]}' has no time zone; add Z (UTC) or an offset like +01:00")
    return moment.astimezone(UTC)


def parse_target(to_time: str | None, to_lsn: str | None, to_latest: bool, to_restore_point: str | None = None, to_xid: str | None = None,
                 exclusive: bool = False, timeline: str | None = None) -> Target:
    given = [x for x in (to_time, to_lsn, to_latest or None, to_restore_point, to_xid) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of --to-time T, --to-lsn L, --to-restore-point NAME, --to-xid N, --to-latest")
    line = parse_timeline(timeline)
    if exclusive and (to_latest or to_restore_point):
        raise UsageError("--exclusive stops just before a --to-time, --to-lsn or --to-xid target; a restore point or --to-latest has no 'before'")
    inclusive = not exclusive
    if to_time:
        return Target("time", time=parse_moment(to_time, "--to-time"), inclusive=inclusive, timeline=line)
    if to_lsn:
        try:
            return Target("lsn", lsn=parse_lsn(to_lsn), inclusive=inclusive, timeline=line)
        except ValueError as exc:
            raise UsageError(f"--to-lsn: {exc}") from None
    if to_restore_point:
        if len(to_restore_point.encode()) > MAX_RESTORE_POINT or not to_restore_point.isprintable():
            raise UsageError(f"--to-restore-point: a restore point name is at most {MAX_RESTORE_POINT} bytes of printable text "
                             "(the name given to pg_create_restore_point)")
        return Target("name", name=to_restore_point, timeline=line)
    if to_xid:
        if not to_xid.strip().isdigit() or not 3 <= int(to_xid) < 1 << 32:
            raise UsageError(f"--to-xid '{to_xid[:30]}' is not a transaction id (a number from 3 to 4294967295, as txid_current() "
                             "shows modulo 2^32)")
        return Target("xid", xid=int(to_xid), inclusive=inclusive, timeline=line)
    return Target("latest", timeline=line)


def parse_timeline(text: str | None) -> str:
    """--timeline: latest (the default, as PostgreSQL), current (the base backup's) or a timeline number."""
    if text is None or text.strip().lower() in ("", "latest"):
        return "latest"
    if text.strip().lower() == "current":
        return "current"
    if text.strip().isdigit() and 1 <= int(text) < 1 << 32:
        return str(int(text))
    raise UsageError(f"--timeline '{text[:30]}' is not a timeline; give latest, current or a number (list --wal shows the timelines)")


def choose_base(backups: list[BaseBackup], target: Target) -> BaseBackup:
    """The newest good base backup that ends before the target (pure)."""
    good = [b for b in backups if b.good]
    if not good:
        waiting = [b for b in backups if b.status == "waiting-for-wal"]
        hint = f" ({waiting[0].id} waits for WAL: {waiting[0].problem})" if waiting else ""
        raise NotFound(f"no good base backup{hint}; take one with 'pg-backup-sidecar base-backup' while 'wal-receive' runs")
    for backup in good:  # newest first
        if target.kind == "time" and target.time and datetime.fromisoformat(backup.metadata["finishedAt"].replace("Z", "+00:00")) >= target.time:
            continue
        if target.kind == "lsn" and target.lsn is not None and parse_lsn(backup.metadata["endLsn"]) > target.lsn:
            continue
        return backup
    oldest = good[-1].metadata
    ends = f"ends at {oldest['finishedAt']}" if target.kind == "time" else f"ends at LSN {oldest['endLsn']}"
    raise NotFound(f"no base backup ends before {target.describe()}: the oldest good one ({oldest['id']}) {ends}")


Reach = Callable[[BaseBackup], tuple[list[str], str]]  # a base backup's WAL on hand, and what stops it short ('' when nothing)


def restorable(backups: list[BaseBackup], chosen: BaseBackup, wal: list[str], target: Target, reach: Reach,
               pool: list[BaseBackup] | None = None, where: str = "", hint: str = "") -> tuple[list[tuple[BaseBackup, list[str]]], str]:
    """The base backups a restore tries, in order, with the WAL each replays (pure but for `reach`): `chosen` (the newest
    good one that ends before the target, `wal` its WAL) when its chain is whole, then each good one before it in `pool`
    (default `backups`; of the same system, its chain whole) whose WAL on hand reaches as far, newest first: should a link
    of the chain turn out damaged when it is read, the next one restores instead. Also why the older ones left out were
    ('' when none was). NotFound, naming what is broken (and `hint`: what to do), when none can; `where` names the store
    (' on the remote')."""
    system = str(chosen.metadata["systemIdentifier"])
    out = []
    _, broken = chain_of(backups, chosen)
    if not broken:
        out.append((chosen, wal))
    why = ""
    for backup in backups if pool is None else pool:  # newest first
        if backup.id >= chosen.id or not backup.good or str(backup.metadata.get("systemIdentifier")) != system or chain_of(backups, backup)[1]:
            continue
        fallback, short = reach(backup)
        if short or not fallback or fallback[-1] < wal[-1]:
            why = why or f" ({backup.id}: WAL {short or 'only up to ' + (fallback[-1] if fallback else 'its start')})"
            continue
        out.append((backup, fallback))
    there = " there" if where else ""
    if not out:
        raise NotFound(f"base backup {chosen.id}{where} cannot be restored: {broken}; no older base backup{there} whose chain "
                       f"is whole and whose WAL reaches {target.describe()}{why}{hint}")
    if broken:
        log.warning("base backup %s%s cannot be restored (%s); restoring %s, an older one, with more WAL", chosen.id, where, broken,
                    out[0][0].id, extra={"event": "pitr_base_broken_chain", "backup_id": chosen.id})
    return out, why


def materialise_first(config: Config, backups: list[BaseBackup], candidates: list[tuple[BaseBackup, list[str]]], directory: Path,
                      source: Callable[[BaseBackup], Any] | None = None, where: str = "", why: str = "",
                      ready: Callable[[BaseBackup, list[str]], None] | None = None) -> tuple[BaseBackup, list[str]]:
    """The first candidate (restorable's) whose chain reads back whole, written into the empty `directory`; a damaged
    link rules out every candidate that needs it, and `ready(backup, wal)` (a check of its WAL) may rule one out by a
    ChecksumMismatch. Each failure is logged as a warning naming the base backup skipped and why, and what was written
    is removed before the next one. ChecksumMismatch naming the first damage when none is left."""
    damaged: list[ChecksumMismatch] = []
    there = " there" if where else ""
    for backup, wal in candidates:
        if any(isinstance(d, DamagedBase) and d.backup_id == link.id for d in damaged for link in chain_of(backups, backup)[0]):
            continue
        try:
            if ready is not None:
                ready(backup, wal)
            materialise(config, backups, backup, directory, source=source)
            return backup, wal
        except ChecksumMismatch as exc:  # DamagedBase: a link read back damaged; or a segment of its WAL
            damaged.append(exc)
            log.warning("%s%s; base backup %s is skipped, trying an older one", exc, f" ({where.strip()})" if where else "", backup.id,
                        extra={"event": "pitr_base_damaged", "backup_id": getattr(exc, "backup_id", backup.id)})
            _wipe(directory, False)
    raise ChecksumMismatch(f"{damaged[0]}{f' ({where.strip()})' if where else ''}; no older base backup{there} whose chain is whole "
                           f"restores instead{why}{'' if where else '; restore from the off-site copy (--from-remote) or to an earlier point'}")


# --- timelines ------------------------------------------------------------------------------------

TimelinePath = list[tuple[int, int | None]]  # (timeline, LSN where the next one forks from it; None for the last)


def parse_history(text: str, timeline: int) -> TimelinePath:
    """The timelines leading to `timeline` from its history file's text (lines 'parent<TAB>switchpoint<TAB>reason'), pure."""
    path: TimelinePath = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or not fields[0].isdigit():
            raise SidecarError(f"the history file of timeline {timeline} has a line that is not 'timeline switchpoint reason': {line[:80]!r}")
        path.append((int(fields[0]), parse_lsn(fields[1])))
    return [*path, (timeline, None)]


def on_path(meta: dict[str, Any], path: TimelinePath) -> bool:
    """Whether a base backup lies on a timeline path: taken on one of its timelines, ending before that one forks."""
    for timeline, switch in path:
        if timeline == int(meta["timeline"]):
            return switch is None or parse_lsn(meta["endLsn"]) <= switch
    return False


def _timeline_path(archive: WalArchive, system: str, timeline: int, identity: age.Identities | None) -> TimelinePath:
    if timeline == 1:
        return [(1, None)]
    name = f"{timeline:08X}.history"
    if archive.record(system, name) is None:
        return [(timeline, None)]  # no history archived: this timeline alone
    with tempfile.TemporaryDirectory(prefix="pg-backup-sidecar-history-") as scratch:
        archive.fetch(system, name, Path(scratch) / name, identity)
        return parse_history((Path(scratch) / name).read_text(errors="replace"), timeline)


def _wal_identity(config: Config) -> age.Identities | None:
    return age.parse_identities(config.identity_file) if config.identity_file else None


def resolve_timeline(archive: WalArchive, config: Config, backups: list[BaseBackup], target: Target) -> tuple[list[BaseBackup], TimelinePath]:
    """The base backups that can reach the target's timeline, and the timeline path (the system is the newest good base
    backup's). `latest` is the highest timeline archived for that system; `current` the chosen base backup's own."""

    def archived(system: str) -> set[int]:
        found = {t.timeline for t in archive.timelines() if t.system_id == system and t.segnos}
        history = archive.root / system / "history"
        return found | ({int(p.name[:8], 16) for p in history.glob("*.history.json")} if history.is_dir() else set())

    return timeline_plan(backups, target, archived, lambda system, timeline: _timeline_path(archive, system, timeline, _wal_identity(config)),
                         "the WAL archive", "; see 'list --wal'")


def timeline_plan(backups: list[BaseBackup], target: Target, archived_of: Callable[[str], set[int]],
                  path_of: Callable[[str, int], TimelinePath], where: str, hint: str = "") -> tuple[list[BaseBackup], TimelinePath]:
    """resolve_timeline over any WAL store (pure but for `archived_of(system)`, the timelines it holds WAL or a history
    file of, and `path_of(system, timeline)`, a timeline's path from its history file)."""
    good = [b for b in backups if b.good]
    if not good:
        return backups, []
    system = str(good[0].metadata["systemIdentifier"])
    same = [b for b in backups if str(b.metadata.get("systemIdentifier")) == system]
    if target.timeline == "current":
        return same, []
    archived = archived_of(system)
    wanted = max(archived | {int(b.metadata["timeline"]) for b in good}) if target.timeline == "latest" else int(target.timeline)
    if target.timeline != "latest" and wanted not in archived | {int(b.metadata["timeline"]) for b in same}:
        shown = ", ".join(str(t) for t in sorted(archived)) or "none"
        raise NotFound(f"timeline {wanted} is not in {where} of system {system} (archived timelines: {shown}){hint}")
    path = path_of(system, wanted)
    fitting = [b for b in same if on_path(b.metadata, path)]
    if not [b for b in fitting if b.good]:
        raise NotFound(f"no good base backup lies on timeline {wanted}'s history (timelines {', '.join(str(t) for t, _ in path)}); "
                       "take a base backup of the server on that timeline")
    return fitting, path


def chain_along(has: Callable[[str], bool], meta: dict[str, Any], last: int | None, path: TimelinePath | None) -> tuple[list[str], str | None]:
    """The segments from a base backup's start that `has` holds, contiguous, along the timeline path (each timeline up to
    the segment its successor forks in, which is read from the successor), up to segment number `last` (None: as far
    as they go); and the first one missing where the chain stopped (None when it reached `last`). Pure."""
    size = int(meta["walSegmentSize"])
    path = [(t, s) for t, s in (path or [(int(meta["timeline"]), None)]) if t >= int(meta["timeline"])] or [(int(meta["timeline"]), None)]
    segno = segment_of(parse_lsn(meta["startLsn"]), size)
    names: list[str] = []
    for timeline, switch in path:
        end = segment_of(switch, size) - 1 if switch is not None else None  # the fork's segment is the successor's
        while (last is None or segno <= last) and (end is None or segno <= end):
            name = segment_name(timeline, segno, size)
            if not has(name):
                return names, name
            names.append(name)
            segno += 1
    return names, None


def wal_chain(archive: WalArchive, meta: dict[str, Any], target: Target, path: TimelinePath | None = None, quiet: bool = False) -> list[str]:
    """The segments recovery reads (chain_along the archive's): from the base backup's start up to the target's segment
    (LSN) or the newest archived one. A gap before the newest is logged as a warning unless `quiet`."""
    size, system = int(meta["walSegmentSize"]), str(meta["systemIdentifier"])
    last = segment_of(target.lsn, size) if target.kind == "lsn" and target.lsn is not None else None
    names, missing = chain_along(lambda name: archive.record(system, name) is not None, meta, last, path)
    if missing is not None:
        if last is not None:
            raise NotFound(f"WAL up to {target.describe()} is not archived: segment {missing} is missing")
        timeline, segno = parse_segment(missing, size)
        later = [t for t in archive.timelines() if t.system_id == system and t.timeline == timeline and t.segnos and t.segnos[-1] > segno]
        if later and not quiet:
            log.warning("segment %s is missing from the WAL archive (a gap): recovery stops before it, and the WAL archived after it "
                        "(up to %s) cannot be used; restore to an earlier point or take a new base backup", missing, later[0].last,
                        extra={"event": "wal_gap"})
    return names


# --- what the archived WAL holds: pg_waldump over one segment at a time ---------------------------

WALDUMP = re.compile(r"tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: (?:(?:COMMIT|ABORT)(?:_PREPARED (\d+):)? "
                     r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC|RESTORE_POINT (.*)$)")


@dataclass
class SegmentScan:
    """What one segment says about recovery targets: restore points and ended transactions (LSN of their record), and
    the time of its last commit or abort."""

    restore_points: dict[str, int]
    xids: dict[int, int]
    last_commit: datetime | None


def parse_waldump(lines: Any) -> SegmentScan:
    """pg_waldump --rmgr=Transaction --rmgr=XLOG output into a SegmentScan (pure; any iterable of lines)."""
    scan = SegmentScan({}, {}, None)
    for line in lines:
        match = WALDUMP.search(line.rstrip("\n"))
        if not match:
            continue
        tx, lsn, prepared, when, point = match.groups()
        if point is not None:
            scan.restore_points.setdefault(point, parse_lsn(lsn))
            continue
        scan.xids[int(prepared or tx)] = parse_lsn(lsn)
        scan.last_commit = datetime.fromisoformat(when).replace(tzinfo=UTC)
    return scan


def waldump_tool(config: Config, major: int | None) -> str | None:
    """pg_waldump of the WAL's major version (it reads no other), or None."""
    from sidecar.postgres import find_tool, tool_version

    try:
        tool = find_tool("pg_waldump", config.pg_bin_dir)
        return tool if major is None or tool_version(tool)[0] == major else None
    except SidecarError:
        return None


def scan_segment(archive: WalArchive | None, system: str, name: str, tool: str, identity: age.Identities | None,
                 following: str | None = None, fetch: Callable[[str, Path], None] | None = None) -> SegmentScan | None:
    """Decode one archived segment into a scratch file (sha256 checked) and read its transaction and restore point records
    with pg_waldump, streaming (its output is never held whole). None if pg_waldump cannot read it. With `following`
    (the next segment of the chain) that one is decoded beside it, so that a record starting in `name` and ending in
    the next (a large COMMIT) is read whole; records starting in the next are left out. `fetch(name, dest)` reads a
    segment from elsewhere (the remote store) instead of `archive`."""
    from sidecar.postgres import base_env

    def get(wanted: str, dest: Path) -> None:
        if fetch is not None:
            fetch(wanted, dest)
        else:
            assert archive is not None
            archive.fetch(system, wanted, dest, identity)

    with tempfile.TemporaryDirectory(prefix="pg-backup-sidecar-waldump-") as scratch:
        path = Path(scratch) / name
        get(name, path)
        argv = [tool, "--rmgr=Transaction", "--rmgr=XLOG", str(path)]
        end = None
        if following is not None:
            get(following, Path(scratch) / following)
            size = path.stat().st_size
            timeline, segno = parse_segment(name, size)
            end = (segno + 1) * size
            argv = [tool, "--rmgr=Transaction", "--rmgr=XLOG", "--path", scratch, "--timeline", str(timeline), "--start", format_lsn(segno * size),
                    "--end", format_lsn(end + size)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", env=base_env(), cwd=scratch)
        assert proc.stdout is not None and proc.stderr is not None
        scan = parse_waldump(proc.stdout if end is None else _before(proc.stdout, end))
        if end is not None:
            proc.kill()  # it may be blocked writing the next segment's records, which are not read
        error = proc.stderr.read(4096)
        proc.wait()
    unreadable = ("invalid magic number", "could not open", "WAL segment size", "could not read file")
    if proc.returncode != 0 and any(text in error for text in unreadable) and not scan.xids and not scan.restore_points:
        log.warning("pg_waldump cannot read WAL segment %s: %s", name, error.strip()[:200])
        return None
    return scan


def _before(lines: Any, end: int) -> Any:
    """pg_waldump's lines up to the first record at or after LSN `end`."""
    for line in lines:
        match = re.search(r"lsn: ([0-9A-F]+/[0-9A-F]+)", line)
        if match and parse_lsn(match.group(1)) >= end:
            return
        yield line


def locate(config: Config, archive: WalArchive, meta: dict[str, Any], target: Target, path: TimelinePath) -> int | None:
    """The LSN of a restore point's record or of the end of transaction `xid`, searching the archived WAL from the newest
    segment back to the start of the base backup `meta` (the oldest that can reach it). NotFound, before anything is
    written, if it is not there; None if this WAL cannot be read here (pg_waldump of another major version)."""
    tool = waldump_tool(config, meta.get("serverMajor"))
    if tool is None:
        log.warning("pg_waldump of PostgreSQL %s is not here: %s cannot be looked for before the restore; PostgreSQL will say if it is "
                    "not reached", meta.get("serverMajor"), target.describe())
        return None
    system = str(meta["systemIdentifier"])
    chain = wal_chain(archive, meta, Target("latest"), path)
    identity = _wal_identity(config)
    return search_wal(chain, lambda name, following: scan_segment(archive, system, name, tool, identity, following), target, system,
                      "the archived WAL", "; 'list --wal' shows what is archived")


def search_wal(chain: list[str], scan: Callable[[str, str | None], SegmentScan | None], target: Target, system: str, where: str,
               hint: str = "") -> int | None:
    """The LSN of a restore point's record or of the end of transaction `xid` in the segments `chain`, newest first, each
    read by `scan(name, the next one)`; None if one cannot be read here; NotFound if it is not there."""
    for i, name in reversed(list(enumerate(chain))):
        scan_ = scan(name, chain[i + 1] if i + 1 < len(chain) else None)
        if scan_ is None:
            return None
        found = scan_.restore_points.get(target.name or "") if target.kind == "name" else scan_.xids.get(target.xid or -1)
        if found is not None:
            log.info("%s found in %s at LSN %s, segment %s (%d of %d segments read, newest first)", target.describe(), where, format_lsn(found),
                     name, len(chain) - i, len(chain), extra={"event": "pitr_target_found"})
            return found
    span = f"segments {chain[0]}..{chain[-1]}" if chain else "no segments"
    what = "no restore point of that name was created" if target.kind == "name" else "that transaction did not end"
    raise NotFound(f"{target.describe()} is not in {where} of system {system} ({span} searched: {what} after the oldest "
                   f"good base backup){hint}")


def _empty_target(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"{directory} is not an empty directory; give a new or empty directory to --into-data-dir")


def restore_command(config: Config, system_id: str) -> str:
    """The restore_command line: this sidecar's wal-fetch (sha256 checked, exit 1 only when a file is not archived)."""
    argv = [sys.executable, "-m", "sidecar", "wal-fetch", "--backup-dir", str(config.backup_dir.resolve()), "--system-id", system_id]
    if config.identity_file:
        argv += ["--identity-file", str(config.identity_file.resolve())]
    argv += ["--spool-dir", str(spool_dir(config).resolve())]  # a segment not archived yet: the receiver's copy
    line = shlex.join(argv) + " %f %p"
    if os.environ.get("PYTHONPATH"):
        line = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {line}"
    return line


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def restore_to_data_dir(config: Config, target: Target, directory: Path, stage_wal: bool | None = None) -> dict[str, Any]:
    """Write a data directory that recovers to `target` when a server starts on it. With `stage_wal` (by default when
    running as root: the server then runs as `postgres`, which cannot run this sidecar nor read the volume) the WAL it
    needs is checked and staged into the data directory's pg_wal (restore_command finds nothing and recovery reads
    pg_wal): the directory is then self-contained. Otherwise restore_command is `wal-fetch`, reading the archive."""
    directory = directory.absolute()
    _empty_target(directory)
    archive = WalArchive(config.backup_dir)
    listed = list_base_backups(config)
    candidates, path = resolve_timeline(archive, config, listed, target)
    choice = target
    if target.kind in ("name", "xid"):
        good = [b for b in candidates if b.good]
        found = locate(config, archive, good[-1].metadata, target, path) if good else None
        choice = Target("lsn", lsn=found) if found is not None else Target("latest")
    chosen = choose_base(candidates, choice)
    system = str(chosen.metadata["systemIdentifier"])
    first = wal_chain(archive, chosen.metadata, target, path)
    if not first or first[-1] < chosen.metadata["endWal"]:
        raise NotFound(f"the WAL of base backup {chosen.id} is not archived up to its end ({chosen.metadata['endWal']})")

    def reach(backup: BaseBackup) -> tuple[list[str], str]:
        try:
            names = wal_chain(archive, backup.metadata, target, path, quiet=True)
        except NotFound as exc:
            return [], str(exc)
        return names, "" if names and names[-1] >= backup.metadata["endWal"] else f"not archived up to its end ({backup.metadata['endWal']})"

    # an incremental whose chain is broken (a link missing or unusable, or read back damaged below) gives way to the newest
    # older base backup whose chain is whole and whose WAL reaches as far; none: one line naming what is broken
    options, why = restorable(listed, chosen, first, target, reach, pool=candidates,
                              hint="; put the missing base backup back, or restore from the off-site copy (--from-remote) or to an earlier point")
    checked: set[str] = set()

    def ready(backup: BaseBackup, chain: list[str]) -> None:
        for name in chain:  # a damaged segment stops the restore here, named (only segments not checked for another candidate)
            if name not in checked:
                archive.check(system, name)
                checked.add(name)

    ready(*options[0])  # before anything is written
    for link in chain_of(listed, options[0][0])[0]:  # a missing identity file too
        identities(config, link.metadata)
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    staged = os.geteuid() == 0 if stage_wal is None else stage_wal
    try:
        backup, chain = materialise_first(config, listed, options, directory, why=why, ready=ready)
        meta = backup.metadata
        identity = identities(config, meta)
        wal_dir = directory / "pg_wal"
        wal_dir.mkdir(mode=0o700, exist_ok=True)
        if staged:
            for name in _history_files(archive, system, max([int(meta["timeline"]), *(t for t, _ in path)])):
                archive.fetch(system, name, wal_dir / name, identity)
            for name in chain:
                archive.fetch(system, name, wal_dir / name, identity)
            for spooled in _spool_tail(config, system, chain, int(meta["walSegmentSize"])) if target.kind != "lsn" else []:
                copy_into_place(spooled, wal_dir / spooled.name.removesuffix(PARTIAL))
        timeline = str(path[-1][0]) if path and target.timeline != "current" else target.timeline
        settings = [f"restore_command = {_conf_quote('/bin/false' if staged else restore_command(config, system))}",
                    "recovery_target_action = 'promote'", f"recovery_target_timeline = {_conf_quote(timeline)}"]
        settings += recovery_settings(target)
        with open(directory / "postgresql.auto.conf", "a") as conf:
            conf.write("\n# point-in-time recovery written by pg-backup-sidecar" + (" (WAL staged in pg_wal)" if staged else "") + "\n")
            conf.write("".join(line + "\n" for line in settings))
        (directory / "recovery.signal").touch(mode=0o600)
        tar.fix_modes(directory)
        if os.geteuid() == 0:
            _chown(directory, SERVER_USER)
    except BaseException:
        _wipe(directory, created)
        raise
    log.info("data directory %s written from base backup %s, recovering to %s", directory, backup.id, target.describe(),
             extra={"event": "pitr_data_dir_written", "backup_id": backup.id})
    newest = archive.record(system, chain[-1]) or {}
    if target.kind == "time" and target.time and str(newest.get("archivedAt", "")) < iso_timestamp(target.time):
        log.warning("%s is after the newest archived WAL segment %s (archived at %s): recovery stops with 'recovery ended before configured "
                    "recovery target was reached' unless WAL after it is archived by then; use --to-latest for everything archived",
                    target.describe(), chain[-1], newest.get("archivedAt"))
    return {"dataDir": str(directory), "baseBackup": backup.id, "target": target.describe(), "walSegments": len(chain),
            "walStaged": staged, "serverMajor": meta.get("serverMajor"), "systemIdentifier": system}


def recovery_settings(target: Target) -> list[str]:
    """The recovery_target_* lines for a target (pure)."""
    lines = []
    if target.kind == "time" and target.time:
        lines.append(f"recovery_target_time = {_conf_quote(target.time.strftime('%Y-%m-%d %H:%M:%S.%f+00'))}")
    elif target.kind == "lsn" and target.lsn is not None:
        lines.append(f"recovery_target_lsn = {_conf_quote(format_lsn(target.lsn))}")
    elif target.kind == "name" and target.name is not None:
        lines.append(f"recovery_target_name = {_conf_quote(target.name)}")
    elif target.kind == "xid" and target.xid is not None:
        lines.append(f"recovery_target_xid = {_conf_quote(str(target.xid))}")
    if not target.inclusive:
        lines.append("recovery_target_inclusive = off")
    return lines


def _history_files(archive: WalArchive, system: str, timeline: int) -> list[str]:
    names = [f"{t:08X}.history" for t in range(2, timeline + 1)]
    return [n for n in names if archive.record(system, n) is not None]


def _spool_tail(config: Config, system: str, chain: list[str], segment_size: int) -> list[Path]:
    """What the receiver's spool holds right after `chain`: completed segments not archived yet (the sidecar stopped
    before archiving them), then the newest `.partial`, each continuing the one before and checked by its page header
    (wal.spool_segment: no sha256 was recorded for them)."""
    tail: list[Path] = []
    name = chain[-1] if chain else None
    while name is not None:
        name = _next(name, segment_size)
        found = spool_segment(spool_dir(config), system, name)
        if found is None:
            break
        tail.append(found)
        if found.name.endswith(PARTIAL):
            break
    return tail


def _partial(config: Config, system: str, chain: list[str], segment_size: int) -> Path | None:
    """The receiver's newest `.partial` when it continues `chain` directly (what `pitr find` reads beyond the archive)."""
    tail = _spool_tail(config, system, chain, segment_size)
    return tail[0] if len(tail) == 1 and tail[0].name.endswith(PARTIAL) else None


def _next(name: str, segment_size: int) -> str:
    timeline, segno = parse_segment(name, segment_size)
    return segment_name(timeline, segno + 1, segment_size)


def _chown(root: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for name in filenames:
            os.lchown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def _wipe(directory: Path, created: bool) -> None:
    """Undo a failed restore: what we wrote goes, the directory too if we created it."""
    if created:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def start_hint(result: dict[str, Any]) -> str:
    who = f"as {SERVER_USER}: su {SERVER_USER} -c " if os.geteuid() == 0 else ""
    command = f"pg_ctl -D {shlex.quote(result['dataDir'])} -l {shlex.quote(result['dataDir'] + '/recovery.log')} start"
    binary = f"PostgreSQL {result['serverMajor']}'s " if result.get("serverMajor") else ""
    return (f"start it with {binary}server {who}{shlex.quote(command) if who else command}; it replays WAL to {result['target']} and promotes "
            "(check its log for 'database system is ready to accept connections')")


def is_wal_name(name: str) -> bool:
    return bool(SEGMENT.fullmatch(name) or HISTORY.fullmatch(name))


class ScratchServer:
    """A PostgreSQL of the base backup's major version on a restored data directory, listening only on a Unix socket
    in its own directory (trust there: only this process's user, or root, can reach that 0700 directory), run as
    `postgres` when we are root. Started, waited for until recovery has promoted, stopped and removed."""

    def __init__(self, config: Config, root: Path, major: int | None) -> None:
        from sidecar.postgres import find_tool, tool_version

        self.root = root
        self.data = root / "data"
        self.port = 5432
        self.pg_ctl = find_tool("pg_ctl", config.pg_bin_dir)
        found, text = tool_version(find_tool("postgres", config.pg_bin_dir))
        if major is not None and found != major:
            raise SidecarError(f"the base backup is of PostgreSQL {major} but the server binaries here are {text}; install PostgreSQL {major}'s "
                               "server (postgresql-{major}) or set PG_BIN_DIR to its bin directory")
        self.user = SERVER_USER if os.geteuid() == 0 else None

    def _run(self, argv: list[str], check: bool = True) -> str:
        import subprocess

        from sidecar.postgres import base_env

        done = subprocess.run(argv, user=self.user, capture_output=True, text=True, check=False, cwd="/", env=base_env())
        if check and done.returncode != 0:
            said = " ".join((done.stderr or done.stdout).split())[-300:]
            raise SidecarError(f"the scratch PostgreSQL failed: {said}; {self.log_tail()}")
        return done.stdout

    def log_tail(self) -> str:
        try:
            lines = [x for x in (self.root / "server.log").read_text(errors="replace").splitlines() if "FATAL" in x or "PANIC" in x]
        except OSError:
            return "no server log"
        return "its log says: " + (lines[-1].strip() if lines else "(no FATAL line)")

    def start(self) -> None:
        hba = self.root / "pg_hba.conf"
        hba.write_text("local all all trust\n")
        if self.user:
            _chown(self.root, self.user)
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.root}' -c port={self.port} -c hba_file='{hba}' -c ssl=off "
                   "-c archive_mode=off -c logging_collector=off -c hot_standby=on")
        self._run([self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "600", "start"])

    def wait_promoted(self, conninfo: str, timeout: float = 3600, target: str = "the target") -> None:
        import time

        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    if row is not None and not row[0]:
                        return
            except psycopg.OperationalError:
                if not (self.data / "postmaster.pid").exists():
                    self.not_reached(target)
                    raise SidecarError(f"the scratch PostgreSQL stopped during recovery; {self.log_tail()}") from None
            time.sleep(0.5)
        raise SidecarError(f"the scratch PostgreSQL did not finish recovery in {timeout:.0f}s; {self.log_tail()}")

    def not_reached(self, target: str) -> None:
        """NotFound when the server stopped because recovery ran to the end of the WAL without reaching the target
        (PostgreSQL 13+ refuses to promote then: FATAL, 'recovery ended before configured recovery target was reached')."""
        if "recovery ended before configured recovery target was reached" in self.log_tail():
            raise NotFound(f"{target} is not in the archived WAL: recovery ended before reaching it (PostgreSQL: 'recovery "
                           "ended before configured recovery target was reached'); nothing was restored")

    def start_promoted(self, config: Config, target: str) -> str:
        """Start it and wait until recovery has promoted; the conninfo of `config`'s database there, as its user. The
        server is stopped again when that fails; on success the caller stops it."""
        from psycopg.conninfo import make_conninfo

        try:
            try:
                self.start()
            except SidecarError:  # it may stop before pg_ctl saw it accept connections
                self.not_reached(target)
                raise
            params = {k: v for k, v in config.conninfo().items() if k in ("user", "dbname")}
            url = make_conninfo(**params, host=str(self.root), port=str(self.port))
            self.wait_promoted(make_conninfo(url, dbname="postgres"), target=target)
        except BaseException:
            self.stop()
            raise
        return url

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"], check=False)


def scratch_directory() -> Path:
    """A new 0700 directory for a scratch server (its data directory, socket and log); in TMPDIR, which the server's
    user must be able to reach (/tmp)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="pg-backup-sidecar-pitr-"))
