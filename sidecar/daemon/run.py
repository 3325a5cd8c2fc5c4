"""`pg-backup-sidecar run`: wire the scheduler, metrics and HTTP server together; stop on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from sidecar.config import Config
from sidecar.daemon.metrics import CachedListing, Metrics
from sidecar.daemon.scheduler import Daemon
from sidecar.daemon.server import DatabaseProbe, api_token, make_server
from sidecar.errors import LockHeld, SidecarError
from sidecar.repository import Repository

log = logging.getLogger(__name__)


def _clean_leftovers(repo: Repository) -> None:
    """Partial files of an operation that was killed with the previous daemon; skipped (and left to the
    next backup) if another process holds the volume lock."""
    try:
        with repo.lock("start-up cleanup"):
            removed = repo.cleanup()
    except LockHeld as exc:
        log.warning("leftovers not cleaned at start-up: %s", exc)
        return
    if removed:
        log.info("removed leftovers of an interrupted backup: %s", ", ".join(removed))


def run_daemon(config: Config, config_path: str | None) -> int:
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    repo.ensure()
    _clean_leftovers(repo)
    in_bucket = None
    if not config.volume:  # backups live only in the bucket: the metrics list them there (at most once a minute)
        from sidecar import api
        from sidecar.storage.copy import remote_entries

        in_bucket = CachedListing(lambda: remote_entries(api.remote_store(config)))
    metrics = Metrics(repo, in_bucket=in_bucket)
    daemon = Daemon(config, metrics, config_path)
    probe = DatabaseProbe(config, metrics.database_up)
    host, _, port = config.listen.rpartition(":")
    try:
        server = make_server(daemon, host.strip("[]"), int(port), api_token(), probe)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SidecarError(f"cannot listen on {config.listen} ({reason}); set SIDECAR_LISTEN (http.listen) to a free address") from None
    threading.Thread(target=probe.run, args=(daemon.stopping,), name="database-probe", daemon=True).start()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("listening on %s; schedule '%s' (%s)", config.listen, config.schedule_cron, config.schedule_timezone)
    wal_receiver = None
    if config.wal_archiving:  # issue 13: pg_receivewal into the WAL archive, supervised
        from sidecar import api
        from sidecar.daemon import DAEMON_PID_VARIABLE

        wal_receiver = api.start_wal_receiver(config_path, daemon.stopping, DAEMON_PID_VARIABLE)

    def stop(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.loop()
    daemon.cancel()
    if wal_receiver is not None:
        wal_receiver.join(timeout=35)
    server.shutdown()
    log.info("stopped")
    return 0
