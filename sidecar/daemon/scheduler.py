"""The daemon's cron loop. Backups run as child processes (`pg-backup-sidecar backup --json`), so a
cancelled or crashed backup never takes the daemon down and SIGTERM reaches pg_dump's process group."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from sidecar import postgres
from sidecar.config import Config
from sidecar.daemon import DAEMON_PID_VARIABLE
from sidecar.daemon.metrics import Metrics, completed_at
from sidecar.daemon.restores import describe, option
from sidecar.errors import SidecarError
from sidecar.repository import Entry, Repository, iso_timestamp, newest_good, write_atomically

log = logging.getLogger(__name__)


def _write_log_line(line: str) -> None:
    """Pass a child's log line on whole: holding the log handlers' locks, so it never interleaves with ours."""
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.acquire()
    try:
        sys.stderr.write(line if line.endswith("\n") else line + "\n")
        sys.stderr.flush()
    finally:
        for handler in reversed(handlers):
            handler.release()


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


GAP_BASE_BACKUP_EVERY = timedelta(hours=1)  # at most one base backup per hour for gaps: a persistent gap must not loop
GAP_ANSWERED = ".gap-answered.json"  # wal/.gap-answered.json: when the daemon last took a base backup for a gap (survives restarts)


def base_backup_for_gap(gap_at: datetime | None, newest_base_started: datetime | None, last_answered: datetime | None, now: datetime,
                        every: timedelta = GAP_BASE_BACKUP_EVERY) -> tuple[bool, str]:
    """Whether a gap in the WAL is answered with a base backup now, and why (pure). A base backup started after the gap
    answers it; otherwise one is taken, but at most one per `every` (the last one is remembered on the volume), so a gap
    that persists (a slot lost over and over) never becomes a base backup loop."""
    if gap_at is None:
        return False, "no gap"
    if newest_base_started is not None and newest_base_started >= gap_at:
        return False, f"base backup started at {iso_timestamp(newest_base_started)}, after the gap"
    if last_answered is not None and now - last_answered < every:
        return False, (f"a base backup was taken for a gap at {iso_timestamp(last_answered)}; at most one per "
                       f"{every.total_seconds() / 3600:g} h, the next at {iso_timestamp(last_answered + every)}")
    return True, "a gap in the WAL archive"


RESTORES_DIR = ".restores"
INTERRUPTED = ("the sidecar stopped during this restore; the live database is either the old or the restored one, never half-restored "
               "(docs/reliability.md): check it, then send a new request_id to restore again")
OFFSITE_RETRY = (15.0, 900.0)  # seconds: the first retry of a failed off-site copy, and the longest wait between retries (doubling)
OFFSITE_RECHECK = 600.0  # seconds between looks for pending backups when nothing woke the copier
REMEMBERED = 1000  # finished runs and restores answered by /v1/runs and /v1/restores; older ones are forgotten


def _now() -> str:
    return iso_timestamp(datetime.now(timezone.utc))


def _described(ask: dict[str, Any]) -> str:
    """A restore request in words, for the 422 that names two of them."""
    source = " from the remote store" if ask.get("from_remote") else ""
    into = f" into {ask['target_db']!r}" if ask.get("target_db") else " over the live database" if not ask.get("database") else ""
    return f"{describe(ask.get('backup'), ask.get('target'), ask.get('database'))}{source}{into}"


RESTORE_KEYS = ("backup", "target", "target_db", "database", "from_remote")  # what a request_id stands for


def _request_of(record: dict[str, Any]) -> dict[str, Any]:
    """What a restore was asked for; records written before target, database or from_remote existed lack them (None,
    None, False: a dump restored from the volume)."""
    return {key: record.get(key, False if key == "from_remote" else None) for key in RESTORE_KEYS}


def restore_args(record: dict[str, Any]) -> list[str]:
    """The `pg-backup-sidecar restore` arguments for a restore record (pure)."""
    target = record.get("target")
    if target:
        args = ["restore"]
        for key, value in target.items():
            args += [option(key)] + ([] if value is True else [str(value)])
    else:
        args = ["restore", record["backup"]] + (["--database", record["database"]] if record.get("database") else [])
    args += ["--target-db", record["target_db"]] if record.get("target_db") else []
    return args + (["--from-remote"] if record.get("from_remote") else [])


def per_database(outcome: Any) -> dict[str, Any] | None:
    """For a whole server's set: which databases were restored and which failed and why (from `restore --json`'s report,
    or its failure's details); None for one database."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("restored"), list):
        return None
    return {"restored": [item.get("database") for item in outcome["restored"] if isinstance(item, dict)], "failed": outcome.get("failed") or {}}


