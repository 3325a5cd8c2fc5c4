"""The daemon as a subprocess: real HTTP, real PostgreSQL, promtool on the exposition."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.embedded import Cluster

TOKEN = "test-token-s3cr3t"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(base: str, path: str, method: str = "GET", token: str | None = TOKEN, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, method=method, data=body)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw.decode()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw and exc.headers.get_content_type() == "application/json" else raw


class Running:
    def __init__(self, env: dict[str, str], log: Path, token: str | None = TOKEN) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**env, "SIDECAR_LISTEN": f"127.0.0.1:{self.port}"} | ({"SIDECAR_API_TOKEN": token} if token else {})
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        for _ in range(100):
            try:
                if request(self.base, "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"daemon did not start: {log.read_text()}")

    def wait_for(self, predicate: Any, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def daemon(env: dict[str, str], tmp_path: Path) -> Iterator[Running]:
    running = Running({**env, "BACKUP_ON_START": "true"}, tmp_path / "daemon.log")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()


def backup_run(running: Running) -> dict[str, Any]:
    """POST /v1/backups once the daemon is idle; the run's record once it has ended."""
    _, run = running.wait_for(lambda: (r := request(running.base, "/v1/backups", method="POST"))[0] == 202 and r, "the daemon to be idle")
    running.wait_for(lambda: request(running.base, f"/v1/runs/{run['id']}")[1]["state"] != "running", "the backup to end", timeout=120)
    return request(running.base, f"/v1/runs/{run['id']}")[1]  # type: ignore[no-any-return]


def sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_backup_on_start_shows_in_metrics_and_the_exposition_passes_promtool(daemon: Running, cluster: Cluster, db: str) -> None:
    backups = daemon.wait_for(lambda: request(daemon.base, "/v1/backups")[1], "a backup")
    metrics = daemon.wait_for(lambda: (m := request(daemon.base, "/metrics")[1]) and 'pg_backup_runs_total{result="success"} 1.0' in m and m, "metrics")
    assert sample(metrics, "pg_backup_last_size_bytes") == backups[0]["size"]
    assert 0 <= sample(metrics, "pg_backup_age_seconds") < 60
    assert sample(metrics, "pg_backup_repository_backups") == 1
    assert sample(metrics, 'pg_backup_in_progress{operation="backup"}') == 0
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is required"
    check = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert daemon.stop() == 0


def test_the_api_requires_the_token_and_rejects_bad_requests(daemon: Running) -> None:
    assert request(daemon.base, "/v1/backups", token=None)[0] == 401
    assert request(daemon.base, "/v1/backups", token="wrong")[0] == 401
    assert request(daemon.base, "/v1/backups", method="POST", token=None)[0] == 401
    assert request(daemon.base, "/v1/backups/../../etc/passwd")[0] == 404
    assert request(daemon.base, "/v1/backups/backup_2001-01-01T00-00-00-000Z")[0] == 404
    assert request(daemon.base, "/v1/backups", method="POST", body=b"{not json")[0] == 400
    assert request(daemon.base, "/v1/backups", method="POST", body=b"x" * 100_000)[0] == 413
    assert request(daemon.base, "/metrics", token=None)[0] == 200
    assert TOKEN not in daemon.log.read_text()


