"""Row counts read from pg_dump's own output (one pass over the data) equal count(*) for awkward data."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.embedded import Cluster
from sidecar.logical.dumpcounts import DumpCountError, count_dump
from sidecar.postgres import find_tool

AWKWARD = r'''
CREATE TABLE public.texts (id int, body text);
INSERT INTO public.texts VALUES (1, E'line one\nline two\n'), (2, E'back\\slash'), (3, E'\\.'), (4, E'\\.\n\\.'),
  (5, '\.'), (6, E'tab\there\r\n'), (7, NULL), (8, ''), (9, E'COPY public.texts (id, body) FROM stdin;\n1\tx\n\\.\n'), (10, 'ünïcode ✓');
CREATE TABLE public.bytes (b bytea);
INSERT INTO public.bytes SELECT decode(repeat('0a5c2e0a00ff', g), 'hex') FROM generate_series(0, 50) g;
CREATE TABLE public.wide (id int, payload text);
INSERT INTO public.wide SELECT g, repeat(E'x\n\\', 1200000) FROM generate_series(1, 3) g;  -- rows of 4.8 MB: longer than a read
CREATE TABLE public.empty (a int);
CREATE TABLE public.nocols ();
INSERT INTO public.nocols DEFAULT VALUES; INSERT INTO public.nocols DEFAULT VALUES; INSERT INTO public.nocols DEFAULT VALUES;
CREATE UNLOGGED TABLE public.scratch (a int);
INSERT INTO public.scratch SELECT generate_series(1, 77);
CREATE TABLE public.measures (at date, v int) PARTITION BY RANGE (at);
CREATE TABLE public.measures_2024 PARTITION OF public.measures FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE public.measures_rest PARTITION OF public.measures DEFAULT;
INSERT INTO public.measures SELECT date '2024-06-01' + g, g FROM generate_series(1, 400) g;
CREATE TABLE public.animal (name text);
CREATE TABLE public.dog (good boolean) INHERITS (public.animal);
INSERT INTO public.animal VALUES ('cat'), ('cow');
INSERT INTO public.dog VALUES ('rex', true), ('fido', true), ('max', false);
CREATE SCHEMA "we""ird.schema";
CREATE TABLE "we""ird.schema"."ta.ble ""x""" (a int);
INSERT INTO "we""ird.schema"."ta.ble ""x""" SELECT generate_series(1, 12);
CREATE TABLE "we""ird.schema"."new
line" (a text);
INSERT INTO "we""ird.schema"."new
line" VALUES ('a'), ('b');
CREATE SCHEMA "sales ünïcode";
CREATE TABLE "sales ünïcode"."Größe" ("Spalte ""1""" int);
INSERT INTO "sales ünïcode"."Größe" SELECT generate_series(1, 5);
CREATE MATERIALIZED VIEW public.texts_view AS SELECT * FROM public.texts;
SELECT lo_from_bytea(0, decode(repeat('0a', 3000), 'hex'));
CREATE FUNCTION public.lookalike() RETURNS text LANGUAGE sql AS $$ SELECT '
COPY public.ghost (a) FROM stdin;
1
\.
' $$;
CREATE TABLE public.bulk (id int, note text);
INSERT INTO public.bulk SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE TABLE public.lengths (v text);  -- COPY lines of 10, 266, 2570, 2815 and 655370 bytes: a newline or NUL in their lengths
INSERT INTO public.lengths SELECT repeat('a', (ARRAY[9, 265, 2569, 2814, 9, 99])[1 + g % 6]) FROM generate_series(1, 3000) g;
INSERT INTO public.lengths SELECT repeat('b', 655369) FROM generate_series(1, 2);
INSERT INTO public.lengths SELECT repeat('c', 9) FROM generate_series(1, 500);
'''

EXACT = r"""
SELECT format('%s.%s', n.nspname, c.relname), c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%' ORDER BY 1
"""


def exact_counts(cluster: Cluster, db: str) -> dict[str, int]:
    """count(*) of every table (FROM ONLY: an inheritance parent without its children's rows), as count_rows has it."""
    import psycopg

    with psycopg.connect(cluster.url(db)) as conn:
        tables = conn.execute(EXACT).fetchall()
        return {key: conn.execute(f"SELECT count(*) FROM ONLY {regclass}").fetchone()[0] for key, regclass in tables}  # type: ignore[index]


@pytest.fixture
def awkward(cluster: Cluster, db: str) -> str:
    cluster.psql(AWKWARD, db)
    return db


@pytest.mark.parametrize("compression", ["zstd", "gzip"])  # custom format (-Fc -Z0), and plain (the .sql.gz layout)
def test_the_row_counts_in_a_backups_metadata_equal_count_star_for_awkward_data(cluster: Cluster, awkward: str, env: dict[str, str], compression: str) -> None:
    cluster.psql(f'ALTER DATABASE "{awkward}" SET log_statement = \'all\'')
    log = cluster.root / "server.log"
    before = log.stat().st_size
    meta = json.loads(cli({**env, "BACKUP_COMPRESSION": compression}, "backup", "--json").stdout)
    backup = meta["id"]
    with log.open("rb") as f:
        f.seek(before)
        statements = f.read().decode(errors="replace")
    assert meta["format"] == ("plain" if compression == "gzip" else "custom")
    expected = exact_counts(cluster, awkward)
    assert meta["rowCounts"] == expected
    assert expected["public.wide"] == 3 and expected["public.nocols"] == 3 and expected["public.empty"] == 0 and expected["public.animal"] == 2
    assert 'we"ird.schema.ta.ble "x"' in expected and "public.measures" not in expected and "public.ghost" not in expected
    # one pass: the tables were read by pg_dump only, no count(*) of each beside it
    assert "COPY public.bulk" in statements and "count(*) FROM ONLY" not in statements
    # and a restore compares the restored tables with these counts (it fails on a mismatch)
    cli(env, "restore", backup, "--target-db", f"{awkward}_copy")


def test_a_backup_whose_pg_dump_fails_mid_way_records_no_counts(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    # a table that pg_dump (row_security off) may not read in full: it fails at that table, after the others' data
    owner = f"owner_{db}"
    cluster.psql(f'CREATE ROLE "{owner}" LOGIN; ALTER DATABASE "{db}" OWNER TO "{owner}"')
    cluster.psql(f'SET ROLE "{owner}"; CREATE TABLE aaa (a int); INSERT INTO aaa SELECT generate_series(1, 1000);'
                 f"CREATE TABLE zzz (a int); INSERT INTO zzz VALUES (1), (2); ALTER TABLE zzz ENABLE ROW LEVEL SECURITY;"
                 f"ALTER TABLE zzz FORCE ROW LEVEL SECURITY; CREATE POLICY odd ON zzz USING (a % 2 = 1)", db)
    result = cli({**env, "DATABASE_URL": cluster.url(db, user=owner)}, "backup", check=False)
    assert result.returncode == 3, result.stderr
    assert "row-level security" in result.stderr and "Traceback" not in result.stderr
    assert not list(Path(env["BACKUP_DIR"]).glob("*.metadata.json"))


# -- the parser alone, on real dumps cut at random places


@pytest.fixture(scope="module")
def dumps(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    db = f"dumps_{os.getpid()}"
    cluster.psql(f'CREATE DATABASE "{db}"')
    cluster.psql(AWKWARD.replace("1200000", "120000"), db)  # rows of 480 kB: still longer than pg_dump's own buffers
    pg_dump = find_tool("pg_dump")
    out = {fmt: subprocess.run([pg_dump, f"--format={fmt}", *(["--compress=0"] if fmt == "custom" else []), "-d", cluster.url(db)],
                               capture_output=True, check=True).stdout for fmt in ("custom", "plain")}
    out["expected"] = json.dumps(exact_counts(cluster, db)).encode()
    yield out
    cluster.psql(f'DROP DATABASE "{db}"')


def _keyed(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    return {f"{s}.{t}": n for (s, t), n in counts.items()}


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_the_parser_counts_a_whole_dump_exactly(dumps: dict[str, bytes], fmt: str) -> None:
    expected = json.loads(dumps["expected"])
    counts = _keyed(count_dump([dumps[fmt]], fmt))
    assert {k: v for k, v in counts.items() if k in expected} == expected
    assert set(expected) <= set(counts)


def test_most_of_a_custom_dump_is_counted_by_the_fast_path_and_agrees_with_the_stepping(dumps: dict[str, bytes]) -> None:
    from sidecar.logical import dumpcounts

    counter = dumpcounts.CustomCounter()
    counter.feed(dumps["custom"])
    fast = counter.result()
    assert counter.fast_bytes > 0.5 * (len(dumps["custom"]) - counter.toc_end), (counter.fast_bytes, len(dumps["custom"]))
    original = dumpcounts._stretch
    try:  # the same dump by the exact stepping alone
        dumpcounts._stretch = lambda buf, pos, stop: (pos, 0, None)  # type: ignore[assignment]
        stepped = count_dump([dumps["custom"]], "custom")
    finally:
        dumpcounts._stretch = original
    assert fast == stepped


def _rechunked(dump: bytes, toc_end: int, sizes: list[int]) -> bytes:
    """The custom dump with every table's data cut into chunks of `sizes` bytes in turn, whatever the rows (a negative
    size: that many whole rows per chunk), not as pg_dump writes them (one row per chunk); large objects as they were."""
    def int_at(at: int) -> int:
        value = int.from_bytes(dump[at + 1:at + 5], "little")
        return -value if dump[at] else value

    out, at = [dump[:toc_end]], toc_end
    while at < len(dump):
        kind = dump[at]
        out.append(dump[at:at + 6])  # the block's type and dump id
        at += 6
        while True:
            if kind == 3:  # large objects: an oid (0: the block's end), then its chunks
                out.append(dump[at:at + 5])
                at += 5
                if int_at(at - 5) == 0:
                    break
            payload = []
            while (length := int_at(at)) != 0:
                payload.append(dump[at + 5:at + 5 + length])
                at += 5 + length
            at += 5
            data, i, n = b"".join(payload), 0, 0
            end = b"\\.\n\n\n" if data.endswith(b"\\.\n\n\n") else b""  # pg_dump's `\\.` line stays a chunk of its own
            data = data[:len(data) - len(end)]
            while i < len(data) and kind == 1:
                size = sizes[n % len(sizes)]
                if size < 0:  # whole rows
                    stop = i
                    for _ in range(-size):
                        stop = data.find(b"\n", stop) + 1 or len(data)
                    size = stop - i
                piece = data[i:i + size]
                out.append((0).to_bytes(1, "little") + len(piece).to_bytes(4, "little") + piece)
                i, n = i + len(piece), n + 1
            if end:
                out.append((0).to_bytes(1, "little") + len(end).to_bytes(4, "little") + end)
            if kind == 3:
                out += [(0).to_bytes(1, "little") + len(p).to_bytes(4, "little") + p for p in payload]
            out.append(bytes(5))
            if kind == 1:
                break
    return b"".join(out)


@pytest.mark.parametrize("sizes", [[1, 7, 300, 2], [10, 266, 2570], [4096], [100_000], [-2], [-1, -3]],
                         ids=["tiny", "newline-lengths", "4k", "100k", "two-rows", "one-or-three-rows"])
def test_chunks_that_are_not_one_row_each_are_counted_exactly_by_stepping(dumps: dict[str, bytes], sizes: list[int]) -> None:
    """Never a wrong count: the fast path takes only pg_dump's one row per chunk; the stepping counts the rest exactly."""
    from sidecar.logical.dumpcounts import CustomCounter

    head = CustomCounter()
    head.feed(dumps["custom"])
    expected = head.result()
    odd = _rechunked(dumps["custom"], head.toc_end, sizes)
    assert odd != dumps["custom"]
    for reads in ([odd], [odd[i:i + 65536] for i in range(0, len(odd), 65536)]):
        counter = CustomCounter()
        for chunk in reads:
            counter.feed(chunk)
        assert counter.result() == expected


def _one_row_chunks(dump: bytes, toc_end: int, rows: list[bytes]) -> bytes:
    """The custom dump with every table's rows replaced by `rows`, framed as pg_dump frames them (one row per chunk, then
    its `\\.` line and a zero length); large objects left out of the data (their blocks kept as they were)."""
    out, at = [dump[:toc_end]], toc_end
    framed = b"".join(b"\x00" + len(row).to_bytes(4, "little") + row for row in [*rows, b"\\.\n\n\n"]) + bytes(5)
    while at < len(dump):
        kind = dump[at]
        start, at = at, at + 6
        while True:  # skip the block's chunks (and a large-objects block's oids)
            if kind == 3:
                oid = dump[at + 1:at + 5]
                at += 5
                if oid == bytes(4):
                    break
            while (length := int.from_bytes(dump[at + 1:at + 5], "little")) != 0:
                at += 5 + length
            at += 5
            if kind == 1:
                break
        out.append(dump[start:start + 6] + framed if kind == 1 else dump[start:at])
    return b"".join(out)


# lengths with a newline (10) or a NUL next to one in their bytes, which a search for a newline then a NUL also finds
AWKWARD_LENGTHS = st.sampled_from([1, 2, 9, 10, 11, 266, 2560, 2570, 2815, 2816])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.one_of(AWKWARD_LENGTHS, st.integers(1, 400)), min_size=200, max_size=1500),
       wide=st.lists(st.tuples(st.integers(0, 1500), st.sampled_from([65546, 655370, 655371])), max_size=2),
       read=st.sampled_from([1 << 20, 65536, 7777]))
def test_one_row_chunks_of_awkward_lengths_are_counted_exactly_by_the_fast_path(dumps: dict[str, bytes], lengths: list[int],
                                                                               wide: list[tuple[int, int]], read: int) -> None:
    """pg_dump's own framing, rows whose lengths hold the bytes the fast path looks for (a newline, or a newline then a
    NUL, as at a chunk's end): every row counted, no more."""
    from sidecar.logical.dumpcounts import CustomCounter

    for at, length in wide:
        lengths.insert(at, length)
    head = CustomCounter()
    head.feed(dumps["custom"])
    rows = [(b"r" * (n - 1))[: n - 1] + b"\n" for n in lengths]
    dump = _one_row_chunks(dumps["custom"], head.toc_end, rows)
    counter = CustomCounter()
    for at in range(0, len(dump), read):
        counter.feed(dump[at:at + read])
    counts = counter.result()
    assert counts and set(counts.values()) == {len(rows)}, counts
    if read == 1 << 20 and sum(lengths) > 300_000 and not wide:
        assert counter.fast_bytes > 0.5 * (len(dump) - head.toc_end)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from(["custom", "plain"]))
def test_the_same_dump_fed_in_random_chunk_sizes_gives_the_same_counts(dumps: dict[str, bytes], data: st.DataObject, fmt: str) -> None:
    whole = dumps[fmt]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=200)))
    small = data.draw(st.integers(1, 64))  # and one stretch fed a few bytes at a time
    at = data.draw(st.integers(0, len(whole)))
    cuts = sorted({*cuts, *range(at, min(len(whole), at + 4000), small)})
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert count_dump(chunks, fmt) == count_dump([whole], fmt)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from(["custom", "plain"]))
def test_a_dump_cut_short_gives_no_counts(dumps: dict[str, bytes], data: st.DataObject, fmt: str) -> None:
    whole = dumps[fmt]
    end = data.draw(st.integers(0, len(whole) - 1))
    try:
        counts = count_dump([whole[:end]], fmt)
    except DumpCountError:
        return
    # a plain dump cut after its closing comment (in the last lines, e.g. `\unrestrict`) has all its data: the counts
    # are the whole dump's (and pg_dump's exit status, checked by the backup, tells the cut); never other counts
    assert fmt == "plain" and b"-- PostgreSQL database dump complete" in whole[:end] and counts == count_dump([whole], fmt)


def test_a_compressed_archive_is_refused_rather_than_miscounted(cluster: Cluster, db: str) -> None:
    cluster.psql("CREATE TABLE t (a int); INSERT INTO t SELECT generate_series(1, 10)", db)
    archive = subprocess.run([find_tool("pg_dump"), "-Fc", "-d", cluster.url(db)], capture_output=True, check=True).stdout
    with pytest.raises(DumpCountError, match="compressed"):
        count_dump([archive], "custom")


def test_tables_the_dump_has_no_rows_for_or_a_dump_not_understood_are_counted_in_the_snapshot(cluster: Cluster, db: str) -> None:
    import io

    import psycopg

    from sidecar.logical.backup import _row_counts
    from sidecar.logical.dumpcounts import CountingReader, row_counter

    empty = subprocess.run([find_tool("pg_dump"), "-Fc", "-Z0", "-d", cluster.url(db)], capture_output=True, check=True).stdout
    cluster.psql("CREATE TABLE t (a int); INSERT INTO t SELECT generate_series(1, 7)", db)
    for stream in (empty, b"PGDMP\x09\x09\x09 not an archive this code knows"):
        with psycopg.connect(cluster.url(db)) as conn:
            tap = CountingReader(io.BytesIO(stream), row_counter("custom"))
            while tap.read(1 << 20):
                pass
            assert _row_counts(conn, tap) == {"public.t": 7}
