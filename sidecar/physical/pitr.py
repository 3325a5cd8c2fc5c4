"""Point-in-time restore into a data directory (disaster recovery of a whole server): the newest good base backup
that ends before the target, extracted (streaming, every file checked against its manifest), WAL from our archive
through `restore_command` (`wal-fetch`, sha256 checked), the recovery target, `recovery.signal`, promote."""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.config import Config
from sidecar.errors import NotFound, SidecarError, UsageError
from sidecar.physical import tar
from sidecar.physical.base import BaseBackup, identities, list_base_backups, read_base
from sidecar.physical.receiver import spool_dir
from sidecar.physical.wal import HISTORY, SEGMENT, WalArchive, format_lsn, parse_lsn, parse_segment, segment_name, segment_of
from sidecar.repository import iso_timestamp

log = logging.getLogger(__name__)
SERVER_USER = "postgres"


@dataclass(frozen=True)
class Target:
    kind: str  # time | lsn | latest
    time: datetime | None = None
    lsn: int | None = None

    def describe(self) -> str:
        if self.kind == "time" and self.time:
            return f"time {iso_timestamp(self.time)}"
        if self.kind == "lsn" and self.lsn is not None:
            return f"LSN {format_lsn(self.lsn)}"
        return "the latest archived WAL"


def parse_target(to_time: str | None, to_lsn: str | None, to_latest: bool) -> Target:
    given = [x for x in (to_time, to_lsn, to_latest or None) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of --to-time T, --to-lsn L, --to-latest")
    if to_time:
        try:
            moment = datetime.fromisoformat(to_time.strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"--to-time '{to_time[:60]}' is not a time; write it like 2026-11-26T14:32:05Z") from None
        if moment.tzinfo is None:
            raise UsageError(f"--to-time '{to_time[:60]}' has no time zone; add Z (UTC) or an offset like +01:00")
        return Target("time", time=moment.astimezone(UTC))
    if to_lsn:
        try:
            return Target("lsn", lsn=parse_lsn(to_lsn))
        except ValueError as exc:
            raise UsageError(f"--to-lsn: {exc}") from None
    return Target("latest")


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


def wal_chain(archive: WalArchive, meta: dict[str, Any], target: Target) -> list[str]:
    """The segments recovery reads: from the base backup's start on its timeline, contiguous, up to the target's
    segment (LSN) or the newest archived one."""
    size, timeline, system = int(meta["walSegmentSize"]), int(meta["timeline"]), str(meta["systemIdentifier"])
    segno = segment_of(parse_lsn(meta["startLsn"]), size)
    last = segment_of(target.lsn, size) if target.kind == "lsn" and target.lsn is not None else None
    names = []
    while last is None or segno <= last:
        name = segment_name(timeline, segno, size)
        if archive.record(system, name) is None:
            if last is not None:
                raise NotFound(f"WAL up to {target.describe()} is not archived: segment {name} is missing")
            later = [t for t in archive.timelines() if t.system_id == system and t.timeline == timeline and t.segnos and t.segnos[-1] > segno]
            if later:
                log.warning("segment %s is missing from the WAL archive (a gap): recovery stops before it, and the WAL archived after it "
                            "(up to %s) cannot be used; restore to an earlier point or take a new base backup", name, later[0].last,
                            extra={"event": "wal_gap"})
            break
        names.append(name)
        segno += 1
    return names


def _empty_target(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"{directory} is not an empty directory; give a new or empty directory to --into-data-dir")


def restore_command(config: Config, system_id: str) -> str:
    """The restore_command line: this sidecar's wal-fetch (sha256 checked, exit 1 only when a file is not archived)."""
    argv = [sys.executable, "-m", "sidecar", "wal-fetch", "--backup-dir", str(config.backup_dir.resolve()), "--system-id", system_id]
    if config.identity_file:
        argv += ["--identity-file", str(config.identity_file.resolve())]
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
    backup = choose_base(list_base_backups(config), target)
    meta = backup.metadata
    system = str(meta["systemIdentifier"])
    chain = wal_chain(archive, meta, target)
    if not chain or chain[-1] < meta["endWal"]:
        raise NotFound(f"the WAL of base backup {backup.id} is not archived up to its end ({meta['endWal']})")
    for name in chain:  # before anything is written: a damaged segment stops the restore here, named
        archive.check(system, name)
    identity = identities(config, meta)
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    staged = os.geteuid() == 0 if stage_wal is None else stage_wal
    try:
        extractor = tar.Extractor(directory, None)
        problems = read_base(config, backup, extractor, directory / "backup_manifest")
        if problems:
            raise SidecarError(f"base backup {backup.id} is damaged: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        wal_dir = directory / "pg_wal"
        wal_dir.mkdir(mode=0o700, exist_ok=True)
        if staged:
            for name in _history_files(archive, system, int(meta["timeline"])):
                archive.fetch(system, name, wal_dir / name, identity)
            for name in chain:
                archive.fetch(system, name, wal_dir / name, identity)
            partial = _partial(config, system, chain, int(meta["walSegmentSize"]))
            if partial is not None and target.kind != "lsn":
                shutil.copyfile(partial, wal_dir / partial.name.removesuffix(".partial"))
        settings = [f"restore_command = {_conf_quote('/bin/false' if staged else restore_command(config, system))}",
                    "recovery_target_action = 'promote'", "recovery_target_timeline = 'latest'"]
        if target.kind == "time" and target.time:
            settings.append(f"recovery_target_time = {_conf_quote(target.time.strftime('%Y-%m-%d %H:%M:%S.%f+00'))}")
        elif target.kind == "lsn" and target.lsn is not None:
            settings.append(f"recovery_target_lsn = {_conf_quote(format_lsn(target.lsn))}")
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


def _history_files(archive: WalArchive, system: str, timeline: int) -> list[str]:
    names = [f"{t:08X}.history" for t in range(2, timeline + 1)]
    return [n for n in names if archive.record(system, n) is not None]


def _partial(config: Config, system: str, chain: list[str], segment_size: int) -> Path | None:
    """The receiver's newest partial segment, if it continues `chain` and belongs to this system."""
    spool = spool_dir(config)
    try:
        if (spool / ".system_identifier").read_text().strip() != system:
            return None
    except OSError:
        return None
    for path in spool.glob("*.partial"):
        stem = path.name.removesuffix(".partial")
        if SEGMENT.fullmatch(stem) and chain and _next(chain[-1], segment_size) == stem:
            return path
    return None


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
            raise SidecarError(f"the scratch PostgreSQL failed: {(done.stderr or done.stdout).strip()[-300:]}; {self.log_tail()}")
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

    def wait_promoted(self, conninfo: str, timeout: float = 3600) -> None:
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
                    raise SidecarError(f"the scratch PostgreSQL stopped during recovery; {self.log_tail()}") from None
            time.sleep(0.5)
        raise SidecarError(f"the scratch PostgreSQL did not finish recovery in {timeout:.0f}s; {self.log_tail()}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"], check=False)


def scratch_directory() -> Path:
    """A new 0700 directory for a scratch server (its data directory, socket and log); in TMPDIR, which the server's
    user must be able to reach (/tmp)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="pg-backup-sidecar-pitr-"))
