"""The off-site copy in the product, against a real S3 server (SeaweedFS) and real PostgreSQL: the remote settings in
validate-config, every backup copied once committed, a store down during the copy, copy pending, list and verify --remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, backup_id, cli, fingerprint, load_dataset
from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, free_ports


def offline_env(**extra: str) -> dict[str, str]:
    """An environment for commands that do not touch PostgreSQL (validate-config)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "AWS_"))}
    return {**clean, "DATABASE_URL": "postgresql://u@h/db", **extra}


def error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and SECRET_KEY not in stderr, stderr
    return lines


# --- validate-config checks that the remote can be used ------------------------------------------

def test_validate_config_accepts_a_usable_remote_and_prints_it_without_secrets(seaweed: SeaweedServer) -> None:
    env = offline_env(**seaweed.environment("p-" + uuid.uuid4().hex[:8]))
    assert cli(env, "validate-config").stdout.strip() == "configuration is valid"
    printed = cli(env, "validate-config", "--print").stdout
    shown = json.loads(printed)
    assert shown["remote.url"].startswith("s3://backups/p-") and shown["remote.endpoint"] == seaweed.endpoint
    assert SECRET_KEY not in printed and ACCESS_KEY not in printed


def test_validate_config_names_a_missing_bucket_in_one_line_and_exits_2(seaweed: SeaweedServer) -> None:
    env = offline_env(**seaweed.environment(bucket="no-such-bucket"))
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("config error:") and "bucket 'no-such-bucket' does not exist" in line