def test_readiness_follows_postgresql(fresh_cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    fresh_cluster.psql("CREATE DATABASE app")
    running = Running({**env, "DATABASE_URL": fresh_cluster.url("app")}, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: request(running.base, "/readyz")[0] == 200, "ready")
        fresh_cluster.stop("fast")
        status, body = running.wait_for(lambda: (r := request(running.base, "/readyz"))[0] == 503 and r, "not ready")  # probed every few seconds
        assert "cannot connect" in body["reason"]
        assert request(running.base, "/healthz")[0] == 200
        fresh_cluster.restart()
        running.wait_for(lambda: request(running.base, "/readyz")[0] == 200, "ready again")
    finally:
        assert running.stop() == 0


def test_catch_up_on_start_when_no_recent_backup_exists(env: dict[str, str], tmp_path: Path) -> None:
    running = Running({**env, "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 2 * * *"}, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: request(running.base, "/v1/backups")[1], "the catch-up backup")
        assert "catch-up" in running.log.read_text()
    finally:
        running.stop()
    # with a fresh backup on the volume, a restart does not take another one
    again = Running({**env, "BACKUP_ON_START": "false"}, tmp_path / "again.log")
    time.sleep(2)
    assert again.stop() == 0
    assert len(request_list(env)) == 1


def request_list(env: dict[str, str]) -> list[Any]:
    return [p for p in Path(env["BACKUP_DIR"]).glob("*.metadata.json")]


def test_sigterm_during_a_backup_cancels_it_cleanly(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 2000000) g", db)
    running = Running({**env, "BACKUP_ON_START": "false", "BACKUP_COMPRESSION_LEVEL": "19", "VALIDATION_ENABLED": "false"}, tmp_path / "daemon.log")
    directory = Path(env["BACKUP_DIR"])
    running.wait_for(lambda: any(p.stat().st_size > 0 for p in directory.glob("*.dump.zst.partial")), "the backup to be writing")
    started = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - started < 20
    assert not list(directory.glob("*.partial")) and not list(directory.glob("*.metadata.json"))


def idle(daemon: Running) -> str:
    """Metrics once the start-up backup and its restore drill have finished."""
    return daemon.wait_for(lambda: (m := request(daemon.base, "/metrics")[1]) and 'pg_backup_drills_total{result="success"} 1.0' in m
                           and 'pg_backup_in_progress{operation="drill"} 0.0' in m and m, "the backup and its drill")  # type: ignore[no-any-return]


def test_a_restore_request_from_another_process_reports_its_outcome_in_its_exit_code(daemon: Running, cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    idle(daemon)
    client_env = {**env, "SIDECAR_API_TOKEN": TOKEN}
    job = subprocess.run([sys.executable, "-m", "sidecar", "restore-request", "latest", "--target-db", db + "_job", "--server", daemon.base,
                          "--request-id", "job-uid-1", "--wait"], env=client_env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "succeeded" in job.stdout
    # the same request id (a retried Job pod) gets the same restore back, never a second one
    status, again = request(daemon.base, "/v1/restores", method="POST", body=json.dumps({"backup": "latest", "request_id": "job-uid-1", "target_db": db + "_job"}).encode())
    assert status == 200 and again["state"] == "succeeded"
    assert 'pg_backup_restores_total{result="success"} 1.0' in request(daemon.base, "/metrics")[1]
    bad = subprocess.run([sys.executable, "-m", "sidecar", "restore-request", "backup_2001-01-01T00-00-00-000Z", "--server", daemon.base,
                          "--request-id", "job-uid-2", "--wait"], env=client_env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3 and "no backup backup_2001-01-01T00-00-00-000Z" in bad.stderr


def test_restore_requests_are_validated_and_refused_while_a_backup_runs(daemon: Running) -> None:
    idle(daemon)
    for body, message in ((b"{oops", "not valid JSON"), (b'{"backup": "latest"}', "missing fields: request_id"),
                          (b'{"backup": "latest", "request_id": "x", "force": "yes"}', "unknown fields: force"),
                          (b'{"backup": "../../etc/passwd", "request_id": "x"}', "is not a backup id")):
        status, reply = request(daemon.base, "/v1/restores", method="POST", body=body)
        assert status == 400 and message in reply["error"]
    assert request(daemon.base, "/v1/backups", method="POST")[0] == 202
    assert request(daemon.base, "/v1/backups", method="POST")[0] == 409
    status, reply = request(daemon.base, "/v1/restores", method="POST", body=b'{"backup": "latest", "request_id": "during-backup"}')
    assert status == 409 and "running" in reply["error"]


def test_daemon_logs_are_json_lines_without_secrets(cluster: Cluster, env: dict[str, str], db: str, tmp_path: Path) -> None:
    from tests.conftest import PASSWORD, password_user

    password_user(cluster)
    cluster.psql(f'ALTER DATABASE "{db}" OWNER TO pwuser')
    running = Running({**env, "DATABASE_URL": cluster.url(db, user="pwuser", password=PASSWORD), "BACKUP_ON_START": "true"}, tmp_path / "d.log")
    try:
        running.wait_for(lambda: 'pg_backup_runs_total{result="success"} 1.0' in request(running.base, "/metrics")[1], "a backup")
        request(running.base, "/readyz")
    finally:
        assert running.stop() == 0
    lines = running.log.read_text().splitlines()
    assert lines and all(json.loads(line)["message"] for line in lines)
    assert any("backup" in json.loads(line)["message"] and "succeeded" in json.loads(line)["message"] for line in lines)
    text = running.log.read_text() + "".join(p.read_text() for p in Path(env["BACKUP_DIR"]).glob("*.json"))
    assert PASSWORD not in text and TOKEN not in text


def test_a_database_that_does_not_come_back_is_a_recorded_failure(fresh_cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    # (a database that comes back after 30 s: tests/faults/test_volume_and_server.py)
    fresh_cluster.psql("CREATE DATABASE app")
    fresh_cluster.stop("fast")
    base_env = {**env, "DATABASE_URL": fresh_cluster.url("app"), "BACKUP_ON_START": "true", "DRILL_AFTER_BACKUP": "false"}
    gives_up = Running({**base_env, "BACKUP_RETRY_SECONDS": "2"}, tmp_path / "gives-up.log")
    try:
        metrics = gives_up.wait_for(lambda: (m := request(gives_up.base, "/metrics")[1]) and 'pg_backup_runs_total{result="failure"} 1.0' in m and m,
                                    "the failure to be recorded")
        assert sample(metrics, "pg_backup_last_failure_timestamp_seconds") > time.time() - 60
        assert sample(metrics, "pg_backup_age_seconds") == float("inf")
        gives_up.wait_for(lambda: request(gives_up.base, "/readyz")[0] == 503, "not ready")
    finally:
        assert gives_up.stop() == 0


def test_the_server_answers_as_its_openapi_document_says(daemon: Running) -> None:
    import jsonschema
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml").read_text())
    idle(daemon)

    def check(path: str, template: str, method: str, status: int, body: Any) -> None:
        responses = spec["paths"][template][method]["responses"]
        assert str(status) in responses, f"{method.upper()} {path} answered {status}, not documented"
        schema = responses[str(status)].get("content", {}).get("application/json", {}).get("schema")
        if schema:
            jsonschema.validate(body, {**schema, "components": spec["components"]}, cls=jsonschema.Draft202012Validator)

    backup_id_ = request(daemon.base, "/v1/backups")[1][0]["id"]
    calls = [("/metrics", "/metrics", "get", None), ("/healthz", "/healthz", "get", None), ("/readyz", "/readyz", "get", None),
             ("/v1/backups", "/v1/backups", "get", None), (f"/v1/backups/{backup_id_}", "/v1/backups/{id}", "get", None),
             ("/v1/backups/nope", "/v1/backups/{id}", "get", None), ("/v1/restores/nope", "/v1/restores/{id}", "get", None),
             ("/v1/restores", "/v1/restores", "post", b'{"backup": "latest", "request_id": "openapi", "target_db": "openapi_copy"}'),
             ("/v1/restores", "/v1/restores", "post", b'{"backup": "latest"}'), ("/v1/backups", "/v1/backups", "post", b"{}")]
    for path, template, method, body in calls:
        status, reply = request(daemon.base, path, method=method.upper(), body=body)
        check(path, template, method, status, reply)
    restore = request(daemon.base, "/v1/restores", method="POST", body=b'{"backup": "latest", "request_id": "openapi", "target_db": "openapi_copy"}')[1]
    status, reply = request(daemon.base, f"/v1/restores/{restore['id']}")
    check("", "/v1/restores/{id}", "get", status, reply)


def test_a_real_prometheus_scrapes_the_daemon_and_answers_for_backup_age(daemon: Running, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus (Debian package prometheus) is required"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: sidecar\n    static_configs: [{{targets: ['127.0.0.1:{daemon.port}']}}]\n")
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def age() -> float | None:
            try:
                status, reply = request(f"http://127.0.0.1:{port}", "/api/v1/query?query=pg_backup_age_seconds", token=None)
            except OSError:
                return None
            if status != 200 or not reply["data"]["result"]:
                return None
            value = float(reply["data"]["result"][0]["value"][1])
            return value if value != float("inf") else None

        seconds = daemon.wait_for(age, "Prometheus to report a finite pg_backup_age_seconds")
        assert 0 <= seconds < 120
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_grafana_dashboard_uses_only_metrics_the_daemon_exports(daemon: Running) -> None:
    import re

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "helm" / "pg-backup-sidecar" / "files" / "dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"\bpg_backup_[a-z_]+", target["expr"])
            if not name.startswith(("pg_backup_remote_", "pg_backup_wal_", "pg_backup_recovery_window_", "pg_backup_base_backup_"))}
    # remote_: exported only with a remote store (tests/test_helm.py checks those); the others only with WAL archiving
    # (tests/physical/test_recovery_window.py)
    exported = set(re.findall(r"^(pg_backup_[a-z_]+)", idle(daemon), flags=re.M))
    assert used and used <= exported, used - exported


def test_restore_drills_also_run_on_their_own_schedule(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import backup_id

    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    bid = backup_id(env)
    running = Running({**env, "DRILL_AFTER_BACKUP": "false", "DRILL_SCHEDULE": "* * * * *"}, tmp_path / "d.log")
    try:
        running.wait_for(lambda: 'pg_backup_drills_total{result="success"} 1.0' in request(running.base, "/metrics")[1], "a scheduled drill", timeout=90)
        assert request(running.base, f"/v1/backups/{bid}")[1]["verified"]["ok"] is True
    finally:
        assert running.stop() == 0


def test_a_malformed_request_or_a_failing_volume_answers_with_an_error_and_the_server_keeps_serving(daemon: Running, env: dict[str, str]) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port)) as raw:
        raw.sendall(f"POST /v1/backups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: lots\r\n\r\n".encode())
        assert raw.recv(200).startswith(b"HTTP/1.1 400")
    idle(daemon)
    directory = Path(env["BACKUP_DIR"])
    moved = directory.with_name("moved-away")
    directory.rename(moved)
    directory.write_text("not a directory")  # the volume is broken (root can read any directory, so no chmod)
    try:
        status, reply = request(daemon.base, "/v1/backups")
        assert status == 500 and "cannot list backup directory" in reply["error"]
    finally:
        directory.unlink()
        moved.rename(directory)
    assert request(daemon.base, "/v1/backups")[0] == 200


def test_restore_request_with_a_malformed_server_url_is_a_usage_error(env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "restore-request", "latest", "--server", "not-a-url"],
                            env={**env, "SIDECAR_API_TOKEN": TOKEN}, capture_output=True, text=True)
    assert result.returncode == 2 and "is not a URL" in result.stderr and "Traceback" not in result.stderr


def test_connections_are_kept_alive_and_a_refused_body_closes_its_connection(daemon: Running) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    for path in ("/metrics", "/healthz", "/v1/backups"):  # one connection, as a Prometheus scraper keeps it
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and not response.will_close
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as raw:
        # an oversized body is refused unread, so what follows it must never be taken for a request
        smuggled = b"POST /v1/backups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 0\r\n\r\n"
        raw.sendall(b"POST /v1/restores HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 70000\r\n\r\n" + smuggled)
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"Connection: close" in reply and reply.count(b"HTTP/1.1") == 1, reply


def test_a_burst_of_connections_is_answered_without_stalls(daemon: Running) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def timed(_: int) -> float:
        started = time.monotonic()
        assert request(daemon.base, "/healthz")[0] == 200
        return time.monotonic() - started

    with ThreadPoolExecutor(64) as pool:
        slowest = max(pool.map(timed, range(256)))
    assert slowest < 0.9, f"a connection waited {slowest:.2f}s (a dropped SYN is retried after 1 s)"


def test_a_listen_address_in_use_is_a_one_line_error(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "sidecar", "run"], env={**env, "SIDECAR_LISTEN": f"127.0.0.1:{port}"},
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "error" in x]
    assert f"cannot listen on 127.0.0.1:{port}" in line and "SIDECAR_LISTEN" in line, line
