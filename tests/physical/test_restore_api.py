"""A point-in-time restore asked of the running daemon (POST /v1/restores with a target; `restore-request --to-time`,
the restore Job's command), against a real server, the daemon's own WAL receiver and base backup."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import cli
from tests.physical.conftest import WalCluster, archived, switch
from tests.test_daemon import Running, request
from tests.test_http_api import restore_request

T = "2026-11-26T14:32:05Z"
BAD_TARGETS: list[tuple[dict[str, Any], str]] = [
    ({"to_time": "yesterday", "target_db": "x"}, "to_time 'yesterday' is not a time"),
    ({"to_time": "2026-11-26T14:32:05", "target_db": "x"}, "has no time zone"),
    ({"to_time": T, "to_lsn": "0/3000000", "target_db": "x"}, "give exactly one of to_time"),
    ({"to_latest": True, "exclusive": True, "target_db": "x"}, "exclusive stops just before a to_time, to_lsn or to_xid target"),
    ({"exclusive": True, "target_db": "x"}, "give exactly one of"),
    ({"to_xid": "abc", "target_db": "x"}, "to_xid 'abc' is not a transaction id"),
    ({"to_lsn": "zz", "target_db": "x"}, "to_lsn"),
    ({"to_latest": True, "timeline": "sideways", "target_db": "x"}, "timeline 'sideways' is not a timeline"),
    ({"to_latest": "yes", "target_db": "x"}, "must be true or false: to_latest"),
    ({"backup": "latest", "to_time": T, "target_db": "x"}, "a backup id restores that dump, a point-in-time target restores from base backups"),
    ({"to_time": T}, "add target_db"),
    ({"to_time": T, "target_db": "x", "database": "shop"}, "leave out database"),
    ({"to_time": T, "target_db": "x", "from_remote": True}, "no remote store is configured"),
]


def post(running: Running, body: dict[str, Any]) -> tuple[int, Any]:
    return request(running.base, "/v1/restores", method="POST", body=json.dumps(body).encode())


def test_a_point_in_time_restore_asked_of_the_daemon_has_the_rows_committed_before_t_and_not_after(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                                    tmp_path: Path) -> None:
    wal_cluster.psql("CREATE DATABASE app")
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)", "app")
    env = {**pitr_env, "DATABASE_URL": wal_cluster.url("app"), "WAL_ARCHIVING": "true", "DRILL_AFTER_BACKUP": "false", "VALIDATION_ENABLED": "false",
           "BACKUP_SCHEDULE": "0 2 1 1 *", "BASE_BACKUP_SCHEDULE": "0 3 1 1 *"}
    backups = Path(env["BACKUP_DIR"])

    def base_ok() -> bool:
        bases = json.loads(cli(env, "list", "--base", "--json").stdout)
        return bool(bases) and bases[0]["status"] == "ok"

    running = Running(env, tmp_path / "daemon.log")
    try:  # no base backup yet: the daemon takes one at once; good once its WAL is archived
        running.wait_for(lambda: base_ok() or (switch(wal_cluster) and False), "the daemon's first base backup", timeout=120)
        wal_cluster.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g", "app")
        switch(wal_cluster)
        time.sleep(0.3)
        target = datetime.now(UTC)
        time.sleep(0.3)
        wal_cluster.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(101, 150) g; DELETE FROM t WHERE id <= 10", "app")
        last = switch(wal_cluster)
        running.wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
        to_time = target.isoformat().replace("+00:00", "Z")

        job = restore_request(env, running.base, "--to-time", to_time, "--target-db", "app_then", "--request-id", "pitr-1", "--wait")
        assert job.returncode == 0, job.stdout + job.stderr
        assert f"the point in time to_time={to_time}" in job.stdout and "succeeded" in job.stdout, job.stdout
        assert wal_cluster.psql("SELECT count(*), min(id), max(id), count(DISTINCT note) FROM t", "app_then") == "100|1|100|1"
        assert wal_cluster.psql("SELECT count(*) FROM t", "app") == "140"  # the live database is untouched
        record = request(running.base, "/v1/restores/pitr-1")[1]
        assert record["backup"] is None and record["target"] == {"to_time": to_time} and record["target_db"] == "app_then"
        assert record["state"] == "succeeded" and record["result"]["database"] == "app_then"

        for i, (body, words) in enumerate(BAD_TARGETS):  # refused whole, with one line, before anything starts
            status, reply = post(running, {"request_id": f"bad-{i}", **body})
            assert status == 400 and words in reply["error"] and "\n" not in reply["error"], (body, reply)
            assert request(running.base, f"/v1/restores/bad-{i}")[0] == 404
        client = restore_request(env, running.base, "--to-time", "yesterday", "--target-db", "x", "--request-id", "bad-client")
        assert client.returncode == 2 and client.stderr.splitlines() == ["error: --to-time 'yesterday' is not a time; write it like 2026-11-26T14:32:05Z"]
        _the_same_request_id_is_the_same_restore(running, to_time)
    finally:
        assert running.stop() == 0
    running = Running(env, tmp_path / "daemon2.log")  # the records are on the volume: a restart forgets nothing
    try:
        _the_same_request_id_is_the_same_restore(running, to_time)
        assert len(request(running.base, "/v1/restores")[1]) == 1
    finally:
        assert running.stop() == 0
    assert wal_cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'elsewhere'") == "0"


def _the_same_request_id_is_the_same_restore(running: Running, to_time: str) -> None:
    later = (datetime.fromisoformat(to_time.replace("Z", "+00:00")) + timedelta(seconds=1)).isoformat()
    status, reply = post(running, {"request_id": "pitr-1", "to_time": later, "target_db": "app_then"})
    assert status == 422 and "pitr-1" in reply["error"] and f"to_time={to_time} into 'app_then'" in reply["error"], reply
    assert reply["earlier"]["target"] == {"to_time": to_time} and reply["requested"]["target"] == {"to_time": later}
    assert post(running, {"request_id": "pitr-1", "to_time": to_time, "target_db": "elsewhere"})[0] == 422
    assert post(running, {"request_id": "pitr-1", "backup": "latest", "target_db": "app_then"})[0] == 422
    status, reply = post(running, {"request_id": "pitr-1", "to_time": to_time, "target_db": "app_then"})
    assert status == 200 and reply["state"] == "succeeded" and reply["target"] == {"to_time": to_time}
