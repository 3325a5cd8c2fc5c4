"""The daemon's cron loop. Backups run as child processes (`pg-backup-sidecar backup --json`), so a
cancelled or crashed backup never takes the daemon down and SIGTERM reaches pg_dump's process group."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from cronsim import CronSim

from sidecar.config import Config
from sidecar.metrics import Metrics, _completed_at
from sidecar.repository import Repository

log = logging.getLogger(__name__)


def next_run(cron: str, tz: str, after: datetime) -> datetime:
    """The first time strictly after `after` at which the cron expression fires, in UTC."""
    local = after.astimezone(ZoneInfo(tz)).replace(microsecond=0)
    return next(CronSim(cron, local)).astimezone(timezone.utc)


def interval(cron: str, tz: str, now: datetime) -> timedelta:
    first = next_run(cron, tz, now)
    return next_run(cron, tz, first) - first


def needs_catch_up(newest_good: datetime | None, cron: str, tz: str, now: datetime) -> bool:
    """The daemon was down when a backup was due: the newest good backup is older than one interval."""
    return newest_good is None or now - newest_good > interval(cron, tz, now)


class Daemon:
    def __init__(self, config: Config, metrics: Metrics, config_path: str | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.config_path = config_path
        self.repo = Repository(config.backup_dir)
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()
        self._run_lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None
        self.current_run: str | None = None
        self.runs: dict[str, dict[str, object]] = {}

    # --- one backup -------------------------------------------------------------------------------

    def start_backup(self, reason: str) -> str | None:
        """Start a backup in a thread; None if one is already running."""
        if not self._run_lock.acquire(blocking=False):
            log.warning("backup (%s) skipped: a backup is still running", reason)
            return None
        run_id = f"run-{int(time.time() * 1000)}"
        self.current_run = run_id
        self.runs[run_id] = {"id": run_id, "state": "running", "reason": reason}
        threading.Thread(target=self._backup, args=(run_id, reason), name="backup", daemon=True).start()
        return run_id

    def _backup(self, run_id: str, reason: str) -> None:
        started = time.monotonic()
        metadata = None
        self.metrics.in_progress.labels(operation="backup").set(1)
        try:
            argv = [sys.executable, "-m", "sidecar"] + (["--config", self.config_path] if self.config_path else []) + ["backup", "--json"]
            log.info("backup started (%s)", reason)
            self._child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            out, err = self._child.communicate()
            if self._child.returncode == 0:
                metadata = json.loads(out)
                self.runs[run_id].update(state="succeeded", backup=metadata["id"])
                log.info("backup %s succeeded in %.1fs", metadata["id"], time.monotonic() - started)
            else:
                error = next((line for line in reversed(err.splitlines()) if line.startswith("error:")), err.strip()[-300:])
                self.runs[run_id].update(state="failed", error=error)
                log.error("backup failed: %s", error)
        finally:
            self._child = None
            self.metrics.in_progress.labels(operation="backup").set(0)
            self.metrics.backup_finished(time.monotonic() - started, metadata)
            self.current_run = None
            self._run_lock.release()

    def cancel(self, grace: float = 20.0) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        log.info("cancelling the running backup")
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)

    # --- the loop ---------------------------------------------------------------------------------

    def loop(self) -> None:
        cfg = self.config
        newest = next((e for e in self.repo.entries() if e.good), None)
        newest_at = datetime.fromtimestamp(_completed_at(newest), timezone.utc) if newest else None
        if cfg.run_on_start:
            self.start_backup("run_on_start")
        elif needs_catch_up(newest_at, cfg.schedule_cron, cfg.schedule_timezone, datetime.now(timezone.utc)):
            self.start_backup("catch-up: the newest good backup is older than one schedule interval")
        due = next_run(cfg.schedule_cron, cfg.schedule_timezone, datetime.now(timezone.utc))
        log.info("next backup at %s", due.isoformat())
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            if datetime.now(timezone.utc) >= due:
                self.start_backup("schedule")
                due = next_run(cfg.schedule_cron, cfg.schedule_timezone, datetime.now(timezone.utc))
                log.info("next backup at %s", due.isoformat())
            self.stopping.wait(1.0)
