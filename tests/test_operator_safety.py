"""Issue 11: empty or missing arguments never do the dangerous thing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecar import api
from sidecar.config import load_config
from sidecar.embedded import Cluster
from sidecar.errors import UsageError
from sidecar.logical.restore import previous_to_drop
from sidecar.postgres import find_tool
from tests.conftest import backup_id, cli, tmpfs


def test_an_empty_target_db_is_a_usage_error_and_never_the_live_database(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)", db)
    backup_id(env)
    cluster.psql("INSERT INTO t VALUES (2)", db)
    for args in (["restore", "latest", "--target-db", ""], ["restore", "latest", "--target-db", "  "], ["restore", ""], ["drill", ""],
                 ["verify", ""], ["backup", "--label", ""]):
        out = cli(env, *args, check=False)
        assert out.returncode == 2 and "is empty" in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
    with pytest.raises(UsageError):
        api.restore_backup("latest", load_config(None, env), target_db="")
    assert cluster.psql("SELECT count(*) FROM t", db) == "2"  # the live database was never restored over


def test_restore_options_without_an_id_are_a_usage_error_and_a_bare_restore_lists(env: dict[str, str]) -> None:
    for args in (["--target-db", "foo"], ["--in-place"], ["--force"]):
        out = cli(env, "restore", *args, check=False)
        assert out.returncode == 2 and "need a backup id" in out.stderr, out
    bare = cli(env, "restore")
    assert bare.returncode == 0 and "no backups yet" in bare.stdout


def test_a_drill_of_an_encrypted_backup_without_the_secret_key_verifies_checksums_and_says_so(cluster: Cluster, db: str, env: dict[str, str],
                                                                                              tmp_path: Path) -> None:
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    sealed = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public}  # the secret key lives elsewhere
    cluster.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)", db)
    bid = backup_id(sealed)
    out = cli(sealed, "drill", bid, check=False)
    assert out.returncode == 0 and "SKIPPED" in out.stdout and "checksums were verified" in out.stdout
    verified = json.loads((Path(env["BACKUP_DIR"]) / f"{bid}.metadata.json").read_text())["verified"]
    assert verified["ok"] is None and verified["skipped"] and verified["findings"] == []
    dump = next(p for p in Path(env["BACKUP_DIR"]).iterdir() if p.name.startswith(bid) and ".dump" in p.name)
    with open(dump, "r+b") as handle:  # a flipped byte is still found without the key
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 1]))
    bad = cli(sealed, "drill", bid, check=False)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "sha256" in bad.stdout


def test_kept_previous_databases_are_pruned_by_count_and_age() -> None:
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    kept = [(f"db__pre_restore_{i}", now - timedelta(days=i)) for i in (0, 1, 3, 9)]
    assert previous_to_drop(kept, 2, 0, now) == ["db__pre_restore_3", "db__pre_restore_9"]
    assert previous_to_drop(kept, 0, 7, now) == ["db__pre_restore_9"]
    assert previous_to_drop(kept, 3, 2, now) == ["db__pre_restore_3", "db__pre_restore_9"]
    assert previous_to_drop(kept, 0, 0, now) == []
    assert previous_to_drop(list(reversed(kept)), 1, 0, now) == ["db__pre_restore_1", "db__pre_restore_3", "db__pre_restore_9"]


def test_restores_keep_only_the_newest_previous_databases(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (v int)", db)
    backup_id(env)
    dropped = []
    for _ in range(3):
        dropped += json.loads(cli({**env, "RESTORE_KEEP_PREVIOUS_COUNT": "2"}, "restore", "latest", "--json").stdout)["dropped_previous"]
    left = cluster.psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{db}\\_\\_pre\\_restore\\_%' ORDER BY 1").splitlines()
    assert len(left) == 2 and len(dropped) == 1 and dropped[0] < left[0]  # the oldest went, even for restores within one second
    listed = json.loads(cli(env, "previous", "--json").stdout)
    assert [item["name"] for item in listed] == left and all(item["action"] == "keep" and item["size"] > 0 for item in listed)
    one = {**env, "RESTORE_KEEP_PREVIOUS_COUNT": "1"}
    assert "would drop" in cli(one, "previous").stdout
    cli(one, "previous", "--prune")
    assert cluster.psql(f"SELECT datname FROM pg_database WHERE datname LIKE '{db}\\_\\_pre\\_restore\\_%'") == left[-1]


@pytest.fixture
def full_server_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB file system (tmpfs) standing for the database server's data disk (postgres.data_dir). CI runs as root."""
    with tmpfs(tmp_path / "pgdata-disk", "size=1m") as mount:
        yield mount


