"""Issue 14, major versions: the sidecar dumps with a pg_dump at least as new as the server and records which; a backup
of a PostgreSQL 15 server restores onto a PostgreSQL 18 server identically (the dump-and-restore upgrade path)."""

from __future__ import annotations

import json

from sidecar.embedded import Cluster
from sidecar.postgres import find_tool
from tests.conftest import TestCluster, backup_id, bin_dir_of, cli, fingerprint, load_dataset
from tests.test_database_properties import can_connect, properties, secure
from tests.test_roundtrip import own_schema

ROLES = """
SELECT string_agg(format('%s super=%s inherit=%s createrole=%s createdb=%s login=%s replication=%s bypassrls=%s limit=%s until=%s password=%s config=%s',
                         r.rolname, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin, r.rolreplication, r.rolbypassrls,
                         r.rolconnlimit, r.rolvaliduntil, md5(coalesce(a.rolpassword, '')), r.rolconfig), E'\\n' ORDER BY r.rolname)
  FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid WHERE r.rolname IN ('app_owner', 'reader ünïcode', 'app_group', 'db_owner', 'appuser', 'outsider')
"""
MEMBERSHIPS = """
SELECT string_agg(m, E'\\n' ORDER BY m) FROM (
  SELECT format('%s in %s admin=%s', pg_get_userbyid(member), pg_get_userbyid(roleid), admin_option) AS m
  FROM pg_auth_members WHERE pg_get_userbyid(member) IN ('app_owner', 'reader ünïcode', 'app_group', 'db_owner', 'appuser', 'outsider')) x
"""


def test_a_backup_of_a_15_server_restores_onto_an_18_server_identically(cluster: Cluster, cluster18: Cluster, db: str, env: dict[str, str]) -> None:
    """The upgrade path of the README: back up the old server with the sidecar beside it, restore that backup with the
    sidecar pointed at the new server (and given tools of the new major)."""
    load_dataset(cluster, db, "pagila-schema.sql")
    own_schema(cluster, db)
    secure(cluster, db)
    cluster.psql("ALTER ROLE appuser VALID UNTIL '2099-01-01 00:00:00+00' CONNECTION LIMIT 9; ALTER ROLE appuser SET lock_timeout = '3s';"
                 "GRANT app_group TO db_owner WITH ADMIN OPTION")
    pg_dump18 = find_tool("pg_dump", bin_dir_of(cluster18))
    before = fingerprint(cluster, db, pg_dump18)  # the schema as PostgreSQL 18's pg_dump prints it
    before_properties, before_roles, before_members = properties(cluster, db), cluster.psql(ROLES), cluster.psql(MEMBERSHIPS)
    bid = backup_id(env)  # the sidecar beside the 15 server: its own tools (15)
    assert json.loads(cli(env, "list", "--json").stdout)[0]["id"] == bid

    with TestCluster(port=54324, bin_dir=bin_dir_of(cluster18)) as new:  # a brand-new 18 server: no roles, no databases
        new_env = {**env, "DATABASE_URL": new.url(db), "PG_BIN_DIR": str(bin_dir_of(cluster18))}
        out = json.loads(cli(new_env, "restore", bid, "--json").stdout)
        assert out["mode"] == "new-database"
        assert new.psql("SHOW server_version_num")[:2] == "18"
        assert fingerprint(new, db) == before
        assert properties(new, db) == before_properties
        assert new.psql(ROLES) == before_roles
        assert new.psql(MEMBERSHIPS) == before_members
        assert not can_connect(new, db, "outsider") and can_connect(new, db, "appuser")
        # and the new server's sidecar backs it up with its own pg_dump, saying which
        meta = json.loads(cli(new_env, "backup", "--json").stdout)
        assert meta["databaseVersion"].startswith("PostgreSQL 18") and meta["pgDumpVersion"].startswith("18."), meta


def test_the_sidecar_dumps_with_a_pg_dump_at_least_as_new_as_the_server_and_records_which(cluster: Cluster, cluster18: Cluster, db: str,
                                                                                          env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    old = json.loads(cli(env, "backup", "--json").stdout)
    assert old["databaseVersion"].startswith("PostgreSQL 15") and old["pgDumpVersion"].startswith("15."), old  # the newest it has here
    newer = json.loads(cli({**env, "PG_BIN_DIR": str(bin_dir_of(cluster18))}, "backup", "--json").stdout)
    assert newer["pgDumpVersion"].startswith("18."), newer  # an older server is dumped by a newer pg_dump
    cluster18.psql(f'CREATE DATABASE "{db}"')
    too_old = cli({**env, "DATABASE_URL": cluster18.url(db)}, "backup", check=False)  # only pg_dump 15 for an 18 server
    assert too_old.returncode == 3, too_old.stderr
    assert "is version 15 but the server is PostgreSQL 18" in too_old.stderr and "PG_BIN_DIR" in too_old.stderr, too_old.stderr
    assert "Traceback" not in too_old.stderr
    assert len(json.loads(cli(env, "list", "--json").stdout)) == 2  # nothing was added by the refused one
