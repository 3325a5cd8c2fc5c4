"""A restore into a new database takes its row counts from the load itself (the server's own count of the rows each
COPY inserted), not from a second scan of every table; they equal count(*) for awkward data, tables the load did not
count are still counted with count(*), and a count that differs from the backup's still fails the restore."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.config import load_config
from sidecar.embedded import Cluster
from sidecar.logical.restore import _compare_counts
from sidecar.repository import Repository
from tests.conftest import backup_id, cli
from tests.test_dump_counts import AWKWARD, exact_counts

# the awkward tables of the backup's counter (empty, no columns, unlogged, partitions, inheritance, strange names, a
# 4.8 MB row, 20000 rows split over both connections) without the large object, which sends the archive to the fallback
NO_BLOBS = AWKWARD.replace("SELECT lo_from_bytea(0, decode(repeat('0a', 3000), 'hex'));\n", "")
# hash partitioning on an enum: pg_dump loads these partitions through their root (--load-via-partition-root)
HASHED = """
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy', 'calm', 'glad', 'cross', 'bored', 'proud');
CREATE TABLE public.feelings (m public.mood, n int) PARTITION BY HASH (m);
CREATE TABLE public.feelings_0 PARTITION OF public.feelings FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE public.feelings_1 PARTITION OF public.feelings FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO public.feelings SELECT (enum_range(NULL::public.mood))[1 + g % 8], g FROM generate_series(1, 800) g;
"""


def _since(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_a_restore_counts_the_rows_it_loads_instead_of_scanning_every_table_again_and_the_counts_are_exact(
        cluster: Cluster, db: str, env: dict[str, str]) -> None:
    assert NO_BLOBS != AWKWARD
    cluster.psql(NO_BLOBS + HASHED, db)
    expected = exact_counts(cluster, db)
    meta = json.loads(cli(env, "backup", "--json").stdout)
    assert meta["rowCounts"] == expected and expected["public.empty"] == 0
    assert expected["public.feelings_0"] > 0 and expected["public.feelings_1"] > 0
    log = cluster.root / "server.log"
    offset = log.stat().st_size
    target = f"{db}_copy"
    out = cli({**env, "PGOPTIONS": "-c log_statement=all"}, "restore", meta["id"], "--target-db", target, "--json")
    statements = _since(log, offset)
    assert "over 2 connections" in out.stderr, out.stderr  # the parallel load, not the whole-archive fallback
    report = json.loads(out.stdout)
    assert report["mismatches"] == [] and report["new_findings"] == [] and report["tables_checked"] == len(expected)
    # the restore's own sessions were logged (the COPY of the data), but no count(*) of a table followed the load
    assert "COPY public.bulk" in statements and 'count(*) FROM ONLY "public"."bulk"' not in statements, statements[-3000:]
    # what it compared with the backup's counts is what the restored database holds; but for the partitions loaded
    # through their root, where the server put each row: an enum's hash differs between databases (pg_dump loads them
    # through the root for that reason), so rows may move between them (count(*) of each then differed from the backup's
    # count, and the restore failed): all of them were loaded, as the backup counted them
    restored = exact_counts(cluster, target)
    hashed = {"public.feelings_0", "public.feelings_1"}
    assert {k: n for k, n in restored.items() if k not in hashed} == {k: n for k, n in expected.items() if k not in hashed}
    assert sum(restored[k] for k in hashed) == sum(expected[k] for k in hashed) == 800
    cluster.psql(f'DROP DATABASE "{target}"')


def test_the_tables_a_load_did_not_count_are_counted_with_count_star(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE a (x int); INSERT INTO a SELECT generate_series(1, 5);"
                 "CREATE TABLE b (x int); INSERT INTO b SELECT generate_series(1, 7)", db)
    config = load_config(environ=env)
    metadata = {"rowCounts": {"public.a": 5, "public.b": 7}}
    assert _compare_counts(config, db, metadata, {("public", "a"): 5}) == []
    assert _compare_counts(config, db, metadata, {("public", "a"): 4}) == ["public.a: 4 rows, backup had 5"]
    cluster.psql("DELETE FROM b WHERE x = 1", db)
    assert _compare_counts(config, db, metadata, {("public", "a"): 5}) == ["public.b: 6 rows, backup had 7"]
    assert _compare_counts(config, db, {"rowCounts": {**metadata["rowCounts"], "public.gone": 1}}, {("public", "a"): 5, ("public", "b"): 7}) == [
        "public.gone: missing rows, backup had 1"]


def test_a_restore_whose_loaded_rows_differ_from_the_backups_counts_fails_and_leaves_the_live_database_untouched(
        cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE empty (a int); CREATE TABLE bulk (id int PRIMARY KEY, note text);"
                 "INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 20000) g;"
                 "CREATE TABLE m (at date, v int) PARTITION BY RANGE (at);"
                 "CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
                 "CREATE TABLE m_rest PARTITION OF m DEFAULT;"
                 "INSERT INTO m SELECT date '2024-06-01' + g, g FROM generate_series(1, 400) g", db)
    bid = backup_id(env)
    cluster.psql("INSERT INTO bulk VALUES (0, 'after the backup')", db)
    repo = Repository(Path(env["BACKUP_DIR"]))
    original = repo.get(bid).metadata
    assert original is not None and original["rowCounts"]["public.m_2024"] == 213
    # the metadata tampered with (or a load that lost rows): a big table, an empty one, a partition
    for table, wrong in (("public.bulk", 20001), ("public.empty", 1), ("public.m_2024", 212)):
        repo.write_metadata({**original, "rowCounts": {**original["rowCounts"], table: wrong}})
        out = cli(env, "restore", bid, "--json", check=False)
        assert out.returncode == 3, out.stderr
        error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"row_counts: {table}: " in error[0] and f"backup had {wrong}" in error[0], out.stderr
        assert "the live database was not touched" in error[0], error
        assert cluster.psql("SELECT count(*) FROM bulk WHERE note = 'after the backup'", db) == "1"
        assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_\\_restore\\_%'") == "0"
    repo.write_metadata(original)
    cli(env, "restore", bid)
    assert cluster.psql("SELECT count(*) FROM bulk WHERE note = 'after the backup'", db) == "0"