def test_validate_config_names_wrong_credentials_in_one_line_and_exits_2(seaweed: SeaweedServer) -> None:
    env = offline_env(**{**seaweed.environment(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "rejected the credentials" in line and "not-the-secret" not in line


def test_validate_config_names_an_unreachable_endpoint_in_one_line_and_exits_2(seaweed: SeaweedServer) -> None:
    [port] = free_ports(1)  # nothing listens there
    env = offline_env(**{**seaweed.environment(), "BACKUP_REMOTE_ENDPOINT": f"http://127.0.0.1:{port}"})
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "cannot reach the endpoint" in line


def test_validate_config_names_a_bad_remote_url_in_one_line_and_exits_2(tmp_path: Path) -> None:
    result = cli(offline_env(BACKUP_REMOTE_URL="s3://Bad_Bucket!/x"), "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("config error: BACKUP_REMOTE_URL=") and "bucket" in line


# --- every backup copied off-site once committed locally --------------------------------------------

@pytest.fixture(scope="module")
def own_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS of this module's own, which tests stop and start again (the session's one stays up)."""
    with SeaweedServer(tmp_path_factory.mktemp("own-seaweed")) as server:
        yield server


@pytest.fixture
def up(own_seaweed: SeaweedServer) -> SeaweedServer:
    if own_seaweed.process is None:
        own_seaweed.start()
    return own_seaweed


def remote_env(env: dict[str, str], server: SeaweedServer, prefix: str) -> dict[str, str]:
    return {**env, **server.environment(prefix), "DRILL_AFTER_BACKUP": "false"}


def listed(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    return json.loads(cli(env, "list", "--json", *args).stdout)  # type: ignore[no-any-return]


def test_a_backup_with_a_remote_is_listed_in_the_remote_and_verifies_there(cluster: Cluster, db: str, env: dict[str, str],
                                                                           seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g", db)
    env = remote_env(env, seaweed, prefix)
    uploads_before = set(seaweed.incomplete_uploads())  # other tests' interrupted uploads, in the same bucket
    taken = backup_id(env)
    [remote] = listed(env, "--remote")
    [local] = listed(env)
    assert remote["id"] == taken and remote["status"] == "ok" and remote["files"] == local["files"]
    assert cli(env, "verify", taken, "--remote").stdout.startswith(f"{taken}: OK")
    assert cli(env, "verify", "latest", "--remote").stdout.startswith(f"{taken}: OK")
    assert cli(env, "copy").stdout.strip() == "nothing to copy: every good backup is off-site"
    assert set(seaweed.incomplete_uploads()) <= uploads_before


def test_a_backup_while_the_store_is_down_is_kept_exits_0_with_an_error_line_and_copy_pending_completes_it(
        cluster: Cluster, db: str, env: dict[str, str], up: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", db)
    env = remote_env(env, up, prefix)
    up.kill()
    result = cli(env, "backup")
    assert result.returncode == 0
    taken = result.stdout.strip().splitlines()[-1]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and taken in errors[0] and "not copied off-site" in errors[0] and "cannot reach the endpoint" in errors[0], result.stderr
    assert SECRET_KEY not in result.stderr
    [local] = listed(env)
    assert local["id"] == taken and local["status"] == "ok"
    assert cli(env, "verify", taken).returncode == 0
    still_down = cli(env, "copy", "pending", check=False)
    assert still_down.returncode == 3 and f"error: {taken} not copied" in still_down.stderr and "1 still pending" in still_down.stderr

    up.start()
    assert cli(env, "copy", "pending").stdout.startswith(f"{taken}: copied off-site")
    assert [b["id"] for b in listed(env, "--remote")] == [taken]
    assert cli(env, "verify", taken, "--remote").returncode == 0
    assert cli(env, "copy", taken).stdout.strip() == f"{taken}: already complete off-site"


def test_the_store_killed_mid_upload_leaves_the_local_backup_and_nothing_listed_remotely_and_copy_pending_completes_it(
        cluster: Cluster, db: str, env: dict[str, str], up: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 600000) g", db)
    env = {**remote_env(env, up, prefix), "BACKUP_COMPRESSION": "false", "VALIDATION_ENABLED": "false"}  # a dump of ~45 MB: a multipart upload
    before = set(up.incomplete_uploads())
    child = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not set(up.incomplete_uploads()) - before:  # the copy's multipart upload is under way
            assert child.poll() is None, f"the backup and its copy ended before the store could be killed: {child.stderr.read() if child.stderr else ''}"
            assert time.monotonic() < deadline, "no upload began"
            time.sleep(0.01)
        up.kill()
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    taken = out.strip().splitlines()[-1]
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and taken in errors[0] and "not copied off-site" in errors[0], err
    assert [(b["id"], b["status"]) for b in listed(env)] == [(taken, "ok")]
    assert cli(env, "verify", taken).returncode == 0

    up.start()
    assert listed(env, "--remote") == []  # data objects may be there; without the metadata object no backup is listed
    assert cli(env, "copy", "pending").stdout.startswith(f"{taken}: copied off-site")
    assert [(b["id"], b["status"]) for b in listed(env, "--remote")] == [(taken, "ok")]
    assert cli(env, "verify", taken, "--remote").returncode == 0


def flip_a_byte(store: Any, name: str) -> None:
    """Damage a remote object in place (as bit rot or tampering would), bypassing create-only."""
    data = bytearray(b"".join(store.open_read(name)))
    data[len(data) // 2] ^= 0x01
    store.put_stream(name, [bytes(data)], create_only=False)


def test_a_flipped_byte_in_a_remote_object_makes_verify_remote_exit_1_naming_it(cluster: Cluster, db: str, env: dict[str, str],
                                                                               seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g", db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)
    [backup] = listed(env, "--remote")
    dump = backup["files"]["dump"]["name"]
    flip_a_byte(seaweed.store(prefix), dump)
    result = cli(env, "verify", taken, "--remote", check=False)
    assert result.returncode == 1, result.stderr
    assert f"{taken}: BAD" in result.stdout and dump in result.stdout and "do not restore from it" in result.stdout
    assert cli(env, "verify", taken).returncode == 0  # the local copy is fine
    # counted where pg_backup_remote_errors_total{operation="verify"} is read from (the volume), as a failed copy is
    from sidecar.repository import Repository
    from sidecar.storage.offsite import counters
    assert counters(Repository(Path(env["BACKUP_DIR"]))).get("errors", {}).get("verify") == 1


def test_the_daemon_tries_pending_backups_at_start_up_and_retries_until_the_store_is_back(
        cluster: Cluster, db: str, env: dict[str, str], up: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    from tests.test_daemon import Running, request, sample

    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", db)
    env = remote_env(env, up, prefix)
    up.kill()
    taken = backup_id(env)  # copied nowhere: the store is down
    running = Running({**env, "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 0 1 1 *"}, tmp_path / "daemon.log")
    try:
        def metrics() -> str:
            return str(request(running.base, "/metrics")[1])

        # the backup's own failed copy (counted on the volume), then the daemon's at start-up
        failed = running.wait_for(lambda: (m := metrics()) and sample(m, 'pg_backup_remote_errors_total{operation="copy"}') >= 2 and m,
                                  "the copy at start-up to fail")
        assert sample(failed, "pg_backup_remote_pending_backups") == 1
        assert sample(failed, "pg_backup_remote_last_copy_timestamp_seconds") == 0
        up.start()
        copied = running.wait_for(lambda: (m := metrics()) and sample(m, "pg_backup_remote_pending_backups") == 0 and m,
                                  "the retry to copy the pending backup", timeout=180)
        assert sample(copied, "pg_backup_remote_last_copy_timestamp_seconds") > 0
    finally:
        assert running.stop() == 0
    assert [b["id"] for b in listed(env, "--remote")] == [taken]
    log = running.log.read_text()
    assert f"off-site copy of {taken}" in log and "next try in 15s" in log and f"backup {taken} copied off-site" in log


# --- restore straight from the remote store -------------------------------------------------------

def test_a_server_that_lost_its_volume_restores_from_the_bucket_alone(cluster: Cluster, fresh_cluster: Cluster, db: str, env: dict[str, str],
                                                                       seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    load_dataset(cluster, db, "chinook.sql")
    before = fingerprint(cluster, db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)
    shutil.rmtree(env["BACKUP_DIR"])  # the volume is gone, and so is the server
    new_env = {**env, "DATABASE_URL": fresh_cluster.url(db), "BACKUP_DIR": str(tmp_path / "empty-volume")}
    restored = json.loads(cli(new_env, "restore", "latest", "--from-remote", "--json").stdout)
    assert restored["backup_id"] == taken and restored["mode"] == "new-database"
    assert fingerprint(fresh_cluster, db) == before
    assert listed(new_env) == []  # streamed from the store: nothing was written to the volume


def test_a_flipped_byte_in_a_remote_object_makes_restore_from_remote_refuse_and_leaves_the_live_database(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g", db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)
    [backup] = listed(env, "--remote")
    dump = backup["files"]["dump"]["name"]
    flip_a_byte(seaweed.store(prefix), dump)
    cluster.psql("INSERT INTO t VALUES (-1, 'after the backup')", db)
    result = cli(env, "restore", taken, "--from-remote", check=False)
    assert result.returncode == 3, result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {dump}: sha256 ") and "does not match the metadata" in line and "nothing was committed" in line
    assert cluster.psql("SELECT count(*) FROM t", db) == "20001"  # the live database was not swapped
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_%'") == "0"  # no scratch database left


def test_a_flipped_byte_in_the_remote_dump_leaves_a_brand_new_server_without_any_change_not_even_its_roles(
        cluster: Cluster, fresh_cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    role = f"owner_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE ROLE {role}; CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g; "
                 f"ALTER TABLE t OWNER TO {role}", db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)
    [backup] = listed(env, "--remote")
    assert "globals" in backup["files"]  # the backup carries the role
    dump = backup["files"]["dump"]["name"]
    flip_a_byte(seaweed.store(prefix), dump)
    new_env = {**env, "DATABASE_URL": fresh_cluster.url(db), "BACKUP_DIR": str(tmp_path / "empty-volume")}
    result = cli(new_env, "restore", taken, "--from-remote", check=False)
    assert result.returncode == 3, result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {dump}: sha256 ") and "does not match the metadata" in line and "before any change" in line, line
    assert fresh_cluster.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'", "postgres") == "0"  # no role created
    assert fresh_cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}%'", "postgres") == "0"


def test_a_backup_with_an_off_site_copy_its_remote_verify_and_restore_from_remote_each_peak_under_100_mb(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str) -> None:
    from tests.test_memory_decode import LIMIT_MIB, measured

    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 600000) g", db)
    env = {**remote_env(env, seaweed, prefix), "BACKUP_COMPRESSION": "false", "VALIDATION_ENABLED": "false"}  # ~45 MB: multipart
    backed_up, backup_mib = measured(env, "backup")
    taken = backed_up.stdout.strip().splitlines()[-1]
    assert "ERROR" not in backed_up.stderr, backed_up.stderr
    [remote] = listed(env, "--remote")
    assert remote["id"] == taken and remote["size"] > 40 << 20
    verified, verify_mib = measured(env, "verify", taken, "--remote", "--json")
    assert json.loads(verified.stdout)["ok"] is True
    _, restore_mib = measured(env, "restore", taken, "--from-remote", "--target-db", f"{db}_from_remote")
    assert cluster.psql("SELECT count(*) FROM t", f"{db}_from_remote") == "600000"
    peaks = {"backup+copy": backup_mib, "verify --remote": verify_mib, "restore --from-remote": restore_mib}
    print(f"peak RSS MiB {peaks}")
    assert max(peaks.values()) < LIMIT_MIB, f"peak RSS in MiB: {peaks}"