def _forget_oldest(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep at most REMEMBERED records (the newest), so a daemon that runs for years stays small."""
    return [records.pop(key) for key in list(records)[: max(0, len(records) - REMEMBERED)]]


class Daemon:
    def __init__(self, config: Config, metrics: Metrics, config_path: str | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.config_path = config_path
        self.repo = Repository(config.backup_dir, group_readable=config.group_readable)
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()
        self._run_lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None
        self.runs: dict[str, dict[str, Any]] = {}
        self.restores: dict[str, dict[str, Any]] = {}
        self.request_ids: dict[str, str] = {}
        self._requests_lock = threading.Lock()
        self._offsite_wake = threading.Event()
        self._copy_lock = threading.Lock()  # one copying round at a time: the copier thread, or a drill from the remote waiting for its copy
        self._base_wanted: str | None = None  # why a base backup is due and waits for the running operation to end
        self._backup_wanted: str | None = None  # a scheduled backup waiting for a base backup, restore or drill to end
        self._backup_waiting_said = False
        self._gap_seen: str | None = None
        self._gap_logged: str | None = None
        self._gap_recheck = datetime.min.replace(tzinfo=timezone.utc)
        self._hole_recheck = datetime.min.replace(tzinfo=timezone.utc)
        self._pitr_wanted: str | None = None  # why a PITR drill is due and waits (for the running operation, or a good base backup)
        self._pitr_base_checked = 0.0
        metrics.pitr_drill_scheduled.set(1 if config.pitr_drill_cron else 0)
        if config.remote is not None:
            metrics.watch_remote(config.remote)
        self._load_restores()

    # --- operations: one at a time, each a child process -------------------------------------------

    def _cli(self, *args: str, record: dict[str, Any] | None = None, failure: dict[str, Any] | None = None) -> tuple[bool, Any]:
        """Run `pg-backup-sidecar ARGS --json` as a cancellable child; (ok, parsed JSON or the error line).
        The child's JSON log lines (progress, warnings) are passed on to our log as they come. When it fails, the JSON
        it printed (what did succeed of a partly failed operation) goes into `failure`."""
        argv = [sys.executable, "-m", "sidecar"] + (["--config", self.config_path] if self.config_path else []) + [*args, "--json"]
        env = {**os.environ, "SIDECAR_LOG_FORMAT": "json", DAEMON_PID_VARIABLE: str(os.getpid())}
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        self._child = child
        errors: list[str] = []

        def relay() -> None:
            assert child.stderr is not None
            for line in child.stderr:
                if line.startswith("error:"):
                    errors.append(line.removeprefix("error:").strip())
                else:
                    if record is not None and '"sidecar.progress"' in line:
                        try:
                            record["progress"] = json.loads(line)["message"]
                        except ValueError:
                            pass
                    _write_log_line(line)

        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        try:
            assert child.stdout is not None
            out = child.stdout.read()
            code = child.wait()
            relay_thread.join(timeout=5)
        finally:
            self._child = None
        if code in (0, 1) and out.strip():
            return code == 0, json.loads(out)
        if failure is not None and out.strip():
            try:
                failure.update(json.loads(out))
            except (ValueError, TypeError):
                pass
        return False, errors[-1] if errors else f"exit code {code}"

    def _database_reachable(self) -> str | None:
        """Retry the connection with exponential backoff for up to schedule.retry_seconds; None when reachable."""
        retrying = Retrying(stop=stop_after_delay(self.config.retry_seconds) | stop_after_attempt(50),
                            wait=wait_exponential(multiplier=1, min=1, max=30), retry=retry_if_exception_type(SidecarError),
                            before_sleep=lambda state: log.warning(
                                "database unreachable (attempt %d), next try in %.0fs: %s", state.attempt_number,
                                state.next_action.sleep if state.next_action else 0, state.outcome.exception() if state.outcome else "",
                                extra={"event": "retry", "attempt": state.attempt_number,
                                       "next_try_seconds": round(state.next_action.sleep, 1) if state.next_action else None}),
                            reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    if self.stopping.is_set():
                        return "stopping"
                    postgres.connect(self.config).close()
        except SidecarError as exc:
            return str(exc)
        return None

    def start_backup(self, reason: str) -> str | None:
        """Start a backup in a thread; None if an operation is already running."""
        if not self._run_lock.acquire(blocking=False):
            log.warning("backup (%s) skipped: another operation is still running", reason)
            return None
        run_id = f"run-{int(time.time() * 1000)}"
        self.runs[run_id] = {"id": run_id, "state": "running", "reason": reason, "started": _now(), "finished": None}
        _forget_oldest(self.runs)
        threading.Thread(target=self._backup, args=(run_id, reason), name="backup", daemon=True).start()
        return run_id

    def _backup(self, run_id: str, reason: str) -> None:
        started = time.monotonic()
        metadata: dict[str, Any] | None = None
        self.metrics.in_progress.labels(operation="backup").set(1)
        try:
            log.info("backup started (%s)", reason, extra={"event": "backup_started"})
            unreachable = self._database_reachable()
            result: Any
            ok, result = (False, unreachable) if unreachable else self._cli("backup", record=self.runs[run_id])
            if ok:
                metadata = result
                self.runs[run_id].update(state="succeeded", backup=result["id"], finished=_now())
                log.info("backup %s succeeded in %.1fs", result["id"], time.monotonic() - started,
                         extra={"event": "backup_succeeded", "backup_id": result["id"], "duration_seconds": round(time.monotonic() - started, 3)})
            else:
                self.runs[run_id].update(state="failed", error=result, finished=_now())
                log.error("backup failed: %s", str(result).removeprefix("backup failed: "),
                          extra={"event": "backup_failed", "duration_seconds": round(time.monotonic() - started, 3)})
        finally:
            self.metrics.in_progress.labels(operation="backup").set(0)
            self.metrics.backup_finished(time.monotonic() - started, metadata)
            if metadata:
                self._offsite_wake.set()  # the backup copied itself; a failed copy is the copier's to retry
            try:
                if metadata and self.config.drill_after_backup and not self.stopping.is_set():
                    self._drill(metadata["id"])
            finally:
                self._run_lock.release()

    def start_drill(self) -> bool:
        """A scheduled restore drill of the newest good backup; False if an operation is running."""
        if not self._run_lock.acquire(blocking=False):
            log.warning("restore drill skipped: another operation is still running")
            return False

        def run() -> None:
            try:
                self._drill("latest")
            finally:
                self._run_lock.release()

        threading.Thread(target=run, name="drill", daemon=True).start()
        return True

    def _drill(self, backup_id: str) -> None:
        self.metrics.in_progress.labels(operation="drill").set(1)
        try:
            # without a volume the backup is in the bucket already, and the drill reads it from there
            if self.config.drill_from_remote and self.config.volume and (why := self._not_off_site(backup_id)):
                self.metrics.drills.labels(result="skipped").inc()
                log.warning("restore drill of %s from the remote store skipped: %s", backup_id, why,
                            extra={"event": "drill_skipped", "backup_id": backup_id})
                return
            ok, result = self._cli("drill", backup_id)
            skipped = ok and isinstance(result, dict) and result.get("skipped")
            self.metrics.drills.labels(result="skipped" if skipped else "success" if ok else "failure").inc()
            (log.info if ok else log.error)("restore drill of %s %s", backup_id, f"skipped: {skipped}" if skipped else "passed" if ok else f"failed: {result}")
        finally:
            self.metrics.in_progress.labels(operation="drill").set(0)

    def _not_off_site(self, backup_id: str) -> str | None:
        """Before a drill from the remote (DRILL_FROM_REMOTE): the backup must be off-site. The backup copied itself when
        it was taken; if that failed, one copying round is tried now. Why the drill cannot run, or None.
        'latest' drills the newest backup off-site, whether or not the newest on the volume could be copied."""
        from sidecar.storage.offsite import is_copied

        assert self.config.remote is not None
        if backup_id != "latest" and is_copied(self.repo, backup_id, self.config.remote):
            return None
        try:
            self.copy_pending()
        except Exception:  # a bug: logged; the drill decides below
            log.exception("off-site copy before the drill failed")
        if backup_id == "latest" or is_copied(self.repo, backup_id, self.config.remote):
            return None
        return (f"{backup_id} is not off-site yet (its copy failed, see the error above; the copier retries it); the drill of the "
                "off-site copy runs with the next backup or drill schedule, or by hand: pg-backup-sidecar drill ID --from-remote")

    def running(self) -> list[str]:
        """The operations the in-progress gauges show as running."""
        return [op for op in ("backup", "restore", "drill", "base_backup", "pitr_drill")
                if self.metrics.registry.get_sample_value("pg_backup_in_progress", {"operation": op})]

    def start_wanted_backup(self) -> None:
        """Start the scheduled backup when it is due. When a base backup, a restore or a drill is running, it waits for it to
        end (it was skipped before: a weekly base backup of a large database cost that night's dump); when a backup is
        running, that backup is this one."""
        reason = self._backup_wanted
        if reason is None:
            return
        running = self.running()
        if "backup" in running:
            log.warning("backup (%s) skipped: a backup is running already", reason)
            self._backup_wanted, self._backup_waiting_said = None, False
            return
        if self._run_lock.locked():
            if not self._backup_waiting_said:
                what = running[0].replace("_", " ") if running else "another operation"
                log.info("backup (%s) is due; it starts when the running %s has finished", reason, what, extra={"event": "backup_deferred"})
                self._backup_waiting_said = True
            return
        if self.start_backup(reason if not self._backup_waiting_said else f"{reason}, deferred") is not None:
            self._backup_wanted, self._backup_waiting_said = None, False

    def busy(self) -> dict[str, Any]:
        """The 409 answer while an operation runs, naming it as far as the in-progress gauges tell."""
        running = self.running()
        what = f"a {running[0].replace('_', ' ')}" if running else "another operation"
        return {"error": f"{what} is running; retry when it has finished", "busy": running[0] if running else None}

    def find_restore(self, key: str) -> dict[str, Any] | None:
        """A restore by its id, else by the request_id it was asked with."""
        return self.restores.get(key) or self.restores.get(self.request_ids.get(key, ""))

    def request_restore(self, ask: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, restore record) for a checked request (server.restore_ask: request_id, backup or a point-in-time
        target, target_db, database, from_remote). The same request_id always answers with the same restore; the same
        request_id with anything else asked is a mistake (422), never a second restore."""
        request_id = ask["request_id"]
        requested = _request_of(ask)
        with self._requests_lock:
            if request_id in self.request_ids:
                earlier = self.restores[self.request_ids[request_id]]
                if _request_of(earlier) != requested:
                    return 422, {"error": f"request_id {request_id!r} was already used for restore {earlier['id']} of "
                                          f"{_described(earlier)}; this request asks for {_described(ask)}: use a new request_id for a new restore",
                                 "request_id": request_id, "earlier": {"id": earlier["id"], **_request_of(earlier)}, "requested": requested}
                return 200, earlier
            if not self._run_lock.acquire(blocking=False):
                return 409, self.busy()
            restore_id = f"restore-{int(time.time() * 1000)}"
            record: dict[str, Any] = {"id": restore_id, "request_id": request_id, **requested, "state": "running", "progress": None,
                                      "error": None, "result": None, "databases": None, "started": _now(), "finished": None}
            self.restores[restore_id] = record
            self.request_ids[request_id] = restore_id
            for forgotten in _forget_oldest(self.restores):
                self.request_ids.pop(forgotten["request_id"], None)
                self._restore_path(forgotten["request_id"]).unlink(missing_ok=True)
            self._save_restore(record)
        threading.Thread(target=self._restore, args=(record,), name="restore", daemon=True).start()
        return 202, record

    def _restore(self, record: dict[str, Any]) -> None:
        self.metrics.in_progress.labels(operation="restore").set(1)
        try:
            failure: dict[str, Any] = {}
            ok, result = self._cli(*restore_args(record), record=record, failure=failure)
            final = {**record, "state": "succeeded" if ok else "failed", "result": result if ok else None, "error": None if ok else result,
                     "databases": per_database(result if ok else failure), "finished": _now()}
            self._save_restore(final)
            self.metrics.restores.labels(result="success" if ok else "failure").inc()
            record.update(final)  # the API shows the outcome only once it is on the volume and counted
            what = record["backup"] or _described(record)
            (log.info if ok else log.error)("restore %s of %s %s", record["id"], what, "succeeded" if ok else f"failed: {result}")
        finally:
            self.metrics.in_progress.labels(operation="restore").set(0)
            self._run_lock.release()

    # restore records live on the volume too, so a Job retried after the sidecar restarted gets its
    # restore back (never a second one)

    def _restore_path(self, request_id: str) -> Path:
        return self.repo.dir / RESTORES_DIR / (hashlib.sha256(request_id.encode()).hexdigest()[:40] + ".json")

    def _save_restore(self, record: dict[str, Any]) -> None:
        path = self._restore_path(record["request_id"])
        try:
            self.repo.make_dir(path.parent)
            write_atomically(path, json.dumps({k: v for k, v in record.items() if k != "progress"}).encode())
        except OSError as exc:
            log.warning("cannot record restore %s on the backup volume (%s): the same request after a restart would restore again",
                        record["id"], exc.strerror)

    def _load_restores(self) -> None:
        try:
            paths = sorted(((p.stat().st_mtime, p) for p in (self.repo.dir / RESTORES_DIR).glob("*.json")), key=lambda item: item[0])
        except OSError:
            return
        for _, path in paths[:-REMEMBERED]:
            path.unlink(missing_ok=True)
        for _, path in paths[-REMEMBERED:]:
            try:
                record = json.loads(path.read_text())
                restore_id, request_id = record["id"], record["request_id"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable restore record %s (%s)", path, exc)
                continue
            record["progress"] = None
            if record.get("state") == "running":  # this daemon's predecessor stopped during it
                record.update(state="failed", error=INTERRUPTED)
                self._save_restore(record)
            self.restores[restore_id] = record
            self.request_ids[request_id] = restore_id

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

    # --- base backups (WAL_ARCHIVING=true): on BASE_BACKUP_SCHEDULE, and at once after a gap ----------------------------

    def start_base_backup(self, reason: str) -> bool:
        """A base backup in a thread (`pg-backup-sidecar base-backup`, which prunes after it); False if an operation runs."""
        if not self._run_lock.acquire(blocking=False):
            return False

        def run() -> None:
            started = time.monotonic()
            self.metrics.in_progress.labels(operation="base_backup").set(1)
            try:
                log.info("base backup started (%s)", reason, extra={"event": "base_backup_started", "reason": reason})
                ok, result = self._cli("base-backup")
                if ok:
                    log.info("base backup %s taken in %.1fs (%s)", result["id"], time.monotonic() - started, reason,
                             extra={"event": "base_backup_succeeded", "backup_id": result["id"]})
                else:
                    log.error("base backup (%s) failed: %s", reason, result, extra={"event": "base_backup_failed"})
            finally:
                self.metrics.in_progress.labels(operation="base_backup").set(0)
                self._run_lock.release()

        threading.Thread(target=run, name="base-backup", daemon=True).start()
        return True

    def _newest_base(self, good_only: bool) -> datetime | None:
        """When the newest base backup (or the newest good one) started; None if there is none."""
        from sidecar.physical.base import base_dir, list_base_backups
        from sidecar.repository import parse_id

        if good_only:
            good = [b for b in list_base_backups(self.config) if b.good]
            return parse_id(good[0].id) if good else None
        ids = sorted(p.name.removesuffix(".metadata.json") for p in base_dir(self.config).glob("backup_*.metadata.json"))
        for backup_id in reversed(ids):
            try:
                return parse_id(backup_id)
            except SidecarError:
                continue
        return None

    def _gap_answered_path(self) -> Path:
        return self.config.backup_dir / "wal" / GAP_ANSWERED

    def _check_gap(self, now: datetime) -> str | None:
        """The reason for a base backup if a gap the receiver noted needs one now (see base_backup_for_gap)."""
        from sidecar.physical.wal import last_gap, note_gap

        gap = last_gap(self.config.backup_dir)
        if now >= self._hole_recheck:  # a hole in the archive the receiver did not note (a segment deleted by hand, a lost
            self._hole_recheck = now + timedelta(minutes=1)  # volume's copy): the same gap to the metric, so the same answer
            from sidecar.physical.observe import archive_hole

            hole = archive_hole(self.config)
            reason = f"segment {hole[1]} is missing from the archive" if hole else None
            if hole and reason and (gap is None or gap.get("reason") != reason):
                log.warning("WAL archive of system %s: %s; a base backup will cover it", hole[0], reason, extra={"event": "wal_gap"})
                note_gap(self.config.backup_dir, hole[0], str(reason), self.repo.file_mode)
                gap = last_gap(self.config.backup_dir)
        if gap is None:
            return None
        if gap["at"] == self._gap_seen and now < self._gap_recheck:  # a new gap is looked at at once, an old one once a minute
            return None
        self._gap_seen, self._gap_recheck = gap["at"], now + timedelta(minutes=1)
        gap_at = datetime.fromisoformat(str(gap["at"]).replace("Z", "+00:00"))
        answered = None
        try:
            answered = datetime.fromisoformat(json.loads(self._gap_answered_path().read_text())["at"].replace("Z", "+00:00"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        take, why = base_backup_for_gap(gap_at, self._newest_base(good_only=False), answered, now)
        if not take:
            if "at most one" in why and self._gap_logged != gap["at"]:
                self._gap_logged = gap["at"]
                log.warning("WAL gap at %s (%s) not answered with a base backup now: %s", gap["at"], gap.get("reason"), why,
                            extra={"event": "wal_gap_base_backup_deferred"})
            return None
        try:
            write_atomically(self._gap_answered_path(), json.dumps({"at": iso_timestamp(now), "gap": gap}).encode(), self.repo.file_mode)
        except OSError as exc:
            log.warning("cannot note the gap's base backup on the volume (%s)", exc.strerror)
        return f"gap: {gap.get('reason')}"

    # --- PITR drills (PITR_DRILL_SCHEDULE, issue 16) ------------------------------------------------------------------

    def start_pitr_drill(self, reason: str) -> str | None:
        """A PITR drill in a thread (`pg-backup-sidecar drill --pitr`, which records its outcome on the volume for the
        metrics); its run record in /v1/runs. None if an operation is running."""
        if not self._run_lock.acquire(blocking=False):
            return None
        run_id = f"pitr-drill-{int(time.time() * 1000)}"
        record: dict[str, Any] = {"id": run_id, "operation": "pitr-drill", "state": "running", "reason": reason, "started": _now(), "finished": None}
        self.runs[run_id] = record
        _forget_oldest(self.runs)

        def run() -> None:
            self.metrics.in_progress.labels(operation="pitr_drill").set(1)
            try:
                log.info("PITR drill started (%s)", reason, extra={"event": "pitr_drill_started", "reason": reason})
                ok, result = self._cli("drill", "--pitr", record=record)
                report = result if isinstance(result, dict) else {}
                summary = {k: report.get(k) for k in ("restore_point", "restore_point_lsn", "segment", "base_backup", "tables", "rows",
                                                       "duration_seconds", "mismatches")}
                record.update(state="succeeded" if ok else "failed", result=summary if report else None, finished=_now(),
                              **({} if ok else {"error": report.get("error") or str(result)}))
                if not ok:  # the child logged the passed drill; a failure that never reached the record is said here
                    log.error("PITR drill failed: %s", record["error"], extra={"event": "pitr_drill_failed"})
            except Exception as exc:  # the child could not run or answered nonsense: the run ends failed, never "running" forever
                record.update(state="failed", error=f"the drill could not run: {exc}", finished=_now())
                log.error("PITR drill failed: %s", record["error"], extra={"event": "pitr_drill_failed"})
            finally:
                self.metrics.in_progress.labels(operation="pitr_drill").set(0)
                self._run_lock.release()

        threading.Thread(target=run, name="pitr-drill", daemon=True).start()
        return run_id

    def _last_pitr_drill(self) -> datetime | None:
        from sidecar.physical.drill import read_record

        finished = (read_record(self.config.backup_dir).get("last") or {}).get("finishedAt")
        try:
            return datetime.fromisoformat(str(finished).replace("Z", "+00:00")) if finished else None
        except ValueError:
            return None

    def _pitr_tick(self, now: datetime, due: datetime) -> None:
        """Start a due PITR drill once nothing else runs: on schedule at once (no good base backup then is a failure worth
        its alert), a catch-up one once a good base backup exists; never before a base backup that is waiting to start."""
        if now >= due:
            self._pitr_wanted = "schedule"
        if not self._pitr_wanted or self._base_wanted:
            return
        if self._pitr_wanted != "schedule" and not self._pitr_drill_ready():
            return
        if self.start_pitr_drill(self._pitr_wanted):
            self._pitr_wanted = None

    def _pitr_drill_ready(self) -> bool:
        """A catch-up drill waits for a good base backup (a new daemon takes its first one at start); checked every 5 s."""
        if time.monotonic() - self._pitr_base_checked < 5:
            return False
        self._pitr_base_checked = time.monotonic()
        return self._newest_base(good_only=True) is not None

    # --- off-site copies ---------------------------------------------------------------------------

    def copy_pending(self) -> bool:
        """One round of copying the pending backups to the remote store; True when none is left."""
        with self._copy_lock:
            return self._copy_pending_round()

    def _copy_pending_round(self) -> bool:
        from sidecar.storage.objectstore import ObjectStore
        from sidecar.storage.offsite import copy_pending, count_error, pending

        assert self.config.remote is not None
        if not pending(self.repo, self.config.remote):
            return True
        try:
            report = copy_pending(self.repo, ObjectStore(self.config.remote), self.config.remote)
        except SidecarError as exc:  # the store cannot even be set up (credentials missing)
            count_error(self.repo, "copy")  # counted on the volume (pg_backup_remote_errors_total); copies count their own
            log.error("off-site copies pending: %s", exc, extra={"event": "offsite_copy_failed"})
            return False
        for done in report.copied:
            log.info("backup %s copied off-site (%d bytes written)", done.id, done.bytes, extra={"event": "offsite_copied", "backup_id": done.id})
        return report.left == 0

    def _offsite_loop(self) -> None:
        """Copies pending backups at start-up, after each backup, and every OFFSITE_RECHECK; after a failure, again
        with a doubling wait until they are all copied."""
        wait = 0.0
        backoff = OFFSITE_RETRY[0]
        while not self.stopping.is_set():
            self._offsite_wake.wait(wait)
            self._offsite_wake.clear()
            if self.stopping.is_set():
                return
            try:
                done = self.copy_pending()
            except Exception:  # never let the copier die: the next round tries again
                log.exception("off-site copier: unexpected error")
                done = False
            if done:
                wait, backoff = OFFSITE_RECHECK, OFFSITE_RETRY[0]
            else:
                wait, backoff = backoff, min(backoff * 2, OFFSITE_RETRY[1])
                log.warning("off-site copies pending; next try in %.0fs", wait, extra={"event": "retry", "next_try_seconds": wait})

    # --- the loop ---------------------------------------------------------------------------------

    def _backups(self) -> list[Entry]:
        """The backups the catch-up rule looks at: the volume's, or without a volume the remote store's (none if it
        cannot be listed now: a catch-up backup then runs, as with an empty volume)."""
        if self.config.volume or self.config.remote is None:
            return self.repo.entries()
        from sidecar.storage.copy import remote_entries
        from sidecar.storage.objectstore import ObjectStore

        try:
            return remote_entries(ObjectStore(self.config.remote))
        except SidecarError as exc:
            log.warning("cannot list the remote store at start-up (%s); the catch-up rule sees no backup", exc)
            return []

    def loop(self) -> None:
        cfg = self.config
        if cfg.remote is not None:
            threading.Thread(target=self._offsite_loop, name="offsite", daemon=True).start()
            if cfg.wal_archiving and cfg.volume:  # WAL and base backups off-site as they are archived (sidecar/physical/offsite.py)
                from sidecar.physical.offsite import copy_loop

                threading.Thread(target=copy_loop, args=(cfg, self.stopping), name="wal-offsite", daemon=True).start()
        newest = newest_good(self._backups(), datetime.now(timezone.utc), include_future=False)
        newest_at = datetime.fromtimestamp(completed_at(newest), timezone.utc) if newest else None
        if cfg.run_on_start:
            self.start_backup("run_on_start")
        elif needs_catch_up(newest_at, cfg.schedule_cron, cfg.schedule_timezone, datetime.now(timezone.utc)):
            self.start_backup("catch-up: the newest good backup is older than one schedule interval")
        due = next_run(cfg.schedule_cron, cfg.schedule_timezone, datetime.now(timezone.utc))
        log.info("next backup at %s", due.isoformat())
        drill_due = next_run(cfg.drill_cron, cfg.schedule_timezone, datetime.now(timezone.utc)) if cfg.drill_cron else None
        base_due = None
        if cfg.wal_archiving:
            base_due = next_run(cfg.base_backup_cron, cfg.schedule_timezone, datetime.now(timezone.utc))
            if needs_catch_up(self._newest_base(good_only=True), cfg.base_backup_cron, cfg.schedule_timezone, datetime.now(timezone.utc)):
                self._base_wanted = "catch-up: no good base backup within one BASE_BACKUP_SCHEDULE interval"
            log.info("next base backup at %s", base_due.isoformat())
        pitr_due = next_run(cfg.pitr_drill_cron, cfg.schedule_timezone, datetime.now(timezone.utc)) if cfg.pitr_drill_cron else None
        if cfg.pitr_drill_cron and needs_catch_up(self._last_pitr_drill(), cfg.pitr_drill_cron, cfg.schedule_timezone, datetime.now(timezone.utc)):
            self._pitr_wanted = "catch-up: no PITR drill within one PITR_DRILL_SCHEDULE interval"
        if pitr_due is not None:
            log.info("next PITR drill at %s", pitr_due.isoformat())
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            now = datetime.now(timezone.utc)
            if now >= due:
                self._backup_wanted = "schedule"
                due = next_run(cfg.schedule_cron, cfg.schedule_timezone, now)
                log.info("next backup at %s", due.isoformat())
            self.start_wanted_backup()
            if cfg.drill_cron and drill_due and now >= drill_due:
                self.start_drill()
                drill_due = next_run(cfg.drill_cron, cfg.schedule_timezone, now)
            if base_due is not None:
                if now >= base_due:
                    self._base_wanted = "schedule"
                    base_due = next_run(cfg.base_backup_cron, cfg.schedule_timezone, now)
                    log.info("next base backup at %s", base_due.isoformat())
                try:
                    self._base_wanted = self._check_gap(now) or self._base_wanted
                except (OSError, SidecarError) as exc:
                    log.warning("cannot look for WAL gaps: %s", exc)
                if self._base_wanted and self.start_base_backup(self._base_wanted):
                    self._base_wanted = None
            if pitr_due is not None:
                self._pitr_tick(now, pitr_due)
                if now >= pitr_due:
                    pitr_due = next_run(str(cfg.pitr_drill_cron), cfg.schedule_timezone, now)
                    log.info("next PITR drill at %s", pitr_due.isoformat())
            self.stopping.wait(1.0)
