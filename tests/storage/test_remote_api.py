"""The daemon and `check` with a remote store: the after-backup drill from the remote copy, the HTTP API's from_remote
restores and remote listing, the restore Job's client, and `check` of the remote, against a real S3 server (SeaweedFS),
real PostgreSQL, the real daemon and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cluster, cli
from tests.storage.seaweed import ACCESS_KEY, LOCKED_BUCKET, SECRET_KEY, SeaweedServer
from tests.storage.test_offsite import remote_env
from tests.test_daemon import TOKEN, Running, request, sample


def test_the_daemon_drills_from_the_remote_copy_and_restores_from_the_remote_by_api_onto_a_fresh_target(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 3000) g", db)
    env = {**remote_env(env, seaweed, prefix), "DRILL_AFTER_BACKUP": "true", "DRILL_FROM_REMOTE": "true", "BACKUP_ON_START": "true"}
    running = Running(env, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: sample(request(running.base, "/metrics")[1], 'pg_backup_drills_total{result="success"}') == 1,
                         "the after-backup drill from the remote copy", timeout=120)
        status, remote = request(running.base, "/v1/backups?remote=true")
        assert status == 200 and len(remote) == 1 and remote[0]["drillStatus"] == "passed", remote
        assert remote[0]["verified"]["source"].startswith(f"s3://backups/{prefix}")
        taken = remote[0]["id"]
        assert request(running.base, "/v1/backups?remote=true", token=None)[0] == 401
        assert request(running.base, "/v1/backups?remote=maybe")[0] == 400

        # the volume loses the dump: only the remote copy can be restored now
        Path(env["BACKUP_DIR"], remote[0]["files"]["dump"]["name"]).unlink()
        target = f"{db}_from_bucket"
        client_env = {**env, "SIDECAR_API_TOKEN": TOKEN}
        job = subprocess.run([sys.executable, "-m", "sidecar", "restore-request", taken, "--from-remote", "--target-db", target,
                              "--server", running.base, "--request-id", "from-bucket-1", "--wait"],
                             env=client_env, capture_output=True, text=True, timeout=120)
        assert job.returncode == 0, job.stderr
        assert f"of {taken} from the remote store" in job.stdout and "succeeded" in job.stdout
        assert cluster.psql("SELECT count(*) || ':' || md5(string_agg(h, '' ORDER BY g)) FROM t", target) == \
            cluster.psql("SELECT count(*) || ':' || md5(string_agg(h, '' ORDER BY g)) FROM t", db)
        status, record = request(running.base, "/v1/restores/from-bucket-1")
        assert status == 200 and record["from_remote"] is True and record["state"] == "succeeded"

        # the same request id asking for the volume is another request: 422, never a second restore
        body = {"backup": taken, "request_id": "from-bucket-1", "target_db": target, "from_remote": False}
        status, conflict = request(running.base, "/v1/restores", method="POST", body=json.dumps(body).encode())
        assert status == 422 and "from the remote store" in conflict["error"]
        assert conflict["earlier"]["from_remote"] is True and conflict["requested"]["from_remote"] is False
        status, same = request(running.base, "/v1/restores", method="POST", body=json.dumps({**body, "from_remote": True}).encode())
        assert status == 200 and same["id"] == record["id"]
        status, bad = request(running.base, "/v1/restores", method="POST", body=json.dumps({**body, "request_id": "x", "from_remote": "yes"}).encode())
        assert status == 400 and "from_remote" in bad["error"] and "true or false" in bad["error"]
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    assert SECRET_KEY not in log and ACCESS_KEY not in log


def test_the_daemons_drill_from_the_remote_of_a_backup_that_could_not_be_copied_is_skipped_with_the_reason_logged(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    env = {**env, **seaweed.environment(prefix, bucket="no-such-bucket"), "DRILL_AFTER_BACKUP": "true", "DRILL_FROM_REMOTE": "true",
           "BACKUP_ON_START": "true"}
    running = Running(env, tmp_path / "daemon.log")
    try:
        metrics = running.wait_for(lambda: (m := request(running.base, "/metrics")[1])
                                   and sample(m, 'pg_backup_drills_total{result="skipped"}') == 1 and m, "the drill to be skipped", timeout=120)
        assert sample(metrics, 'pg_backup_drills_total{result="failure"}') == 0
        assert sample(metrics, 'pg_backup_runs_total{result="success"}') == 1  # the backup itself is fine, on the volume
    finally:
        assert running.stop() == 0
    [skipped] = [json.loads(line) for line in running.log.read_text().splitlines() if '"drill_skipped"' in line]
    assert "from the remote store skipped" in skipped["message"] and "is not off-site yet" in skipped["message"]


def test_a_restore_job_from_the_remote_asks_the_sidecar_for_from_remote() -> None:
    from sidecar.daemon.jobs import restore_job

    [container] = restore_job("latest", "rel", "ns", from_remote=True, request_id="r1")["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["restore-request", "latest"] and "--from-remote" in container["args"]
    [plain] = restore_job("latest", "rel", "ns", request_id="r1")["spec"]["template"]["spec"]["containers"]
    assert "--from-remote" not in plain["args"]


def check_lines(env: dict[str, str]) -> tuple[int, list[str]]:
    result = cli(env, "check", check=False)
    assert "Traceback" not in result.stderr and SECRET_KEY not in result.stdout + result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines()


def test_check_reports_a_usable_remote_with_its_backups_and_pending_copies(cluster: Cluster, db: str, env: dict[str, str],
                                                                           seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    env = remote_env(env, seaweed, prefix)
    cli(env, "backup")
    code, lines = check_lines(env)
    assert code == 0, lines
    remote = [line for line in lines if f"s3://backups/{prefix}" in line]
    assert remote[0].startswith("ok: remote") and "1 backup there, 0 waiting to be copied" in remote[0]
    assert remote[1].startswith("ok: remote") and "probe object was written (create-only) and deleted" in remote[1]
    store = seaweed.store(prefix)
    assert [i.name for i in store.list()] == sorted(i.name for i in store.list("backup_"))  # no probe left, nothing else
    locked = {**env, **seaweed.environment(prefix, bucket=LOCKED_BUCKET)}
    code, lines = check_lines(locked)
    assert code == 0 and any(f"s3://{LOCKED_BUCKET}/{prefix}" in line and line.startswith(("ok:", "note:")) for line in lines), lines


def test_check_names_wrong_credentials_and_a_missing_bucket_in_one_line_each(cluster: Cluster, db: str, env: dict[str, str],
                                                                              seaweed: SeaweedServer, prefix: str) -> None:
    env = remote_env(env, seaweed, prefix)
    code, lines = check_lines({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    problems = [line for line in lines if line.startswith("problem:")]
    assert code == 1 and len(problems) == 1 and "rejected the credentials" in problems[0] and "not-the-secret" not in "\n".join(lines)
    assert lines[-1] == "1 problem found"
    code, lines = check_lines({**env, **seaweed.environment(prefix, bucket="no-such-bucket")})
    problems = [line for line in lines if line.startswith("problem:")]
    assert code == 1 and len(problems) == 1 and "bucket 'no-such-bucket' does not exist" in problems[0], lines
    assert not any("remote" in line for line in lines if not line.startswith("problem:")), lines
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != SECRET_KEY  # the keys were only in the children's environment
