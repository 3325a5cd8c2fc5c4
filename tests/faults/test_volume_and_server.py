"""Faults, part two: the database server stopping mid-dump, a read-only or full volume, metadata
swapped between backups."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from sidecar.embedded import Cluster
from tests.conftest import MAJORS, backup_id, cli, of_major, tmpfs


@pytest.fixture(name="cluster")
def major_or_15(request: pytest.FixtureRequest) -> Cluster:
    """PostgreSQL 15; on 15 and 18 (ids pg15/pg18) for tests marked parametrize("cluster", MAJORS, indirect=True)."""
    return of_major(request)


@pytest.mark.parametrize("cluster", MAJORS, indirect=True)
def test_postgresql_stopped_mid_dump_fails_the_backup_with_the_tools_message(fresh_cluster: Cluster, env: dict[str, str]) -> None:
    fresh_cluster.psql("CREATE DATABASE app")
    fresh_cluster.psql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 3000000) g", "app")
    env = {**env, "DATABASE_URL": fresh_cluster.url("app"), "BACKUP_COMPRESSION_LEVEL": "19", "VALIDATION_ENABLED": "false"}
    directory = Path(env["BACKUP_DIR"])
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(500):
        if any(p.stat().st_size > 0 for p in directory.glob("*.dump.zst.partial")):
            break
        time.sleep(0.02)
    fresh_cluster.stop("fast")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert "pg_dump" in stderr and "terminat" in stderr, stderr
    assert not list(directory.glob("*.partial")) and json.loads(cli(env, "list", "--json").stdout) == []


@pytest.fixture
def read_only_volume(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        yield mount


def test_a_read_only_volume_is_a_clear_error_naming_the_directory(env: dict[str, str], read_only_volume: Path, db: str) -> None:
    result = cli({**env, "BACKUP_DIR": str(read_only_volume)}, "backup", check=False)
    assert result.returncode == 3
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert str(read_only_volume) in line and "read-only file system" in line, line


def test_a_backup_directory_that_is_a_file_is_a_clear_error(env: dict[str, str], tmp_path: Path, db: str) -> None:
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    result = cli({**env, "BACKUP_DIR": str(target / "backups")}, "backup", check=False)
    assert result.returncode == 3 and "cannot create backup directory" in result.stderr and "Traceback" not in result.stderr


def test_metadata_of_another_backup_is_detected_and_nothing_is_restored(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    first = backup_id(env)
    cluster.psql("INSERT INTO t VALUES (2)", db)
    second = backup_id(env)
    directory = Path(env["BACKUP_DIR"])
    shutil.copy(directory / f"{first}.metadata.json", directory / f"{second}.metadata.json")
    verify = cli(env, "verify", second, check=False)
    assert verify.returncode == 1 and f"describes '{first}'" in verify.stdout
    restore = cli(env, "restore", second, check=False)
    assert restore.returncode == 3 and "unreadable-metadata" in restore.stderr
    assert cluster.psql("SELECT count(*) FROM t", db) == "2"
    assert os.path.exists(directory / f"{first}.metadata.json")


def test_postgresql_down_at_schedule_time_and_back_after_30_s_is_retried_with_backoff(fresh_cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_daemon import Running, request

    fresh_cluster.psql("CREATE DATABASE app")
    fresh_cluster.stop("fast")
    running = Running({**env, "DATABASE_URL": fresh_cluster.url("app"), "BACKUP_ON_START": "true", "DRILL_AFTER_BACKUP": "false",
                       "BACKUP_RETRY_SECONDS": "120", "SIDECAR_LOG_FORMAT": "json"}, tmp_path / "daemon.log")
    try:
        down_at = time.monotonic()
        running.wait_for(lambda: '"event": "retry"' in running.log.read_text(), "a retry")
        ready = [request(running.base, "/readyz")[0]]
        while time.monotonic() - down_at < 30:
            time.sleep(1)
            ready.append(request(running.base, "/readyz")[0])
            assert request(running.base, "/healthz")[0] == 200  # the daemon is alive; only the database is not
        fresh_cluster.restart()
        metrics = running.wait_for(lambda: (m := request(running.base, "/metrics")[1]) and 'pg_backup_runs_total{result="success"} 1.0' in m and m,
                                   "the backup after the database came back", timeout=60)
        backups = request(running.base, "/v1/backups")[1]
    finally:
        assert running.stop() == 0
    assert set(ready) == {503}
    entries = [json.loads(line) for line in running.log.read_text().splitlines()]
    retries = [entry["time"] for entry in entries if entry.get("event") == "retry"]
    # each retry line says which attempt it was and when the next one comes
    attempts = [(entry["attempt"], entry["next_try_seconds"]) for entry in entries if entry.get("event") == "retry"]
    assert [a for a, _ in attempts] == list(range(1, len(attempts) + 1)) and all(n > 0 for _, n in attempts), attempts
    gaps = [(datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() for a, b in itertools.pairwise(retries)]
    assert 4 <= len(retries) <= 7 and gaps == sorted(gaps) and gaps[-1] >= 4, (retries, gaps)  # backoff 1, 2, 4, 8, 16 s: a few tries, not a storm
    assert 'pg_backup_runs_total{result="failure"} 0.0' in metrics and len(backups) == 1
    print(f"database down 30 s: {len(retries)} retries, gaps {gaps}")


def test_a_backup_stamped_in_the_future_neither_hides_the_backup_age_nor_gets_the_newest_pruned(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    from prometheus_client import generate_latest

    from sidecar.daemon.metrics import Metrics
    from sidecar.repository import Repository
    from tests.test_daemon import sample

    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    real = backup_id(env)
    directory = Path(env["BACKUP_DIR"])
    # what a clock one year ahead leaves behind once it is corrected: the same backup, stamped 2099
    future = "backup_2099-06-01T00-00-00-000Z"
    meta = json.loads((directory / f"{real}.metadata.json").read_text())
    for item in meta["files"].values():
        shutil.copy(directory / item["name"], directory / item["name"].replace(real, future))
    meta = json.loads(json.dumps(meta).replace(real, future))
    meta.update(timestamp="2099-06-01T00:00:00.000Z", completedAt="2099-06-01T00:00:05.000Z")
    (directory / f"{future}.metadata.json").write_text(json.dumps(meta))

    metrics = generate_latest(Metrics(Repository(directory)).registry).decode()
    assert sample(metrics, "pg_backup_future_backups") == 1
    assert 0 <= sample(metrics, "pg_backup_age_seconds") < 300  # the real backup's age, not minus 73 years
    assert real in cli(env, "verify", "latest").stdout  # latest is the real newest, not the one from the future
    prune = cli({**env, "BACKUP_RETENTION_DAYS": "1"}, "prune")
    assert prune.returncode == 0
    assert [b["id"] for b in json.loads(cli(env, "list", "--json").stdout)] == [future, real]
    assert cli(env, "verify", future, check=False).returncode == 0
