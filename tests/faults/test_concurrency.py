"""Operations at once: the CLI and the API never let a backup, a restore or a drill interleave."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli
from tests.test_bad_paths import one_line
from tests.test_daemon import Running, idle, request


def wait_until(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_restore_during_a_backup_and_a_backup_or_restore_during_a_restore_are_refused(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g", db)
    first = backup_id(env)
    directory = Path(env["BACKUP_DIR"])
    cluster.psql("INSERT INTO t VALUES (0, 'after the first backup')", db)

    slow = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env={**env, "BACKUP_COMPRESSION_LEVEL": "12"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(p.stat().st_size > 0 for p in directory.glob("*.dump.zst.partial")), "the backup to be writing")
    refused = cli(env, "restore", first, check=False)
    assert refused.returncode == 3 and "another operation holds" in one_line(refused.stderr) and "(backup by pid" in refused.stderr
    assert cluster.psql("SELECT count(*) FROM t", db) == "1000001"  # the live database was not touched
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_%'") == "0"
    out, err = slow.communicate(timeout=300)
    assert slow.returncode == 0, err
    second = out.strip().splitlines()[-1]
    assert cli(env, "verify", second, check=False).returncode == 0

    # a user check that sleeps keeps the restore busy (validating its copy) for at least 5 s, whatever the machine's load
    slow_check = directory.parent / "slow-check.yaml"
    slow_check.write_text("validation:\n  checks:\n    slow: SELECT x FROM (SELECT pg_sleep(5)::text AS x) s WHERE x = 'never'\n")
    restore = subprocess.Popen([sys.executable, "-m", "sidecar", "restore", first], env={**env, "SIDECAR_CONFIG": str(slow_check)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_restore%'") == "1", "the restore to be loading")
    for command in (("backup",), ("restore", second)):
        during = cli(env, *command, check=False)
        assert during.returncode == 3 and "(restore by pid" in one_line(during.stderr), command
    _, err = restore.communicate(timeout=300)
    assert restore.returncode == 0, err
    assert cluster.psql("SELECT count(*) FROM t", db) == "1000000"  # exactly the first backup's data, restored once
    assert [b["id"] for b in json.loads(cli(env, "list", "--json").stdout)] == [second, first]


def test_two_restore_requests_at_once_start_exactly_one_restore(env: dict[str, str], cluster: Cluster, db: str, tmp_path: Path) -> None:
    from tests.test_daemon import TOKEN

    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 200000) g", db)
    running = Running({**env, "BACKUP_ON_START": "true"}, tmp_path / "daemon.log")
    try:
        idle(running)

        def post_together(bodies: list[bytes]) -> list[tuple[int, Any]]:
            start = threading.Barrier(len(bodies))
            replies: list[tuple[int, Any]] = [(0, None)] * len(bodies)

            def post(i: int) -> None:
                start.wait()
                replies[i] = request(running.base, "/v1/restores", method="POST", body=bodies[i])

            threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return replies

        different = post_together([json.dumps({"backup": "latest", "request_id": f"job-{i}", "target_db": f"{db}_copy{i}"}).encode() for i in range(8)])
        assert sorted(status for status, _ in different) == [202] + [409] * 7, different
        [started] = [reply for status, reply in different if status == 202]
        wait_until(lambda: request(running.base, f"/v1/restores/{started['id']}")[1]["state"] != "running", "the restore", timeout=120)

        same = post_together([json.dumps({"backup": "latest", "request_id": "retried-pod", "target_db": f"{db}_same"}).encode()] * 8)
        assert sorted(status for status, _ in same) == [200] * 7 + [202], same
        assert len({reply["id"] for _, reply in same}) == 1
        wait_until(lambda: request(running.base, f"/v1/restores/{same[0][1]['id']}")[1]["state"] != "running", "the restore", timeout=120)
        metrics = request(running.base, "/metrics", token=TOKEN)[1]
        assert 'pg_backup_restores_total{result="success"} 2.0' in metrics
        databases = cluster.psql(f"SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database WHERE datname LIKE '{db}\\_%'")
        assert databases == f"{db}_copy{started['target_db'][-1]},{db}_same", databases
    finally:
        assert running.stop() == 0


def test_a_restore_request_repeated_after_the_sidecar_restarted_gets_its_restore_back(env: dict[str, str], cluster: Cluster, db: str, tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g", db)
    env = {**env, "DRILL_AFTER_BACKUP": "false", "VALIDATION_ENABLED": "false"}
    first = Running({**env, "BACKUP_ON_START": "true"}, tmp_path / "first.log")
    try:
        first.wait_for(lambda: 'pg_backup_runs_total{result="success"} 1.0' in request(first.base, "/metrics")[1], "the backup")
        done = request(first.base, "/v1/restores", method="POST", body=json.dumps({"backup": "latest", "request_id": "job-done", "target_db": f"{db}_done"}).encode())[1]
        first.wait_for(lambda: request(first.base, f"/v1/restores/{done['id']}")[1]["state"] != "running", "the restore", timeout=120)
        cluster.psql(f'DROP DATABASE "{db}_done"')  # a second restore would bring it back
        status, killed = request(first.base, "/v1/restores", method="POST", body=json.dumps({"backup": "latest", "request_id": "job-killed"}).encode())
        assert status == 202
        wait_until(lambda: cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_restore%'") == "1", "the restore to be loading")
        cluster.psql("INSERT INTO t VALUES (0, 'written while the restore ran')", db)
    finally:
        first.proc.kill()  # the container dies during the second restore
        first.proc.wait()
    second = Running({**env, "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 2 * * *"}, tmp_path / "second.log")
    try:
        status, again = request(second.base, "/v1/restores", method="POST", body=json.dumps({"backup": "latest", "request_id": "job-done", "target_db": f"{db}_done"}).encode())
        assert status == 200 and again["id"] == done["id"] and again["state"] == "succeeded"
        status, interrupted = request(second.base, "/v1/restores", method="POST", body=json.dumps({"backup": "latest", "request_id": "job-killed"}).encode())
        assert status == 200 and interrupted["id"] == killed["id"] and interrupted["state"] == "failed" and "stopped during this restore" in interrupted["error"]
        assert request(second.base, f"/v1/restores/{killed['id']}")[1]["state"] == "failed"
        time.sleep(1)
        assert 'pg_backup_restores_total{result="success"} 0.0' in request(second.base, "/metrics")[1]  # nothing restored again
    finally:
        assert second.stop() == 0
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{db}_done'") == "0"
    assert cluster.psql("SELECT count(*) FROM t WHERE g = 0", db) == "1"  # the interrupted restore never replaced the live database
