"""`restore ID --table` (issue 16) from the remote store alone (--from-remote, and a sidecar without a volume) and from a
whole server's backup set (--database): real PostgreSQL, the real SeaweedFS S3 server, the real CLI."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli
from tests.storage.seaweed import SeaweedServer
from tests.storage.test_offsite import error_lines, flip_a_byte

ROWS = "SELECT count(*) || ':' || md5(string_agg(x::text, ',' ORDER BY x::text)) FROM {} x"
INDEXES = "SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY indexrelid::regclass::text) FROM pg_index WHERE indrelid = '{}'::regclass"


def _one_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result.stderr
    [line] = [line for line in error_lines(result.stderr) if " WARNING " not in line]  # the store's retries are logged as warnings
    assert all(w in line for w in words), line
    return line


def test_a_table_of_a_backup_comes_back_from_the_bucket_alone_and_a_damaged_copy_is_refused_before_anything_is_created(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, tmp_path: Path) -> None:
    prefix = "t-" + uuid.uuid4().hex[:12]
    cluster.psql("CREATE TABLE parent (id int PRIMARY KEY); INSERT INTO parent SELECT generate_series(1, 10);"
                 "CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent, v text); CREATE INDEX child_v ON child (v);"
                 "INSERT INTO child (parent_id, v) SELECT 1 + g % 10, md5(g::text) FROM generate_series(1, 3000) g", db)
    original = cluster.psql(ROWS.format("child"), db)
    env = {**env, **seaweed.environment(prefix), "DRILL_AFTER_BACKUP": "false"}
    taken = backup_id(env)  # on the volume and, streamed while it is written, in the bucket
    [backup] = json.loads(cli(env, "list", "--remote", "--json").stdout)
    dump = backup["files"]["dump"]["name"]
    Path(env["BACKUP_DIR"], dump).unlink()  # the volume's copy is gone: only the bucket has it
    cluster.psql("DELETE FROM child", db)

    done = cli(env, "restore", taken, "--table", "public.child", "--from-remote")
    assert f"restored public.child as of {taken} into {db} as public.child_restored (3000 rows)" in done.stdout, done.stdout
    assert cluster.psql(ROWS.format("child_restored"), db) == original
    assert cluster.psql(INDEXES.format("child_restored"), db) == "child_pkey_restored,child_v_restored"
    assert cluster.psql("SELECT count(*) FROM child", db) == "0"  # the live table untouched

    # a sidecar without a volume reads the bucket, where its backups are
    no_volume = {**{k: v for k, v in env.items() if k != "BACKUP_DIR"}, "BACKUP_VOLUME": "false", "SIDECAR_STATE_DIR": str(tmp_path / "state")}
    cli(no_volume, "restore", taken, "--table", "public.child", "--as-suffix", "_bucket")
    assert cluster.psql(ROWS.format("child_bucket"), db) == original

    _one_error(cli(env, "restore", taken, "--table", "public.nope", "--from-remote", check=False), 2, f"table public.nope is not in backup {taken}")
    unreachable = {**env, "BACKUP_REMOTE_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    _one_error(cli(unreachable, "restore", taken, "--table", "public.child", "--from-remote", "--as-suffix", "_x", check=False), 3, "127.0.0.1:9")

    flip_a_byte(seaweed.store(prefix), dump)
    damaged = cli(env, "restore", taken, "--table", "public.child", "--from-remote", "--as-suffix", "_bad", check=False)
    _one_error(damaged, 3, dump, "does not match the metadata", "refused before any change")
    scratch = cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_\\_tables\\_%'")
    assert scratch == "0" and cluster.psql("SELECT to_regclass('child_bad') IS NULL", db) == "t"
    assert cluster.psql("SELECT to_regclass('child_x') IS NULL", db) == "t"


def test_a_table_of_one_database_of_a_whole_server_set_is_restored_into_it_with_database(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer) -> None:
    prefix = "t-" + uuid.uuid4().hex[:12]
    other = f"{db}_b"
    cluster.psql(f'CREATE DATABASE "{other}"')
    cluster.psql("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'a' || g FROM generate_series(1, 50) g", db)
    cluster.psql("CREATE SCHEMA shop; CREATE TABLE shop.items (id int PRIMARY KEY, name text); CREATE INDEX items_name ON shop.items (name);"
                 "INSERT INTO shop.items SELECT g, 'b' || g FROM generate_series(1, 700) g", other)
    original = cluster.psql(ROWS.format("shop.items"), other)
    env = {**env, **seaweed.environment(prefix), "DRILL_AFTER_BACKUP": "false", "BACKUP_DATABASES": f"{db},{other}", "VALIDATION_ENABLED": "false"}
    taken = backup_id(env)  # a set: on the volume, then copied off-site
    cluster.psql("TRUNCATE shop.items", other)

    _one_error(cli(env, "restore", taken, "--table", "shop.items", check=False), 2, "whole server's set", db, other, "--database NAME")
    _one_error(cli(env, "restore", taken, "--table", "shop.items", "--database", "nope", check=False), 2, "no database 'nope'", other)
    _one_error(cli(env, "restore", "--to-latest", "--table", "shop.items", "--database", other, check=False), 2, "leave out --database")

    done = cli(env, "restore", taken, "--table", "shop.items", "--database", other)
    assert f"restored shop.items as of {taken} into {other} as shop.items_restored (700 rows)" in done.stdout, done.stdout
    assert cluster.psql(ROWS.format("shop.items_restored"), other) == original
    assert cluster.psql(INDEXES.format("shop.items_restored"), other) == "shop.items_name_restored,shop.items_pkey_restored"
    assert cluster.psql("SELECT count(*) FROM shop.items", other) == "0"
    assert cluster.psql("SELECT to_regclass('shop.items_restored') IS NULL", db) == "t"  # not into DATABASE_URL's database

    for item in json.loads(cli(env, "list", "--json").stdout)[0]["files"].values():  # the volume loses the set: the bucket has it
        Path(env["BACKUP_DIR"], item["name"]).unlink()
    remote = cli(env, "restore", taken, "--table", "public.items", "--database", db, "--from-remote", "--target-db", f"{db}_items")
    assert "created: database" in remote.stdout, remote.stdout
    assert cluster.psql(ROWS.format("items"), f"{db}_items") == cluster.psql(ROWS.format("items"), db)
