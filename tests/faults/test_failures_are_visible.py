"""A failed backup under the daemon is visible: in its run, its log line and the metrics that alert on
it; and nothing already on the volume is lost. (The CLI side of these faults is in tests/test_bad_paths.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.embedded import Cluster
from tests.conftest import cli, tmpfs
from tests.test_daemon import Running, backup_run, request, sample


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MB file system (tmpfs), so a full volume is a real ENOSPC. CI runs as root."""
    with tmpfs(tmp_path / "small", "size=3m") as mount:
        yield mount


def failure_shows(running: Running, message: str) -> str:
    metrics = running.wait_for(lambda: (m := request(running.base, "/metrics")[1]) and 'pg_backup_runs_total{result="failure"} 1.0' in m and m,
                               "the failure to be counted")
    assert sample(metrics, "pg_backup_last_failure_timestamp_seconds") > time.time() - 120
    assert any(message in entry["message"] and entry["level"] == "error" for entry in map(json.loads, running.log.read_text().splitlines())), \
        running.log.read_text()[-2000:]
    return metrics  # type: ignore[no-any-return]


def test_a_full_volume_fails_the_backup_visibly_and_keeps_the_older_backups(cluster: Cluster, db: str, env: dict[str, str], small_volume: Path,
                                                                             tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000) g", db)
    env = {**env, "BACKUP_DIR": str(small_volume / "backups"), "SIDECAR_LOG_FORMAT": "json"}
    running = Running({**env, "BACKUP_ON_START": "true", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    try:
        [kept] = running.wait_for(lambda: request(running.base, "/v1/backups")[1], "the first backup")
        cluster.psql("INSERT INTO t SELECT g, md5(random()::text) FROM generate_series(1, 200000) g", db)  # ~7 MB that does not compress
        run = backup_run(running)
        assert run["state"] == "failed" and "no space left" in run["error"], run
        metrics = failure_shows(running, "no space left")
        assert 2 * 2**20 < sample(metrics, "pg_backup_volume_free_bytes") < 3 * 2**20  # the partial was removed, the volume is not left full
        assert sample(metrics, "pg_backup_repository_backups") == 1 and sample(metrics, "pg_backup_last_size_bytes") == kept["size"]
    finally:
        assert running.stop() == 0
    assert not list((small_volume / "backups").glob("*.partial"))
    assert cli(env, "verify", kept["id"], check=False).returncode == 0


def test_pg_dump_killed_under_the_daemon_fails_the_backup_visibly(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 2000000) g", db)
    env = {**env, "SIDECAR_LOG_FORMAT": "json", "BACKUP_COMPRESSION_LEVEL": "12", "VALIDATION_ENABLED": "false"}
    running = Running({**env, "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 2 * * *", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: request(running.base, "/v1/backups")[1], "the catch-up backup", timeout=120)
        result: dict[str, Any] = {}

        def kill_pg_dump() -> bool:
            found = subprocess.run(["pgrep", "-f", f"pg_dump .*dbname={db}"], capture_output=True, text=True).stdout.split()
            for pid in found:
                os.kill(int(pid), signal.SIGKILL)
            return bool(found)

        import threading

        thread = threading.Thread(target=lambda: result.update(backup_run(running)))
        thread.start()
        running.wait_for(kill_pg_dump, "pg_dump to start", timeout=60)
        thread.join()
        assert result["state"] == "failed" and "pg_dump" in result["error"] and "signal 9" in result["error"], result
        metrics = failure_shows(running, "signal 9")
        assert sample(metrics, "pg_backup_repository_backups") == 1
    finally:
        assert running.stop() == 0
    assert not list(Path(env["BACKUP_DIR"]).glob("*.partial"))
