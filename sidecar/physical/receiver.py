"""`wal-receive`: pg_receivewal with a physical slot into a spool on the backup volume; every completed segment (and
timeline history file) goes through sha256 + zstd (+ age) into the WAL archive, fsynced, then leaves the spool. The
newest `.partial` stays in the spool: pg_receivewal resumes from it after a restart."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from psycopg.conninfo import make_conninfo

from sidecar.config import Config
from sidecar.errors import LockHeld, SidecarError
from sidecar.physical.server import ensure_slot, identify, recreate_slot, require_replication
from sidecar.physical.wal import HISTORY, SEGMENT, SPOOL_SYSTEM_FILE, WalArchive, gaps, note_gap, parse_segment, record_segment_size, segment_name
from sidecar.postgres import Child, _inherited_fds, child_env, find_tool
from sidecar.repository import Repository
from sidecar.streams import fsync_dir

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2
MAX_BACKOFF = 30.0


def spool_dir(config: Config) -> Path:
    return config.wal_spool_dir or config.backup_dir / "wal" / "spool"


def _die_with_parent() -> None:
    """In pg_receivewal, before exec: SIGTERM when we die (even by SIGKILL), so an orphan never keeps the slot busy."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _ReceiverChild(Child):
    """A Child (own process group, stderr tail) that also dies with this process."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.name = Path(argv[0]).name
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent,
                                         pass_fds=_inherited_fds(env))
        except OSError as exc:
            raise SidecarError(f"cannot run {argv[0]} ({exc.strerror})") from None
        self._tail: deque[str] = deque(maxlen=20)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()


class Receiver:
    def __init__(self, config: Config, stop: threading.Event | None = None) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        repo = Repository(config.backup_dir, group_readable=config.group_readable)
        self.repo = repo
        self.archive = WalArchive(config.backup_dir, repo.file_mode, repo.dir_mode)
        self.spool = spool_dir(config)
        self.system_id = ""
        self.segment_size = 16 << 20
        self.last: dict[int, int] = {}  # timeline -> newest archived segment number
        self.archived = 0

    def prepare(self) -> None:
        """Checks (one line naming each missing right or setting), identity, spool (0700, one system), slot."""
        self.repo.ensure()
        require_replication(self.config)
        ident = identify(self.config)
        self.system_id, self.segment_size = ident["systemIdentifier"], ident["segmentSize"]
        self.archive._make_dirs(self.spool)
        os.chmod(self.spool, self.repo.dir_mode)
        marker = self.spool / SPOOL_SYSTEM_FILE
        if marker.exists():
            seen = marker.read_text().strip()
            if seen != self.system_id:
                raise SidecarError(f"the WAL spool {self.spool} holds WAL of system {seen}, but the server is system {self.system_id}; "
                                   "archive or remove that spool (its WAL belongs to another server) before streaming from this one")
        else:
            from sidecar.repository import write_atomically

            write_atomically(marker, f"{self.system_id}\n".encode(), self.repo.file_mode)
        record_segment_size(self.archive, self.system_id, self.segment_size)
        for line in self.archive.timelines():
            if line.system_id == self.system_id and line.segnos:
                self.last[line.timeline] = line.segnos[-1]
        self._check_slot()

    def _check_slot(self) -> None:
        """Create the slot if missing (also one dropped while we ran); one that lost its WAL (wal_status 'lost') is a gap:
        noted, and the slot made again so that streaming goes on from now."""
        if ensure_slot(self.config, self.config.wal_slot_name) == "lost":
            log.error("replication slot %s has lost WAL (wal_status 'lost'): the archive will have a gap; creating it again; take a base backup now",
                      self.config.wal_slot_name, extra={"event": "wal_gap"})
            self.gap(f"replication slot {self.config.wal_slot_name} has lost WAL (wal_status 'lost')")
            recreate_slot(self.config, self.config.wal_slot_name)

    def _retire_partials(self) -> None:
        """The server no longer has the WAL after the spool's `.partial`: it is archived as it is (pg_receivewal pads it
        with zeros, where recovery sees the end of the WAL), so restores still reach its last record, and pg_receivewal
        starts again from the slot's position instead of asking for that WAL on every restart."""
        for path in sorted(self.spool.glob("*.partial")):
            name = path.name.removesuffix(".partial")
            if SEGMENT.fullmatch(name):
                os.rename(path, self.spool / name)
                fsync_dir(self.spool)
                log.warning("archiving the partial segment %s as it is: the WAL after it is gone from the server", name,
                            extra={"event": "wal_partial_archived", "segment": name})
        self.archive_ready()

    def gap(self, reason: str) -> None:
        """The gap notification hook: noted on the volume (wal/.gap.json), where the daemon answers it with a base backup."""
        note_gap(self.config.backup_dir, self.system_id, reason, self.repo.file_mode)

    def archive_ready(self) -> int:
        """Archive every completed file in the spool, history files first, segments in order. Returns how many."""
        names = sorted(n for n in os.listdir(self.spool) if SEGMENT.fullmatch(n) or HISTORY.fullmatch(n))
        names.sort(key=lambda n: (not n.endswith(".history"), n))
        done = 0
        for name in names:
            path = self.spool / name
            record, stored = self.archive.store(self.system_id, path, self.config.compression, self.config.compression_level,
                                                self.config.recipients if self.config.encryption else None)
            if SEGMENT.fullmatch(name):
                timeline, segno = parse_segment(name, self.segment_size)
                previous = self.last.get(timeline)
                if previous is not None and segno > previous + 1:
                    first, last = gaps([previous, segno])[0]
                    log.error("gap in the WAL archive of system %s timeline %d: segments %s..%s are missing; take a base backup now",
                              self.system_id, timeline, segment_name(timeline, first, self.segment_size),
                              segment_name(timeline, last, self.segment_size), extra={"event": "wal_gap"})
                    self.gap(f"segments {segment_name(timeline, first, self.segment_size)}..{segment_name(timeline, last, self.segment_size)} are missing")
                self.last[timeline] = max(segno, previous or segno)
            path.unlink()
            fsync_dir(self.spool)
            done += 1
            if stored:
                self.archived += 1
                log.info("archived WAL %s (%d bytes stored)", name, record["size"], extra={"event": "wal_archived", "segment": name})
        return done

    def run(self) -> int:
        """Stream until stopped (SIGTERM/SIGINT in the foreground): pg_receivewal is restarted with backoff if it exits."""
        lock_fd = self._lock()
        try:
            self.prepare()
            self.archive_ready()  # what a killed receiver left completed in the spool
            tool = find_tool("pg_receivewal", self.config.pg_bin_dir)
            backoff = 1.0
            while not self.stop.is_set():
                conninfo, env = child_env(self.config.replication())  # WAL_REPLICATION_URL's role, else DATABASE_URL's
                # the walsender's application_name is the slot's name: what synchronous_standby_names names for RPO 0
                conninfo = make_conninfo(conninfo, application_name=self.config.wal_slot_name)
                argv = [tool, "-D", str(self.spool), "-S", self.config.wal_slot_name, "--synchronous", "--no-loop", "--no-password", "-d", conninfo]
                child = _ReceiverChild(argv, env)
                log.info("receiving WAL of system %s into %s (slot %s)", self.system_id, self.spool, self.config.wal_slot_name,
                         extra={"event": "wal_receiver_started"})
                started = time.monotonic()
                try:
                    while child.proc.poll() is None and not self.stop.is_set():
                        self.archive_ready()
                        self.stop.wait(POLL_SECONDS)
                finally:
                    child.terminate()
                    self.archive_ready()
                if self.stop.is_set():
                    break
                tail = child.stderr_tail()
                if "has already been removed" in tail:
                    log.error("the server no longer has the WAL the receiver needs (%s): the archive has a gap; take a base backup now", tail,
                              extra={"event": "wal_gap"})
                    self.gap(f"the server no longer has the WAL the receiver needs ({tail[:200]})")
                    self._retire_partials()
                else:
                    log.error("pg_receivewal exited with code %s: %s; restarting in %.0fs", child.proc.returncode, tail or "no message", backoff,
                              extra={"event": "wal_receiver_exited"})
                try:
                    self._check_slot()  # dropped under us, or lost its WAL (max_slot_wal_keep_size while we were stopped)
                except SidecarError as exc:
                    log.warning("cannot check replication slot %s: %s", self.config.wal_slot_name, exc)
                if time.monotonic() - started > 60:
                    backoff = 1.0
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        except KeyboardInterrupt:
            self.stop.set()
        finally:
            os.close(lock_fd)
        log.info("WAL receiver stopped (%d segments archived)", self.archived)
        return 0

    def _lock(self) -> int:
        self.repo.ensure()
        directory = self.archive.root
        self.archive._make_dirs(directory)
        path = directory / ".receiver.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, self.repo.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(f"another WAL receiver runs on {directory} ({path} is locked); only one may stream into a volume") from None
        return fd


def supervise(config_path: str | None, stop: threading.Event, pid_variable: str) -> threading.Thread:
    """For the daemon (WAL_ARCHIVING=true): `wal-receive` as a child process (its log lines pass through to ours),
    restarted with backoff whenever it exits, SIGTERM when `stop` is set. The child dies with the daemon
    (`pid_variable` names the daemon for the CLI's parent-death signal)."""
    import sys

    def loop() -> None:
        backoff = 1.0
        while not stop.is_set():
            argv = [sys.executable, "-m", "sidecar"] + (["--config", config_path] if config_path else []) + ["wal-receive"]
            env = {**os.environ, "SIDECAR_LOG_FORMAT": "json", pid_variable: str(os.getpid())}
            started = time.monotonic()
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
            while child.poll() is None and not stop.wait(0.5):
                pass
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error("the WAL receiver exited with code %s; restarting it in %.0fs", child.returncode, backoff,
                      extra={"event": "wal_receiver_exited"})
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    thread = threading.Thread(target=loop, name="wal-receiver", daemon=True)
    thread.start()
    return thread
