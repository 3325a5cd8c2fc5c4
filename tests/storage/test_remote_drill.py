"""Restore drills from the off-site copy (DRILL_FROM_REMOTE, drill --from-remote) and the record of a remote copy read back
whole (verify --remote), against a real S3 server (SeaweedFS), real PostgreSQL and the real CLI."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sidecar import api
from sidecar.config import load_config
from sidecar.repository import Repository
from sidecar.storage import offsite
from tests.conftest import Cluster, backup_id, cli
from tests.storage.seaweed import SECRET_KEY, SeaweedServer
from tests.storage.test_offsite import error_lines, flip_a_byte, listed, offline_env, remote_env


def leftovers(cluster: Cluster, db: str) -> str:
    """Scratch databases a restore or drill left behind (`<db>__drill_*`, `<db>__restore_*`)."""
    return cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_%'")


def test_a_drill_from_the_remote_restores_the_off_site_copy_even_after_the_volume_lost_it(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g", db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)

    drilled = cli(env, "drill", taken, "--from-remote")
    assert drilled.stdout.startswith(f"{taken}: restore drill from s3://backups/{prefix} at {seaweed.endpoint} PASSED"), drilled.stdout
    [remote] = listed(env, "--remote")
    assert remote["drillStatus"] == "passed" and remote["verified"]["source"].startswith("s3://backups/")
    assert remote["checked"]["by"] == "drill"
    [local] = listed(env)  # on the volume too: recorded there as well
    assert local["drillStatus"] == "passed" and local["verified"]["source"] == remote["verified"]["source"]

    shutil.rmtree(env["BACKUP_DIR"])  # the volume's copy is gone; DRILL_FROM_REMOTE makes every drill read the bucket
    again = json.loads(cli({**env, "DRILL_FROM_REMOTE": "true"}, "drill", "latest", "--json").stdout)
    assert again["ok"] is True and again["backup_id"] == taken and again["source"].startswith("s3://")
    assert again["recorded"] == [f"remote {again['source']}"]
    assert [b["verified"]["at"] for b in listed(env, "--remote")] == [again["at"]]  # the newest fact object wins
    assert leftovers(cluster, db) == "0"
    assert cluster.psql("SELECT count(*) FROM t", db) == "5000"


def flip_first_byte(store: Any, name: str) -> None:
    """Damage the first byte of a remote object: the zstd frame no longer decodes at all."""
    data = bytearray(b"".join(store.open_read(name)))
    data[0] ^= 0x01
    store.put_stream(name, [bytes(data)], create_only=False)


@pytest.mark.parametrize("where", ["middle", "first"])
def test_a_drill_from_the_remote_refuses_a_flipped_byte_names_the_object_and_leaves_the_live_database(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, where: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g", db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)
    dump = listed(env, "--remote")[0]["files"]["dump"]["name"]
    (flip_a_byte if where == "middle" else flip_first_byte)(seaweed.store(prefix), dump)
    cluster.psql("INSERT INTO t VALUES (-1, 'after the backup')", db)

    result = cli({**env, "DRILL_FROM_REMOTE": "true"}, "drill", taken, check=False)
    assert result.returncode == 1, result.stderr
    assert f"{taken}: restore drill from s3://" in result.stdout and "FAILED" in result.stdout
    assert f"  {dump}: sha256 " in result.stdout and "does not match the metadata" in result.stdout, result.stdout
    assert cluster.psql("SELECT count(*) FROM t", db) == "5001" and leftovers(cluster, db) == "0"
    [remote] = listed(env, "--remote")
    assert remote["drillStatus"] == "failed" and dump in remote["verified"]["findings"][0]
    assert listed(env)[0]["drillStatus"] == "never"  # the volume's copy is intact: its own drill status is not touched
    from sidecar.repository import Repository
    from sidecar.storage.offsite import counters
    assert counters(Repository(Path(env["BACKUP_DIR"]))).get("errors", {}).get("drill") == 1  # pg_backup_remote_errors_total
    assert cli(env, "drill", taken).returncode == 0  # and it still restores


def test_a_drill_from_the_remote_of_a_backup_not_copied_yet_says_so_in_one_line_and_exits_3(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    env = {**env, "DRILL_AFTER_BACKUP": "false"}
    taken = backup_id(env)  # taken with no remote configured: it is on the volume only
    result = cli(remote_env(env, seaweed, prefix), "drill", taken, "--from-remote", check=False)
    assert result.returncode == 3, result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: backup {taken} is not off-site yet") and f"copy {taken}" in line
    assert listed(env)[0]["drillStatus"] == "never" and leftovers(cluster, db) == "0"


def test_drill_from_remote_without_a_remote_store_is_a_config_error_naming_it() -> None:
    result = cli(offline_env(DRILL_FROM_REMOTE="true"), "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("config error: DRILL_FROM_REMOTE=true") and "BACKUP_REMOTE_URL" in line


def test_a_passing_verify_remote_is_recorded_in_the_bucket_as_the_last_verified_remote_copy(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    env = remote_env(env, seaweed, prefix)
    # in this process the keys come from the secret files (the AWS_* variables are only in the children's environment)
    config = load_config(environ={**env, "BACKUP_REMOTE_ACCESS_KEY_ID_FILE": str(seaweed.key_file),
                                  "BACKUP_REMOTE_SECRET_ACCESS_KEY_FILE": str(seaweed.secret_file)})
    taken = backup_id(env)
    assert api.last_remote_verification(config) is None
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert cli(env, "verify", taken, "--remote").returncode == 0
    [remote] = listed(env, "--remote")
    assert remote["checked"]["by"] == "verify"
    at = api.last_remote_verification(config)
    assert at is not None and before <= at <= datetime.now(UTC)
    # and on the volume, where the daemon's pg_backup_remote_last_verify_timestamp_seconds reads it at scrape time
    noted = offsite.last_verified_time(Repository(config.backup_dir), config.remote)
    assert before.timestamp() <= noted <= at.timestamp() + 1
    assert SECRET_KEY not in json.dumps(remote)


def test_last_remote_verification_is_none_without_a_remote(env: dict[str, str], tmp_path: Path) -> None:
    assert api.last_remote_verification(load_config(environ=env)) is None
