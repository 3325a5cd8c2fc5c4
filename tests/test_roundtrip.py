"""Restore gives back an identical database: same server (swap) and a brand-new server, on PostgreSQL 15 and 18."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.age import generate_identity
from sidecar.embedded import Cluster
from tests.conftest import MAJORS, PASSWORD, backup_id, cli, fingerprint, load_dataset, of_major, password_user


@pytest.fixture(name="cluster", params=MAJORS)
def each_major(request: pytest.FixtureRequest) -> Cluster:
    """Every round trip runs on PostgreSQL 15 and on 18 (ids pg15/pg18), with that major's tools."""
    return of_major(request)

OWN_SCHEMA = """
CREATE ROLE app_owner;
CREATE ROLE "reader ünïcode" LOGIN PASSWORD 'secret-reader';
CREATE ROLE app_group;
GRANT app_group TO "reader ünïcode";
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE SCHEMA "sales ünïcode" AUTHORIZATION app_owner;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TABLE "sales ünïcode"."Kunden" (
  id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  email citext UNIQUE, attrs hstore, mood mood, qty positive,
  price numeric(8,2), total numeric GENERATED ALWAYS AS (price * qty) STORED
);
ALTER TABLE "sales ünïcode"."Kunden" OWNER TO app_owner;
INSERT INTO "sales ünïcode"."Kunden" (email, attrs, mood, qty, price)
  SELECT 'U' || g || '@Example.com', hstore('k', g::text), (ARRAY['sad','ok','happy']::mood[])[1 + g % 3], 1 + g % 5, g / 7.0
  FROM generate_series(1, 500) g;
CREATE TABLE measurements (city int, at date, reading real) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO measurements SELECT g % 10, date '2025-01-01' + g, g * 1.5 FROM generate_series(0, 600) g;
CREATE SEQUENCE counter START 100;
SELECT nextval('counter'), nextval('counter');
SELECT lo_from_bytea(0, convert_to(repeat('large object ', 5000), 'UTF8'));
GRANT USAGE ON SCHEMA "sales ünïcode" TO app_group;
GRANT SELECT ON ALL TABLES IN SCHEMA "sales ünïcode" TO app_group;
"""


def own_schema(cluster: Cluster, db: str) -> None:
    existing = cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'app_owner'")
    sql = OWN_SCHEMA if existing == "0" else "\n".join(line for line in OWN_SCHEMA.splitlines() if not line.startswith(("CREATE ROLE", "GRANT app_group")))
    cluster.psql(sql, db)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "false"])
def test_restore_over_the_live_database_gives_it_back_identical(cluster: Cluster, db: str, env: dict[str, str], compression: str) -> None:
    load_dataset(cluster, db, "chinook.sql")
    own_schema(cluster, db)
    before = fingerprint(cluster, db)
    env = {**env, "BACKUP_COMPRESSION": compression}
    bid = backup_id(env)
    cluster.psql("DELETE FROM invoice_line; DROP TABLE measurements; SELECT nextval('counter')", db)
    out = cli(env, "restore", bid).stdout
    assert "previous database is kept as" in out
    assert fingerprint(cluster, db) == before
    previous = out.strip().split()[-1]
    assert cluster.psql("SELECT count(*) FROM invoice_line", previous) == "0"


def test_restore_onto_a_brand_new_server_creates_database_and_roles(cluster: Cluster, fresh_cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    load_dataset(cluster, db, "pagila-schema.sql")
    own_schema(cluster, db)
    before = fingerprint(cluster, db)
    secret, public = generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(secret + "\n")
    env = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key)}
    bid = backup_id(env)
    new_env = {**env, "DATABASE_URL": fresh_cluster.url(db)}
    out = cli(new_env, "restore", bid, "--json").stdout
    assert json.loads(out)["mode"] == "new-database"
    assert fingerprint(fresh_cluster, db) == before
    # the role came with its password hash and membership: it can log in on the new server
    assert fresh_cluster.psql("SELECT pg_has_role('reader ünïcode', 'app_group', 'member')") == "t"


def test_restore_never_alters_a_role_that_already_exists(cluster: Cluster, fresh_cluster: Cluster, db: str, env: dict[str, str]) -> None:
    own_schema(cluster, db)
    bid = backup_id(env)
    fresh_cluster.psql("CREATE ROLE app_owner CREATEDB CONNECTION LIMIT 7")
    cli({**env, "DATABASE_URL": fresh_cluster.url(db)}, "restore", bid)
    assert fresh_cluster.psql("SELECT rolcreatedb, rolconnlimit FROM pg_roles WHERE rolname = 'app_owner'") == "t|7"


def test_target_db_leaves_the_live_database_alone(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    load_dataset(cluster, db, "chinook.sql")
    bid = backup_id(env)
    cluster.psql("DELETE FROM playlist_track", db)
    cli(env, "restore", "latest", "--target-db", db + "_copy")
    assert cluster.psql("SELECT count(*) FROM playlist_track", db) == "0"
    assert cluster.psql("SELECT count(*) FROM playlist_track", db + "_copy") == "8715"
    assert bid


def test_in_place_restore_replaces_objects(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    load_dataset(cluster, db, "chinook.sql")
    before = fingerprint(cluster, db)
    backup_id(env)
    cluster.psql("DELETE FROM invoice_line", db)
    cli(env, "restore", "latest", "--in-place")
    assert fingerprint(cluster, db) == before


def test_metadata_keeps_spec_fields_and_exact_row_counts_and_no_secret(cluster: Cluster, env: dict[str, str], db: str) -> None:
    password_user(cluster)
    load_dataset(cluster, db, "chinook.sql")
    cluster.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO pwuser", db)
    env = {**env, "DATABASE_URL": cluster.url(db, user="pwuser", password=PASSWORD)}
    result = cli(env, "backup", "--json", "--label", "before migration")
    meta = json.loads(result.stdout)
    for field in ("id", "timestamp", "size", "checksum", "compressed", "encrypted", "databaseVersion"):
        assert field in meta
    assert meta["rowCounts"]["public.track"] == 3503
    assert meta["label"] == "before migration"
    backups = Path(env["BACKUP_DIR"])
    assert PASSWORD not in (backups / f"{meta['id']}.metadata.json").read_text()
    assert PASSWORD not in result.stderr + result.stdout
    assert sorted(p.name for p in backups.iterdir() if not p.name.startswith(".")) == sorted(
        [meta["files"]["dump"]["name"], meta["files"]["globals"]["name"], f"{meta['id']}.metadata.json"])


def test_restore_ends_sessions_on_the_live_database_and_swaps(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    import subprocess

    from sidecar.postgres import find_tool

    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g", db)
    bid = backup_id(env)
    cluster.psql("DELETE FROM t", db)
    session = subprocess.Popen([find_tool("psql"), "-X", "-d", cluster.url(db), "-c", "SELECT pg_sleep(60)"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "PGAPPNAME": "billing-worker"})
    try:
        for _ in range(100):
            if cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep%'") != "0":
                break
        out = cli(env, "restore", bid)
        _, stderr = session.communicate(timeout=30)
        assert "terminat" in stderr
        # the operator is told how many sessions were ended and whose
        assert "ended 1 sessions on" in out.stdout and "1 x billing-worker (postgres)" in out.stdout
        assert "ending 1 sessions on" in out.stderr and "billing-worker" in out.stderr
    finally:
        session.kill()
    assert cluster.psql("SELECT count(*) FROM t", db) == "100"
