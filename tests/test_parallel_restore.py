"""A restore into a new database loads the schema, streams the data over several connections, then builds indexes
and constraints in parallel; a failure at any step leaves the live database untouched and drops the scratch one."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.embedded import Cluster
from sidecar.logical.load import _Reader
from sidecar.postgres import find_tool
from tests.conftest import MAJORS, backup_id, cli, fingerprint, load_dataset, of_major

SCHEMA = """
CREATE TABLE measurements (city int, at date, reading real) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX ON measurements (city, at);
INSERT INTO measurements SELECT g % 10, date '2025-01-01' + g % 700, g * 1.5 FROM generate_series(0, 60000) g;
CREATE TABLE animals (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE dogs (bark text) INHERITS (animals);
INSERT INTO animals (name) SELECT 'cat ' || g FROM generate_series(1, 100) g;
INSERT INTO dogs (name, bark) SELECT 'dog ' || g, 'woof' FROM generate_series(1, 50) g;
-- over 1 MiB of rows, so its COPY goes out over both connections; embedded newlines and backslashes in values
CREATE TABLE wide (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer_id int NOT NULL REFERENCES customer,
                   note text, doubled bigint GENERATED ALWAYS AS (id * 2) STORED, UNIQUE (customer_id, id),
                   CHECK (length(note) > 3));
INSERT INTO wide (customer_id, note) SELECT 1 + g % 59, 'line ' || g || E'\\nnext\\\\line ' || repeat('x', g % 300) FROM generate_series(1, 30000) g;
CREATE INDEX ON wide (lower(note));
-- rows longer than a batch (1 MiB) among short ones: a row cut between two batches stays on one connection
CREATE TABLE long_rows (id int PRIMARY KEY, body text);
INSERT INTO long_rows SELECT g, CASE WHEN g % 40 = 0 THEN repeat(md5(g::text), 50000) ELSE 'short ' || g END FROM generate_series(1, 200) g;
CREATE MATERIALIZED VIEW wide_per_customer AS SELECT customer_id, count(*) FROM wide GROUP BY 1;
CREATE FUNCTION no_delete() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'no'; END$$;
CREATE TRIGGER keep BEFORE DELETE ON animals FOR EACH ROW EXECUTE FUNCTION no_delete();
CREATE SEQUENCE counter START 100;
SELECT nextval('counter'), nextval('counter');
COMMENT ON TABLE wide IS 'loaded in parallel';
"""


@pytest.fixture(name="cluster")
def major(request: pytest.FixtureRequest) -> Cluster:
    return of_major(request)


@pytest.mark.parametrize("cluster", MAJORS, indirect=True)  # PostgreSQL 18 reads COPY's end-of-data line differently
def test_a_restore_of_a_database_with_indexes_constraints_foreign_keys_and_partitions_gives_it_back_identical(
        cluster: Cluster, db: str, env: dict[str, str]) -> None:
    load_dataset(cluster, db, "chinook.sql")
    cluster.psql(SCHEMA, db)
    before = fingerprint(cluster, db)
    bid = backup_id(env)
    cluster.psql("DELETE FROM wide; DROP TABLE measurements; SELECT nextval('counter')", db)
    out = cli(env, "restore", bid)
    assert "previous database is kept as" in out.stdout
    assert "over 2 connections" in out.stderr, out.stderr  # the parallel load, not the whole-archive fallback
    assert fingerprint(cluster, db) == before
    assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_\\_restore\\_%'") == "0"


# boom() fails in any database but the one the backup was taken of: in the restore's scratch database it fails
# the COPY of a column of its domain (the data step) or the build of an index over it (the last step)
BOOM = """
CREATE FUNCTION boom(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$
BEGIN IF current_database() <> '{db}' THEN RAISE EXCEPTION 'boom in %', current_database(); END IF; RETURN $1; END $$;
"""
FAILING = {
    "data": "CREATE DOMAIN checked AS int CHECK (boom(VALUE) = VALUE); CREATE TABLE t (id checked, filler text);",
    "index": "CREATE TABLE t (id int, filler text); CREATE INDEX ON t (boom(id));",
}


@pytest.mark.parametrize("step", sorted(FAILING))
def test_a_failure_while_loading_data_or_building_indexes_leaves_the_live_database_untouched_and_drops_the_scratch_one(
        cluster: Cluster, db: str, env: dict[str, str], step: str) -> None:
    cluster.psql(BOOM.format(db=db) + FAILING[step], db)
    cluster.psql("INSERT INTO t SELECT g, repeat('f', 100) FROM generate_series(1, 40000) g", db)  # 4 MiB: several batches in flight
    bid = backup_id(env)
    cluster.psql("INSERT INTO t VALUES (0, 'after the backup')", db)
    out = cli(env, "restore", bid, check=False)
    assert out.returncode == 3, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "boom in" in error[0] and "the live database was not touched" in error[0], out.stderr
    assert cluster.psql("SELECT count(*) FROM t WHERE filler = 'after the backup'", db) == "1"
    assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_\\_restore\\_%'") == "0"


# -- the archive's reader alone: whatever the read sizes, each table's rows reach the connections whole and in order


@pytest.fixture(scope="module")
def archive(cluster15: Cluster) -> Iterator[bytes]:
    cluster = cluster15
    db = f"reader_{os.getpid()}"
    cluster.psql(f"CREATE DATABASE {db}")
    cluster.psql("CREATE TABLE customer (id int PRIMARY KEY); INSERT INTO customer VALUES (1);"
                 + SCHEMA.split("CREATE MATERIALIZED VIEW")[0].replace("1 + g % 59", "1"), db)
    yield subprocess.run([find_tool("pg_dump"), "-Fc", "-Z0", "-d", cluster.url(db)], capture_output=True, check=True).stdout
    cluster.psql(f"DROP DATABASE {db}")


def _read(archive: bytes, cuts: list[int], batch: int) -> dict[int, list[bytes | None]]:
    sent: dict[int, list[bytes | None]] = {}
    reader = _Reader(lambda head: None, lambda dump_id, statement, data: sent.setdefault(dump_id, []).append(data), batch=batch)
    for a, b in zip([0, *cuts], [*cuts, len(archive)], strict=True):
        reader.feed(archive[a:b])
    assert reader.complete()
    return sent


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_rows_of_every_table_reach_the_connections_whole_and_in_order_whatever_the_read_sizes(archive: bytes, data: st.DataObject) -> None:
    whole = _read(archive, [], 1 << 30)  # one batch per table: pg_dump's COPY text of it, unsplit
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(archive)), max_size=100))))
    batch = data.draw(st.sampled_from([100, 4096, 1 << 20]))
    sent = _read(archive, cuts, batch)
    assert sent.keys() == whole.keys() and len(whole) >= 6
    for dump_id, parts in sent.items():
        assert parts[-1] is None and None not in parts[:-1]  # the table's end, once, after its rows
        assert b"".join(p for p in parts if p is not None) == whole[dump_id][0]


def test_a_latin1_database_with_non_ascii_table_names_and_values_restores_identical(cluster: Cluster, env: dict[str, str]) -> None:
    name = f"latin_{os.getpid()}"
    cluster.psql(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    cluster.psql('CREATE TABLE "café" (id int PRIMARY KEY, "naïve" text); '
                 "INSERT INTO \"café\" SELECT g, 'crème brûlée ' || g FROM generate_series(1, 3000) g", name)
    env = {**env, "DATABASE_URL": cluster.url(name)}
    before = fingerprint(cluster, name)
    bid = backup_id(env)
    cluster.psql('DELETE FROM "café"', name)
    out = cli(env, "restore", bid)
    assert "over 2 connections" in out.stderr, out.stderr
    assert fingerprint(cluster, name) == before
