"""The API as a restore Job and an operator use it, against a real daemon process: idempotency keys,
what /readyz tells whom, listings, and the restore-request client's refusals and patience."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sidecar.embedded import Cluster
from tests.conftest import backup_id
from tests.test_daemon import TOKEN, Running, request, sample

MISSING = "backup_2001-01-01T00-00-00-000Z"  # a well-formed id of no backup: its restore fails at once


def restore_request(env: dict[str, str], server: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "restore-request", *args, "--server", server], env={**env, "SIDECAR_API_TOKEN": TOKEN},
                          capture_output=True, text=True, timeout=timeout)


def finished(running: Running, restore: dict[str, Any]) -> dict[str, Any]:
    return running.wait_for(lambda: (r := request(running.base, f"/v1/restores/{restore['id']}")[1])["state"] != "running" and r,  # type: ignore[no-any-return]
                            "the restore to end")


def test_a_request_id_reused_for_another_restore_is_refused_with_both_requests_named(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    first_backup = backup_id(env)
    running = Running({**env, "BACKUP_ON_START": "false", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    try:
        job = restore_request(env, running.base, "latest", "--target-db", db + "_rr2", "--request-id", "rq-1", "--wait")
        assert job.returncode == 0, job.stderr
        # the same key for another backup into another database: refused, and nothing is restored
        again = restore_request(env, running.base, first_backup, "--target-db", db + "_totally_different", "--request-id", "rq-1", "--wait")
        assert again.returncode == 2, again.stdout + again.stderr
        [line] = again.stderr.splitlines()
        assert "rq-1" in line and f"latest into '{db}_rr2'" in line and f"{first_backup} into '{db}_totally_different'" in line, line
        status, reply = request(running.base, "/v1/restores", method="POST",
                                body=json.dumps({"backup": "latest", "request_id": "rq-1"}).encode())  # same key, now over the live database
        assert status == 422 and reply["earlier"]["target_db"] == db + "_rr2" and reply["requested"] == {"backup": "latest", "target": None, "target_db": None,
                                                                                          "database": None, "from_remote": False}
        # the same request again is still the same restore
        status, reply = request(running.base, "/v1/restores", method="POST",
                                body=json.dumps({"backup": "latest", "request_id": "rq-1", "target_db": db + "_rr2"}).encode())
        assert status == 200 and reply["state"] == "succeeded"
        assert sample(request(running.base, "/metrics")[1], 'pg_backup_restores_total{result="success"}') == 1
    finally:
        running.stop()
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{db}_totally_different'") == "0"


def test_a_whole_servers_set_restored_through_the_api_names_each_databases_outcome_and_one_database_comes_back_alone(
        fresh_cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    import os
    import shutil

    server = fresh_cluster
    tablespace = server.root / "fast"
    tablespace.mkdir()
    shutil.chown(tablespace, server._as_user or os.getuid())
    for name in ("shop", "billing"):
        server.psql(f"CREATE DATABASE {name}")
    server.psql(f"CREATE TABLESPACE fast LOCATION '{tablespace}'")
    server.psql("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 500) g", "shop")
    server.psql("CREATE TABLE archive TABLESPACE fast AS SELECT g AS id FROM generate_series(1, 300) g", "billing")
    set_env = {**env, "DATABASE_URL": server.url("postgres"), "BACKUP_DATABASES": "shop,billing"}
    set_id = backup_id(set_env)
    server.psql("DELETE FROM items WHERE id > 10", "shop")
    server.psql("DROP TABLE archive", "billing")
    server.psql("DROP TABLESPACE fast")
    tablespace.rmdir()  # billing's tablespace is gone, its directory too: billing cannot come back, shop can
    running = Running({**set_env, "BACKUP_ON_START": "false", "DRILL_AFTER_BACKUP": "false", "BACKUP_SCHEDULE": "0 2 1 1 *"}, tmp_path / "daemon.log")
    try:
        status, restore = request(running.base, "/v1/restores", method="POST", body=json.dumps({"backup": set_id, "request_id": "whole"}).encode())
        assert status == 202, restore
        whole = finished(running, restore)
        assert whole["state"] == "failed" and "1 of 2 databases failed" in whole["error"], whole
        assert whole["databases"]["restored"] == ["shop"] and list(whole["databases"]["failed"]) == ["billing"], whole["databases"]
        assert 'Tablespace "fast" does not exist' in whole["databases"]["failed"]["billing"]
        assert server.psql("SELECT count(*) FROM items", "shop") == "500"
        assert server.psql("SELECT count(*) FROM pg_class WHERE relname = 'archive'", "billing") == "0"  # left as it was

        server.psql("DELETE FROM items WHERE id > 10", "shop")
        job = restore_request(env, running.base, set_id, "--database", "shop", "--request-id", "shop-only", "--wait")
        assert job.returncode == 0, job.stdout + job.stderr
        one = request(running.base, "/v1/restores/shop-only")[1]
        assert one["database"] == "shop" and one["databases"] == {"restored": ["shop"], "failed": {}}, one
        assert server.psql("SELECT count(*) FROM items", "shop") == "500"
        status, reply = request(running.base, "/v1/restores", method="POST",
                                body=json.dumps({"backup": set_id, "database": "billing", "request_id": "shop-only"}).encode())
        assert status == 422 and "database 'shop'" in reply["error"] and "database 'billing'" in reply["error"], reply
        status, reply = request(running.base, "/v1/restores", method="POST",
                                body=json.dumps({"backup": set_id, "database": "shop", "target_db": "x", "request_id": "into"}).encode())
        assert status == 400 and "leave out target_db" in reply["error"]
        assert restore_request(env, running.base, set_id, "--database", "nope", "--request-id", "nope", "--wait").returncode == 3
        assert "has no database 'nope'" in request(running.base, "/v1/restores/nope")[1]["error"]
    finally:
        running.stop()


def test_runs_and_restores_are_listed_newest_first_with_times_and_a_restore_is_found_by_its_request_id(env: dict[str, str], tmp_path: Path) -> None:
    backup_id(env)
    running = Running({**env, "BACKUP_ON_START": "false", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    try:
        status, reply = request(running.base, "/v1/backups", token=None)
        assert status == 401 and "Bearer" in reply["error"]
        assert request(running.base, "/v1/runs", token="wrong")[0] == 401
        runs = []
        for _ in range(2):
            _, run = request(running.base, "/v1/backups", method="POST")
            runs.append(run["id"])
            running.wait_for(lambda r=run: request(running.base, f"/v1/runs/{r['id']}")[1]["state"] != "running", "the backup")
        listed = request(running.base, "/v1/runs")[1]
        assert [r["id"] for r in listed] == runs[::-1]
        for run in listed:
            assert run["state"] == "succeeded" and datetime.fromisoformat(run["started"]) <= datetime.fromisoformat(run["finished"])
        restores = []
        for request_id in ("first", "second"):
            _, restore = request(running.base, "/v1/restores", method="POST", body=json.dumps({"backup": MISSING, "request_id": request_id}).encode())
            restores.append(finished(running, restore))
        listed = request(running.base, "/v1/restores")[1]
        assert [r["request_id"] for r in listed] == ["second", "first"]
        assert all(r["state"] == "failed" and r["started"] <= r["finished"] for r in listed)
        assert request(running.base, "/v1/restores/first")[1] == restores[0]
        assert request(running.base, "/v1/restores/nope")[0] == 404
        metrics = request(running.base, "/metrics")[1]
        assert "_created" not in metrics
    finally:
        running.stop()


def sessions(cluster: Cluster, dbname: str) -> int:
    return int(cluster.psql(f"SELECT sessions FROM pg_stat_database WHERE datname = '{dbname}'", "postgres"))


def test_readyz_says_only_ready_or_not_without_the_token_and_probes_postgresql_every_few_seconds(fresh_cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    fresh_cluster.psql("CREATE DATABASE app")
    running = Running({**env, "DATABASE_URL": fresh_cluster.url("app"), "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 2 1 1 *",
                       "DRILL_AFTER_BACKUP": "false", "BACKUP_RETRY_SECONDS": "1"}, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: request(running.base, "/readyz")[0] == 200, "ready")
        assert sample(request(running.base, "/metrics")[1], "pg_backup_database_up") == 1
        before = sessions(fresh_cluster, "app")
        for _ in range(100):
            assert request(running.base, "/readyz", token=None) == (200, {"ready": True})
        assert sessions(fresh_cluster, "app") - before <= 3  # a probe every few seconds, not a connection per request

        fresh_cluster.stop("fast")
        running.wait_for(lambda: request(running.base, "/readyz")[0] == 503, "not ready")
        assert request(running.base, "/readyz", token=None) == (503, {"ready": False})  # no database name, host or port
        assert request(running.base, "/readyz", token="wrong") == (503, {"ready": False})
        status, reply = request(running.base, "/readyz")
        assert status == 503 and "cannot connect" in reply["reason"]
        assert sample(request(running.base, "/metrics")[1], "pg_backup_database_up") == 0
        time.sleep(11)  # two more probes, still down
        for _ in range(20):
            request(running.base, "/readyz", token=None)

        fresh_cluster.restart()
        running.wait_for(lambda: request(running.base, "/readyz")[0] == 200, "ready again")
        assert sample(request(running.base, "/metrics")[1], "pg_backup_database_up") == 1
    finally:
        running.stop()
    probe_lines = [json.loads(line)["message"] for line in running.log.read_text().splitlines() if "database unreachable:" in line]
    assert len(probe_lines) == 1, probe_lines  # the reason is logged when it changes, not per request or probe
    assert "database reachable" in running.log.read_text()


class _Recorder(BaseHTTPRequestHandler):
    """A server the redirect points at: it records whatever reaches it."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(f"{self.command} {self.path} {self.headers.get('Authorization')}")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        body = b'{"id": "restore-1", "state": "running"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_restore_request_never_follows_a_redirect_with_the_token(env: dict[str, str]) -> None:
    with serve(_Recorder) as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.server_address[1]}/v1/restores"

        class Redirector(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        with serve(Redirector) as redirector:
            result = restore_request(env, f"http://127.0.0.1:{redirector.server_address[1]}", "latest", "--request-id", "r-1", "--wait", timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert "302" in line and target in line and "not followed" in line and TOKEN not in line, line
    assert _Recorder.seen == []  # neither the token nor the request went anywhere else


def test_restore_request_waits_its_turn_while_a_backup_runs(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 300000) g", db)
    running = Running({**env, "BACKUP_ON_START": "true", "BACKUP_COMPRESSION_LEVEL": "19"}, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: 'pg_backup_in_progress{operation="backup"} 1.0' in request(running.base, "/metrics")[1], "the backup to run")
        impatient = restore_request(env, running.base, "latest", "--target-db", db + "_turn", "--request-id", "impatient", "--timeout", "1")
        assert impatient.returncode == 3, impatient.stdout + impatient.stderr
        [line] = impatient.stderr.splitlines()
        assert "still busy after 1s" in line and "no restore was started" in line, line
        patient = restore_request(env, running.base, "latest", "--target-db", db + "_turn", "--request-id", "patient", "--wait")
        assert patient.returncode == 0, patient.stdout + patient.stderr
        assert "waiting: a backup is running" in patient.stdout or "waiting: a drill is running" in patient.stdout, patient.stdout
        assert "succeeded" in patient.stdout
        assert request(running.base, "/v1/restores/impatient")[0] == 404
    finally:
        running.stop()
    assert cluster.psql("SELECT count(*) FROM big", db + "_turn") == "300000"


def test_the_api_answers_as_the_openapi_document_says_for_the_new_endpoints(env: dict[str, str], tmp_path: Path) -> None:
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml").read_text())
    backup_id(env)
    daemon = Running({**env, "BACKUP_ON_START": "false", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    try:
        _check_spec(daemon, spec)
    finally:
        daemon.stop()


def _check_spec(daemon: Running, spec: dict[str, Any]) -> None:
    import jsonschema

    def check(path: str, template: str, method: str, token: str | None = TOKEN, body: bytes | None = None) -> Any:
        status, reply = request(daemon.base, path, method=method.upper(), token=token, body=body)
        responses = spec["paths"][template][method]["responses"]
        assert str(status) in responses, f"{method.upper()} {path} answered {status}, not documented"
        schema = responses[str(status)].get("content", {}).get("application/json", {}).get("schema")
        if schema:
            jsonschema.validate(reply, {**schema, "components": spec["components"]}, cls=jsonschema.Draft202012Validator)
        return reply

    check("/v1/backups", "/v1/backups", "get", token=None)
    check("/v1/runs", "/v1/runs", "get")
    restore = check("/v1/restores", "/v1/restores", "post", body=json.dumps({"backup": MISSING, "request_id": "spec"}).encode())
    finished(daemon, restore)
    check("/v1/restores", "/v1/restores", "post", body=json.dumps({"backup": "latest", "request_id": "spec"}).encode())
    pitr = check("/v1/restores", "/v1/restores", "post", body=json.dumps({"to_latest": True, "target_db": "then", "request_id": "spec-pitr"}).encode())
    finished(daemon, pitr)  # no base backup here: it fails, and says so
    check("/v1/restores", "/v1/restores", "post", body=json.dumps({"to_time": "now", "target_db": "then", "request_id": "spec-bad"}).encode())
    check("/v1/restores", "/v1/restores", "post", body=json.dumps({"to_latest": True, "target_db": "elsewhere", "request_id": "spec-pitr"}).encode())
    check("/v1/restores", "/v1/restores", "get")
    check("/v1/restores/spec", "/v1/restores/{id}", "get")
    check("/v1/restores/spec-pitr", "/v1/restores/{id}", "get")
    check("/readyz", "/readyz", "get", token=None)
    run = check("/v1/backups", "/v1/backups", "post", body=b"")
    check("/v1/backups", "/v1/backups", "post", body=b"")  # 409 while it runs
    check(f"/v1/runs/{run['id']}", "/v1/runs/{id}", "get")
    check("/v1/runs/nope", "/v1/runs/{id}", "get")
