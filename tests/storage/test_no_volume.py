"""Backups without a volume (BACKUP_VOLUME=false): streamed straight to a real S3 server (SeaweedFS) from real
PostgreSQL through the real CLI; list, verify, restore and prune work against the bucket."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sidecar import age
from tests.conftest import Cluster, cli, fingerprint, load_dataset
from tests.storage.seaweed import SECRET_KEY, SeaweedServer


def no_volume(env: dict[str, str], server: SeaweedServer, prefix: str, tmp_path: Path) -> dict[str, str]:
    without_dir = {k: v for k, v in env.items() if k != "BACKUP_DIR"}
    return {**without_dir, **server.environment(prefix), "BACKUP_VOLUME": "false", "SIDECAR_STATE_DIR": str(tmp_path / "state")}


def listed(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    return json.loads(cli(env, "list", "--json", *args).stdout)  # type: ignore[no-any-return]


def test_without_a_volume_a_backup_goes_to_the_bucket_is_listed_from_it_and_restores_onto_a_fresh_server(
        cluster: Cluster, fresh_cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    load_dataset(cluster, db, "chinook.sql")
    before = fingerprint(cluster, db)
    env = no_volume(env, seaweed, prefix, tmp_path)
    taken = cli(env, "backup").stdout.strip().splitlines()[-1]
    [backup] = listed(env)  # no --remote: without a volume the bucket is where backups are
    assert backup["id"] == taken and backup["status"] == "ok"
    assert listed(env, "--remote") == [backup]
    objects = {info.name for info in seaweed.store(prefix).list()}
    assert objects == {taken + ".metadata.json", *(item["name"] for item in backup["files"].values())}
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and not any(p.name.startswith("backup_") for p in state.rglob("*"))
    assert cli(env, "verify", "latest").stdout.startswith(f"{taken}: OK")
    checked = cli(env, "check")  # no word about a volume that does not exist, nor copies waiting for one
    assert "no backup volume: backups stream straight to the remote" in checked.stdout, checked.stdout
    assert "backup directory" not in checked.stdout and "waiting to be copied" not in checked.stdout, checked.stdout
    assert "1 backup there" in checked.stdout and "Traceback" not in checked.stderr, checked.stdout
    drilled = json.loads(cli(env, "drill", "latest", "--json").stdout)  # from the bucket: the only place it is
    assert drilled["ok"] is True and drilled["source"] != "volume", drilled
    assert cli(env, "pin", taken).stdout.strip() == f"{taken} pinned"
    assert listed(env)[0]["keep"] is True
    restored = json.loads(cli({**env, "DATABASE_URL": fresh_cluster.url(db)}, "restore", "latest", "--json").stdout)
    assert restored["backup_id"] == taken and restored["mode"] == "new-database"
    assert fingerprint(fresh_cluster, db) == before


def test_a_no_volume_backup_stopped_mid_upload_leaves_nothing_listed_and_no_multipart_upload(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 600000) g", db)
    env = {**no_volume(env, seaweed, prefix, tmp_path), "BACKUP_COMPRESSION": "false", "VALIDATION_ENABLED": "false"}  # ~45 MB
    uploads_before = set(seaweed.incomplete_uploads())
    child = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not set(seaweed.incomplete_uploads()) - uploads_before:  # the dump's multipart upload has begun
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)  # what Kubernetes sends (and the daemon's children get when the daemon dies)
    _out, err = child.communicate(timeout=60)
    assert child.returncode == 3 and "interrupted" in err and "Traceback" not in err, err
    assert listed(env) == []
    assert seaweed.store(prefix).list() == []  # the roles object, already complete, was deleted too
    assert set(seaweed.incomplete_uploads()) <= uploads_before  # the multipart upload was aborted
    assert [b["status"] for b in listed({**env, "BACKUP_COMPRESSION": "true"})] == []
    taken = cli({**env, "BACKUP_COMPRESSION": "true"}, "backup").stdout.strip().splitlines()[-1]  # the lock was released
    assert [b["id"] for b in listed(env)] == [taken]


def test_a_no_volume_backup_of_300_mb_streams_through_under_100_mb(cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer,
                                                                      prefix: str, tmp_path: Path) -> None:
    from tests.test_memory_decode import LIMIT_MIB, measured

    # ~300 MB of dump text that zstd-1 brings to ~40 MB: several multipart parts
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || repeat('x', 110) AS h FROM generate_series(1, 2000000) g", db)
    _secret, public = age.generate_identity()  # the whole pipeline: pg_dump -> zstd -> age -> sha256 -> multipart upload
    env = {**no_volume(env, seaweed, prefix, tmp_path), "VALIDATION_ENABLED": "false", "BACKUP_ENCRYPTION": "true",
           "BACKUP_ENCRYPTION_RECIPIENTS": public}
    backed_up, backup_mib = measured(env, "backup")
    [backup] = listed(env)
    print(f"no-volume backup: {backup['size'] >> 20} MiB uploaded, peak RSS {backup_mib} MiB")
    assert backup["size"] > 24 << 20  # more than 3 parts of 8 MiB
    assert backup_mib < LIMIT_MIB, f"peak RSS {backup_mib} MiB"


def test_prune_without_a_volume_prunes_the_bucket_and_says_so(cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer,
                                                             prefix: str, tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS one", db)
    env = no_volume(env, seaweed, prefix, tmp_path)
    taken = cli(env, "backup").stdout.strip().splitlines()[-1]
    out = cli(env, "prune", "--dry-run").stdout.splitlines()
    assert out[0] == f"remote {seaweed.store(prefix).description}: would delete 0, kept 1"
    assert out[1].startswith(f"  keep: {taken}: newest good backup")


def test_no_volume_without_a_remote_or_with_a_backup_dir_is_one_config_error_each_and_exit_2(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "AWS_"))}
    base = {**clean, "DATABASE_URL": "postgresql://u@h/db", "BACKUP_VOLUME": "false"}
    result = cli(base, "validate-config", check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["config error: BACKUP_VOLUME=false needs a remote store: set BACKUP_REMOTE_URL (backups then go "
                                          "straight to the object store), or set BACKUP_VOLUME=true and BACKUP_DIR"]
    remote = {"BACKUP_REMOTE_URL": "s3://backups/x", "BACKUP_REMOTE_ENDPOINT": "http://127.0.0.1:1", "BACKUP_REMOTE_ALLOW_HTTP": "true"}
    result = cli({**base, **remote, "BACKUP_DIR": str(tmp_path / "b")}, "backup", check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("config error: BACKUP_DIR is set but BACKUP_VOLUME=false") and SECRET_KEY not in result.stderr
    assert not (tmp_path / "b").exists()
    result = cli({**base, **remote, "WAL_ARCHIVING": "true"}, "validate-config", check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "config error: WAL_ARCHIVING=true needs a backup volume (the spool and the WAL archive live there; the off-site copy is made from it): "
        "set BACKUP_VOLUME=true and BACKUP_DIR, or WAL_ARCHIVING=false"], result.stderr


def test_the_daemon_without_a_volume_backs_up_to_the_bucket_prunes_it_and_restores_from_it_by_request(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    from tests.storage.test_remote_retention import remote_backups
    from tests.test_daemon import TOKEN, Running, backup_run, request, sample

    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", db)
    [expired] = remote_backups(seaweed.store(prefix), tmp_path, [40])
    env = {**no_volume(env, seaweed, prefix, tmp_path), "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 0 1 1 *", "DRILL_AFTER_BACKUP": "false"}
    running = Running(env, tmp_path / "daemon.log")
    try:
        run = backup_run(running)
        assert run["state"] == "succeeded", run
        assert [b["id"] for b in request(running.base, "/v1/backups")[1]] == [run["backup"]]  # pruned: 40 days > 30
        # the backups are in the bucket only: the metrics (and so PgBackupTooOld, PgBackupRemoteCopyTooOld) read them there
        metrics = str(request(running.base, "/metrics")[1])
        assert sample(metrics, "pg_backup_repository_backups") == 1 and 0 <= sample(metrics, "pg_backup_age_seconds") < 120
        assert 0 <= sample(metrics, "pg_backup_remote_age_seconds") < 120 and sample(metrics, "pg_backup_remote_pending_backups") == 0
        body = json.dumps({"backup": run["backup"], "request_id": "r-1", "target_db": f"{db}_copy"}).encode()
        status, restore = request(running.base, "/v1/restores", method="POST", body=body, token=TOKEN)
        assert status == 202, restore
        done = running.wait_for(lambda: (r := request(running.base, f"/v1/restores/{restore['id']}")[1])["state"] != "running" and r,
                                "the restore", timeout=120)
        assert done["state"] == "succeeded", done
    finally:
        assert running.stop() == 0
    assert cluster.psql("SELECT count(*) FROM t", f"{db}_copy") == "1000"
    assert any((tmp_path / "state" / ".restores").iterdir())  # the request's record, in the state directory
    log = running.log.read_text()
    assert "drill" not in log.lower() and "Traceback" not in log and expired not in {b["id"] for b in listed(env)}
