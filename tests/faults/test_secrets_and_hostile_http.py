"""Faults, part four: secrets never leak from a whole run; hostile HTTP input is refused and the
server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.embedded import Cluster
from tests.conftest import PASSWORD, cli, password_user
from tests.test_daemon import TOKEN, Running, idle, request


def test_the_password_and_token_appear_nowhere_in_a_whole_run(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    password_user(cluster)
    cluster.psql(f'ALTER ROLE pwuser CREATEDB; ALTER DATABASE "{db}" OWNER TO pwuser')  # drills and restores create databases
    url = cluster.url(db, user="pwuser", password=PASSWORD)
    run_env = {**env, "DATABASE_URL": url, "BACKUP_ON_START": "true"}
    seen: list[str] = []
    running = Running(run_env, tmp_path / "daemon.log")
    try:
        seen.append(idle(running))
        seen.append(json.dumps(request(running.base, "/v1/backups")[1]))
        status, restore = request(running.base, "/v1/restores", method="POST",
                                  body=json.dumps({"backup": "latest", "request_id": "leak-check", "target_db": db + "_leak"}).encode())
        assert status == 202
        final = running.wait_for(lambda: (r := request(running.base, f"/v1/restores/{restore['id']}")[1])["state"] != "running" and r, "the restore")
        seen += [json.dumps(final), json.dumps(request(running.base, "/readyz")[1]), request(running.base, "/metrics")[1]]
    finally:
        running.stop()
    bad = cli({**env, "DATABASE_URL": url.replace(PASSWORD, PASSWORD + "-wrong")}, "backup", check=False)
    printed = cli({**env, "DATABASE_URL": url}, "validate-config", "--print")
    seen += [running.log.read_text(), bad.stderr, bad.stdout, printed.stdout, printed.stderr]
    seen += [p.read_text() for p in Path(env["BACKUP_DIR"]).glob("*.json")]
    everything = "\n".join(seen)
    assert PASSWORD not in everything and TOKEN not in everything
    assert "password authentication failed" in bad.stderr  # the failure itself is still explained


def test_hostile_ids_and_paths_over_http_are_refused_and_the_server_keeps_serving(env: dict[str, str], tmp_path: Path) -> None:
    daemon = Running({**env, "BACKUP_ON_START": "true"}, tmp_path / "daemon.log")
    try:
        _hostile(daemon)
    finally:
        assert daemon.stop() == 0


def _hostile(daemon: Running) -> None:
    idle(daemon)
    for path in ("/v1/backups/%00", "/v1/backups/" + "a" * 10_000, "/v1/backups/..%2F..%2Fetc%2Fpasswd", "/v1/backups/backup_2024-13-45T99-00-00-000Z",
                 "/v1/restores/../../etc/passwd", "/v1/backups/latest%00"):
        status, _ = request(daemon.base, path)
        assert status in (400, 404, 414), (path[:40], status)
    for body in ({"backup": "latest\u0000", "request_id": "nul"}, {"backup": "latest", "request_id": "x" * 1000},
                 {"backup": ["latest"], "request_id": "list"}, [1, 2, 3]):
        status, reply = request(daemon.base, "/v1/restores", method="POST", body=json.dumps(body).encode())
        assert status == 400, (body, status, reply)
    assert request(daemon.base, "/v1/backups")[0] == 200