def test_a_restore_or_drill_that_cannot_fit_on_the_server_is_refused_and_a_drill_server_takes_it(
        cluster: Cluster, fresh_cluster: Cluster, db: str, env: dict[str, str], full_server_disk: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", db)
    if cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'drill_probe'") == "0":
        cluster.psql("CREATE ROLE drill_probe")
    cluster.psql("ALTER TABLE t OWNER TO drill_probe", db)
    bid = backup_id(env)
    full = {**env, "POSTGRES_DATA_DIR": str(full_server_disk)}
    out = cli(full, "restore", bid, check=False)
    assert out.returncode == 3 and "refused, nothing was changed" in out.stderr and "MiB free" in out.stderr, out.stderr
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_%'") == "0"
    drill = cli(full, "drill", bid, check=False)
    assert drill.returncode == 1 and "refused" in drill.stdout
    # the same drill on a separate server: passes there, and nothing is created on the live server
    before = cluster.psql("SELECT count(*) FROM pg_database")
    elsewhere = cli({**full, "DRILL_DATABASE_URL": fresh_cluster.url("postgres")}, "drill", bid)
    assert "PASSED" in elsewhere.stdout
    assert cluster.psql("SELECT count(*) FROM pg_database") == before
    assert fresh_cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}%'") == "0"  # its scratch database is gone too
    assert fresh_cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'drill_probe'") == "1"  # the restore ran there


def test_a_backup_waiting_for_a_lock_names_the_session_holding_it(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)", db)
    holder = subprocess.Popen([find_tool("psql"), "-X", "-q", "-d", cluster.url(db), "-c",
                               "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(5); COMMIT;"],
                              env={**env, "PGAPPNAME": "nightly-migration"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):  # until it holds the lock
            if cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND application_name = 'nightly-migration' "
                            "AND query LIKE '%pg_sleep%'") == "1":
                break
        out = cli(env, "backup")
    finally:
        holder.wait(timeout=30)
    waits = [line for line in out.stderr.splitlines() if "waiting" in line and "for a lock" in line]
    assert waits and "'nightly-migration'" in waits[0] and "user postgres" in waits[0] and "pg_sleep" in waits[0], out.stderr


def test_json_errors_are_json_and_a_closed_pipe_is_quiet(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    out = cli(env, "verify", "backup_2020-01-01T00-00-00-000Z", "--json", check=False)
    assert out.returncode == 2 and json.loads(out.stdout)["exitCode"] == 2 and "no backup" in json.loads(out.stdout)["error"]
    assert out.stderr.startswith("error: no backup")
    for _ in range(3):
        backup_id(env)
    # a reader that goes away at once (like head after its lines): no "Broken pipe" error, exit 0
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m sidecar list --json | true"], env=env, capture_output=True, text=True,
                           check=False)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_restore_job_takes_the_request_id_that_names_it(env: dict[str, str]) -> None:
    import yaml

    job = yaml.safe_load(cli(env, "restore-job", "latest", "--release", "rel", "--request-id", "orders-fix").stdout)
    assert job["metadata"]["name"] == "rel-pg-backup-sidecar-restore-orders-fix"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "RESTORE_REQUEST_ID", "value": "orders-fix"} in container["env"]
    assert cli(env, "restore-job", "latest", "--request-id", "Bad_Id", check=False).returncode == 2


def test_a_backup_by_a_non_superuser_says_role_passwords_were_left_out(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    if cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'plain_backup'") == "0":
        cluster.psql("CREATE ROLE plain_backup LOGIN")
    cluster.psql(f'ALTER DATABASE "{db}" OWNER TO plain_backup')
    cluster.psql("CREATE TABLE t (v int); ALTER TABLE t OWNER TO plain_backup", db)
    plain = cli({**env, "DATABASE_URL": cluster.url(db, user="plain_backup")}, "backup", "--json")
    assert json.loads(plain.stdout)["rolePasswords"] is False
    assert "role passwords were left out" in plain.stderr and "superuser" in plain.stderr
    superuser = cli(env, "backup", "--json")
    assert json.loads(superuser.stdout)["rolePasswords"] is True and "left out" not in superuser.stderr


def test_json_log_lines_carry_millisecond_times_with_a_zone_and_structured_fields(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (v int)", db)
    out = cli({**env, "SIDECAR_LOG_FORMAT": "json"}, "backup")
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    done = next(line for line in lines if line.get("event") == "backup_completed")
    assert done["backup_id"] == out.stdout.strip() and done["duration_seconds"] > 0 and done["size_bytes"] > 0
    assert all(datetime.fromisoformat(line["time"]).utcoffset() is not None and len(line["time"].split(".")[1]) == 9 for line in lines)
