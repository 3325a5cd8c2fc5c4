"""A whole server (issue 14): BACKUP_DATABASES makes one backup set of several databases and the server's roles,
which comes back whole onto a brand-new server from one id."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import age
from sidecar.embedded import Cluster
from sidecar.postgres import find_tool
from tests.conftest import backup_id, cli, fingerprint
from tests.storage.seaweed import SeaweedServer

WEIRD = 'we"ird/../db'  # a database name that must never become a path

SETUP = f"""
CREATE ROLE app_owner NOLOGIN;
CREATE ROLE readers NOLOGIN;
CREATE ROLE alice LOGIN IN ROLE readers;
CREATE ROLE bob LOGIN;
ALTER ROLE bob SET statement_timeout = '7s';
CREATE DATABASE shop OWNER app_owner;
CREATE DATABASE billing;
CREATE DATABASE "{WEIRD.replace('"', '""')}";
ALTER DATABASE billing SET work_mem = '8MB';
ALTER ROLE alice IN DATABASE billing SET search_path = ledger, public;
REVOKE CONNECT ON DATABASE billing FROM PUBLIC;
GRANT CONNECT ON DATABASE billing TO readers;
COMMENT ON DATABASE billing IS 'the money';
ALTER DATABASE shop CONNECTION LIMIT 40;
"""

PROPERTIES = ("SELECT d.datname, pg_get_userbyid(d.datdba), d.datconnlimit, shobj_description(d.oid, 'pg_database'), d.datacl::text, "
              "(SELECT string_agg(coalesce(r.rolname, '-') || ':' || array_to_string(s.setconfig, ','), ';' ORDER BY 1) "
              "   FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = d.oid) "
              "FROM pg_database d WHERE d.datname IN ('shop', 'billing') ORDER BY 1")
ROLES = ("SELECT r.rolname, r.rolcanlogin, coalesce(array_to_string(r.rolconfig, ','), ''), "
         "coalesce((SELECT string_agg(g.rolname, ',' ORDER BY g.rolname) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
         "          WHERE m.member = r.oid), '') FROM pg_roles r WHERE r.rolname IN ('app_owner', 'readers', 'alice', 'bob') ORDER BY 1")


@pytest.fixture(scope="module")
def server() -> Iterator[Cluster]:
    """A server with three databases (one with a name no file may carry), roles with memberships and settings,
    and database-level settings, grants, comment and connection limit."""
    with Cluster(port=54323) as c:
        c.psql(SETUP)
        tablespace = c.root / "fast"
        tablespace.mkdir()
        shutil.chown(tablespace, c._as_user or os.getuid())
        c.psql(f"CREATE TABLESPACE fast OWNER app_owner LOCATION '{tablespace}'; COMMENT ON TABLESPACE fast IS 'nvme'")
        c.psql("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g;"
               "ALTER TABLE items OWNER TO app_owner", "shop")
        c.psql("CREATE SCHEMA ledger; CREATE TABLE ledger.entries (id bigserial PRIMARY KEY, amount numeric);"
               "INSERT INTO ledger.entries (amount) SELECT g / 7.0 FROM generate_series(1, 2000) g; GRANT USAGE ON SCHEMA ledger TO readers;"
               "CREATE TABLE ledger.archive TABLESPACE fast AS SELECT g AS id FROM generate_series(1, 300) g", "billing")
        c.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2), (3)", WEIRD)
        yield c


def _env(cluster: Cluster, backups: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG"))}
    return {**clean, "DATABASE_URL": cluster.url("postgres"), "BACKUP_DIR": str(backups), **extra}


def test_a_whole_server_comes_back_onto_a_brand_new_server_from_one_id(server: Cluster, fresh_cluster: Cluster, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    env = _env(server, backups, BACKUP_DATABASES="all", BACKUP_PARALLEL="2")
    set_id = backup_id(env)

    names = sorted(p.name for p in backups.iterdir() if not p.name.startswith("."))
    assert names == sorted([f"{set_id}.globals.sql.zst", f"{set_id}.tablespaces.sql.zst", f"{set_id}.metadata.json"]
                           + [f"{set_id}.db{i:03d}.dump.zst" for i in (1, 2, 3, 4)])
    metadata = json.loads((backups / f"{set_id}.metadata.json").read_text())
    by_name = {item["name"]: item for item in metadata["databases"]}
    assert sorted(by_name) == sorted(["billing", "postgres", "shop", WEIRD])  # templates are not in `all`
    assert by_name["shop"]["rowCounts"] == {"public.items": 500} and by_name["billing"]["rowCounts"] == {"ledger.archive": 300, "ledger.entries": 2000}
    assert by_name["billing"]["databaseProperties"]["comment"] == "the money"
    listed = cli(env, "list").stdout
    assert all(name in listed for name in ("shop", "billing")) and listed.count(set_id) == 1  # one backup, a line per database
    assert cli(env, "verify", set_id).stdout.startswith(f"{set_id}: OK")
    drilled = cli(env, "drill", set_id).stdout  # every database of the set, each in a scratch database that is dropped
    assert f"{set_id}: restore drill PASSED" in drilled, drilled
    assert json.loads((backups / f"{set_id}.metadata.json").read_text())["verified"]["ok"] is True
    assert server.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%drill%'") == "0"

    before = {name: fingerprint(server, name) for name in ("shop", "billing", WEIRD)}
    properties, roles = server.psql(PROPERTIES), server.psql(ROLES)
    assert "work_mem=8MB" in properties and "alice:search_path=ledger, public" in properties and "readers=c/" in properties
    assert "alice|t||readers" in roles and "statement_timeout=7s" in roles
    tablespace = server.root / "fast"
    server.stop()  # the server is lost; the new machine has no directory at the tablespace's location yet
    tablespace.rename(server.root / "fast-aside")
    try:
        _restore_onto_a_new_server(fresh_cluster, backups, set_id, before, properties, roles, tablespace)
    finally:
        fresh_cluster.stop()
        shutil.rmtree(tablespace, ignore_errors=True)
        (server.root / "fast-aside").rename(tablespace)
        server.restart()


def _restore_onto_a_new_server(fresh_cluster: Cluster, backups: Path, set_id: str, before: dict[str, object], properties: str, roles: str,
                               tablespace: Path) -> None:
    new = _env(fresh_cluster, backups)  # README: DATABASE_URL of the new server, the same volume, `restore ID`
    failed = cli(new, "restore", set_id, check=False)  # billing's tablespace has no directory here: billing fails, the others come back
    assert failed.returncode == 3, failed.stderr
    assert "1 of 4 databases failed and were left as they were (billing:" in failed.stderr and "restored: postgres, shop" in failed.stderr
    assert fresh_cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'billing'") == "0"
    tablespace.mkdir()  # the directory made, the failed database alone
    shutil.chown(tablespace, fresh_cluster._as_user or os.getuid())
    cli(new, "restore", set_id, "--database", "billing")
    assert fresh_cluster.psql(ROLES) == roles  # roles with their memberships and settings
    assert fresh_cluster.psql(PROPERTIES) == properties  # owner, settings, role-in-database settings, grants, comment, limit
    assert {name: fingerprint(fresh_cluster, name) for name in ("shop", "billing", WEIRD)} == before
    assert fresh_cluster.psql("SELECT spcname, pg_get_userbyid(spcowner), shobj_description(oid, 'pg_tablespace') FROM pg_tablespace "
                              "WHERE spcname = 'fast'") == "fast|app_owner|nvme"
    assert fresh_cluster.psql("SELECT count(*) FROM ledger.archive", "billing") == "300"

    # one database of the set, over the restored one (the swap path); the others are not touched
    fresh_cluster.psql("DELETE FROM items WHERE id > 10", "shop")
    fresh_cluster.psql("INSERT INTO ledger.entries (amount) VALUES (1)", "billing")
    cli(new, "restore", set_id, "--database", "shop")
    assert fresh_cluster.psql("SELECT count(*) FROM items", "shop") == "500"
    assert fresh_cluster.psql("SELECT count(*) FROM ledger.entries", "billing") == "2001"
    missing = cli(new, "restore", set_id, "--database", "nope", check=False)
    assert missing.returncode == 2 and "has no database 'nope'" in missing.stderr


def test_a_gzip_set_keeps_the_sql_gz_layout_per_database(server: Cluster, tmp_path: Path) -> None:
    if not (server.data / "postmaster.pid").exists():
        server.restart()
    env = _env(server, tmp_path / "b", BACKUP_DATABASES="shop,billing", BACKUP_COMPRESSION="gzip", VALIDATION_ENABLED="false")
    set_id = backup_id(env)
    files = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(set_id))
    assert files == [f"{set_id}.db001.sql.gz", f"{set_id}.db002.sql.gz", f"{set_id}.globals.sql.gz", f"{set_id}.metadata.json",
                     f"{set_id}.tablespaces.sql.gz"]
    # each database's file opens without this tool, as the spec's layout promises: gunzip -c | psql
    server.psql("CREATE DATABASE gz_check")
    try:
        loaded = subprocess.run(f"gunzip -c {tmp_path / 'b' / files[0]} | psql -X -q -v ON_ERROR_STOP=1 --single-transaction -d '{server.url('gz_check')}'",
                                shell=True, capture_output=True, text=True, check=False)
        assert loaded.returncode == 0, loaded.stderr
        assert server.psql("SELECT count(*) FROM items", "gz_check") == "500"
    finally:
        server.psql("DROP DATABASE gz_check")
    metadata = json.loads((tmp_path / "b" / f"{set_id}.metadata.json").read_text())
    assert [(d["name"], d["file"]) for d in metadata["databases"]] == [("shop", "dump:001"), ("billing", "dump:002")]


@pytest.mark.parametrize(("value", "words"), [("shop,,billing", "item 2 is empty"), ("shop,shop", "listed twice")])
def test_a_bad_database_list_is_a_one_line_config_error(value: str, words: str, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql:///postgres", "BACKUP_DIR": str(tmp_path), "BACKUP_DATABASES": value}
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_database_in_the_list_is_a_config_error_and_nothing_is_written(server: Cluster, tmp_path: Path) -> None:
    if not (server.data / "postmaster.pid").exists():
        server.restart()
    env = _env(server, tmp_path / "b", BACKUP_DATABASES="shop,nope")
    result = cli(env, "backup", check=False)
    assert result.returncode == 2, result.stderr
    assert "'nope' is not a database on the server" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")] == []


def test_a_database_that_fails_to_dump_fails_the_whole_set_naming_it(server: Cluster, tmp_path: Path) -> None:
    if not (server.data / "postmaster.pid").exists():
        server.restart()
    # every session in `locked` becomes a role that may not read its table: pg_dump fails there, and only there
    server.psql("CREATE ROLE nobody_here NOLOGIN; CREATE DATABASE locked; ALTER DATABASE locked SET role = 'nobody_here'")
    server.psql("SET role = postgres; CREATE TABLE secret (x int)", "locked")
    try:
        env = _env(server, tmp_path / "b", BACKUP_DATABASES="shop,locked,billing", VALIDATION_ENABLED="false")
        result = cli(env, "backup", check=False)
        assert result.returncode == 3, result.stderr
        errors = [line for line in result.stderr.splitlines() if "backup failed" in line]
        assert len(errors) == 1 and "database locked:" in errors[0] and "permission denied" in errors[0], result.stderr
        assert "not dumped after it: billing" in errors[0], errors[0]  # the set has failed: the rest is not dumped for nothing
        assert cli(env, "list").stdout.strip() == "no backups yet"
        assert [p.name for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")] == []  # no partial left either
    finally:
        server.psql("DROP DATABASE locked; DROP ROLE nobody_here")


def test_an_encrypted_set_without_a_volume_streams_to_the_bucket_and_one_database_restores_from_it(
        server: Cluster, fresh_cluster: Cluster, seaweed: SeaweedServer, tmp_path: Path) -> None:
    if not (server.data / "postmaster.pid").exists():
        server.restart()
    secret, public = age.generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(secret + "\n")
    prefix = "set-" + uuid.uuid4().hex[:10]
    env = {**{k: v for k, v in _env(server, tmp_path).items() if k != "BACKUP_DIR"}, **seaweed.environment(prefix), "BACKUP_VOLUME": "false",
           "SIDECAR_STATE_DIR": str(tmp_path / "state"), "BACKUP_DATABASES": "shop,billing", "BACKUP_PARALLEL": "2",
           "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key),
           "VALIDATION_ENABLED": "false"}
    set_id = backup_id(env)
    objects = sorted(info.name for info in seaweed.store(prefix).list())
    assert objects == sorted([f"{set_id}.db001.dump.zst.age", f"{set_id}.db002.dump.zst.age", f"{set_id}.globals.sql.zst.age",
                              f"{set_id}.tablespaces.sql.zst.age", f"{set_id}.metadata.json"])
    assert cli(env, "verify", set_id).stdout.startswith(f"{set_id}: OK")
    restored = json.loads(cli({**env, "DATABASE_URL": fresh_cluster.url("postgres")}, "restore", set_id, "--database", "shop", "--json").stdout)
    assert [r["database"] for r in restored["restored"]] == ["shop"] and restored["ok"] is True
    assert fresh_cluster.psql("SELECT count(*) FROM items", "shop") == "500"
    assert fresh_cluster.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'shop'") == "app_owner"


def test_a_set_dump_waiting_for_a_lock_names_the_session_holding_it_in_that_database(server: Cluster, tmp_path: Path) -> None:
    if not (server.data / "postmaster.pid").exists():
        server.restart()
    env = _env(server, tmp_path / "b", BACKUP_DATABASES="billing,shop", VALIDATION_ENABLED="false")
    holder = subprocess.Popen([find_tool("psql"), "-X", "-q", "-d", server.url("shop"), "-c",
                               "BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(5); COMMIT;"],
                              env={**env, "PGAPPNAME": "nightly-migration"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):  # until it holds the lock
            if server.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'shop' AND application_name = 'nightly-migration' "
                           "AND query LIKE '%pg_sleep%'") == "1":
                break
        out = cli(env, "backup")
    finally:
        holder.wait(timeout=30)
    waits = [line for line in out.stderr.splitlines() if "waiting" in line and "for a lock" in line]
    assert waits and "'nightly-migration'" in waits[0] and "pg_sleep" in waits[0], out.stderr
