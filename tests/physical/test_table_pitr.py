"""Table-level recovery (issue 16): `pitr find` names the transaction that dropped, emptied or last wrote to a table,
read from the archived WAL; `restore --table` brings tables back beside the live ones, as they were just before it
(through a scratch server) or as a logical backup has them. Real servers; the pure parts without I/O."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from sidecar.embedded import Cluster
from sidecar.errors import UsageError
from sidecar.logical.tables import one_database, plan, select_entries, toc_entries, with_suffix
from sidecar.physical.find import Search, Table, parse_end, parse_record, parse_table
from sidecar.physical.wal import parse_lsn
from tests.conftest import backup_id, cli
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for
from tests.storage.seaweed import SeaweedServer

# --- pure ------------------------------------------------------------------------------------------


def test_a_table_is_named_schema_dot_name_with_quotes_where_needed() -> None:
    assert parse_table("public.Orders") == Table("public", "orders")
    assert parse_table('"Sales"."Q1 ""big"" orders"') == Table("Sales", 'Q1 "big" orders')
    assert str(Table("Sales", "q1")) == '"Sales".q1'
    for bad in ("orders", "a.b.c", '"x.y', "public.", " .x"):
        with pytest.raises(UsageError, match="schema.name|double quote"):
            parse_table(bad)
    assert plan([Table("s", "t")], "_pitr") == {Table("s", "t"): Table("s", "t_pitr")}
    with pytest.raises(UsageError, match="longer than PostgreSQL's 63 bytes"):
        plan([Table("s", "x" * 60)], "_pitr")
    assert with_suffix("é" * 40, "_pitr").encode().__len__() <= 63


LINES = [
    "rmgr: Standby     len (rec/tot):     42/    42, tx:        728, lsn: 0/00605930, prev 0/00605900, desc: LOCK xid 728 db 5 rel 16385 ",
    "rmgr: Transaction len (rec/tot):    361/   361, tx:        728, lsn: 0/006060D8, prev 0/00606048, desc: COMMIT 2026-11-26 21:27:03.926574 UTC; "
    "rels: base/5/16390 base/5/16385; inval msgs: catcache 55 relcache 16385",
    "rmgr: Heap        len (rec/tot):     54/    54, tx:        731, lsn: 0/006058C8, prev 0/006058A0, desc: DELETE off 1 flags 0x00 KEYS_UPDATED , "
    "blkref #0: rel 1663/5/16393 blk 0",
    "rmgr: Transaction len (rec/tot):     46/    46, tx:        730, lsn: 0/00605900, prev 0/006058C8, desc: COMMIT 2026-11-26 21:27:04.5 UTC; "
    "subxacts: 731",
    "rmgr: Transaction len (rec/tot):   1701/  1701, tx:        732, lsn: 0/00607158, prev 0/00607120, desc: COMMIT 2026-11-26 21:27:05 UTC; "
    "rels: base/5/16393; dropped stats: 2/5/16391 2/5/16385; inval msgs: catcache 32",
]


def test_pg_waldump_lines_tell_a_drop_a_truncate_and_the_last_write() -> None:
    records = [r for r in (parse_record(line) for line in LINES) if r is not None]
    end = parse_end(records[-1])
    assert end is not None and end.dropped == {"2/5/16391", "2/5/16385"} and end.rels == ("base/5/16393",)

    def found(kind: str, before: datetime | None = None) -> int | None:
        search = Search(kind, 5, 16385, before)
        for record in records:
            search.feed(record)
        return search.found.xid if search.found else None

    assert found("dropped") == 732
    assert found("truncated") == 728
    assert found("last-write") == 730  # a subtransaction's DELETE counts for its top transaction
    assert found("last-write", datetime(2026, 11, 26, 21, 27, 4, tzinfo=UTC)) == 728  # the TRUNCATE emptied it: a write too
    assert found("dropped", datetime(2026, 11, 26, 21, 27, 5, tzinfo=UTC)) is None


def test_a_table_restore_selects_definitions_the_chosen_rows_and_their_foreign_keys_from_the_toc() -> None:
    entries = toc_entries([";", "; Archive created at ...", "210; 1259 16386 TABLE public orders app", "211; 1259 16390 TABLE public orders2 app",
                           "3350; 0 16386 TABLE DATA public orders app", "3351; 0 16390 TABLE DATA public orders2 app",
                           "3352; 0 0 SEQUENCE SET public orders_id_seq app", "3360; 2606 16401 FK CONSTRAINT public orders orders_c_fkey app",
                           "3361; 3466 16405 EVENT TRIGGER - audit app"])
    orders = [Table("public", "orders")]
    assert [w for _line, w in entries][:2] == ["TABLE public orders app", "TABLE public orders2 app"]
    assert select_entries(entries, orders, "data") == ["3350; 0 16386 TABLE DATA public orders app", "3352; 0 0 SEQUENCE SET public orders_id_seq app"]
    assert select_entries(entries, orders, "fk") == ["3360; 2606 16401 FK CONSTRAINT public orders orders_c_fkey app"]
    assert not [line for line in select_entries(entries, orders, "schema") if "EVENT TRIGGER" in line or "FK CONSTRAINT" in line]


def test_a_table_restore_reads_one_database_of_a_set_with_the_sets_roles_and_refuses_a_database_of_a_single_backup() -> None:
    dump = {"name": "b.db002.dump.zst", "size": 3, "checksum": "c2"}
    whole = {"id": "b", "format": "custom", "database": None, "databases": [{"name": "shop", "file": "dump:001", "rowCounts": {"t": 1}},
                                                                            {"name": "billing", "file": "dump:002", "rowCounts": {"u": 2}}],
             "files": {"globals": {"name": "b.globals.sql.zst"}, "dump:001": {"name": "b.db001.dump.zst"}, "dump:002": dump}}
    one = one_database("b", whole, "billing")
    assert one["database"] == "billing" and one["rowCounts"] == {"u": 2}
    assert one["files"] == {"dump": dump, "globals": {"name": "b.globals.sql.zst"}}  # only what the restore reads is checked
    with pytest.raises(UsageError, match="whole server's set \\(shop, billing\\): give --database NAME"):
        one_database("b", whole, None)
    with pytest.raises(UsageError, match="no database 'nope'; it has shop, billing"):
        one_database("b", whole, "nope")
    single = {"id": "s", "format": "custom", "database": "app", "files": {"dump": dump}}
    assert one_database("s", single, None) is single
    with pytest.raises(UsageError, match="backup s is of one database \\(app\\); leave out --database"):
        one_database("s", single, "app")


# --- real servers ----------------------------------------------------------------------------------

CHECKSUM = "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM {} x"


def _sum(cluster: Cluster, table: str, db: str = "postgres") -> str:
    return cluster.psql(CHECKSUM.format(table), db)


class Writer:
    """Other writes going on: a row a few milliseconds into public.other, in its own connection, until stopped."""

    def __init__(self, url: str) -> None:
        self.stop = threading.Event()
        self.rows = 0
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not self.stop.is_set():
                conn.execute("INSERT INTO other (note) VALUES ('w')")
                self.rows += 1
                time.sleep(0.005)

    def join(self) -> None:
        self.stop.set()
        self.thread.join()


def test_a_dropped_table_is_found_in_the_wal_and_restored_beside_the_live_ones_with_every_row(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                                 tmp_path: Path, scratch_tmp: Path) -> None:
    c = wal_cluster
    backups = Path(pitr_env["BACKUP_DIR"])
    pitr_env["TMPDIR"] = str(scratch_tmp)  # the scratch servers' directories, apart from other tests' in /tmp
    c.psql("CREATE TABLE customers (id int PRIMARY KEY, name text); CREATE TABLE other (id serial PRIMARY KEY, note text);"
           "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers, amount numeric CHECK (amount > 0), "
           "  note text); CREATE INDEX orders_customer ON orders (customer_id);"
           "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer_id int REFERENCES customers, what text);"
           "CREATE TABLE staging (id int)")
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(pitr_env, "base-backup")
        c.psql("INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 50) g;"
               "INSERT INTO orders (customer_id, amount, note) SELECT 1 + g % 50, g, repeat('x', g % 300) FROM generate_series(1, 2000) g;"
               "INSERT INTO events (customer_id, what) SELECT 1 + g % 50, 'e' || g FROM generate_series(1, 500) g;"
               "INSERT INTO staging SELECT generate_series(1, 10)")
        writer = Writer(c.url("postgres"))
        try:
            orders = _sum(c, "orders")
            events = _sum(c, "events")
            truncated = c.psql("BEGIN; TRUNCATE staging; SELECT txid_current() % 4294967296; COMMIT")
            c.psql("INSERT INTO staging VALUES (11)")
            # the DROP's COMMIT record (~20 KB: the files, statistics and cache entries of 61 tables) starts just before a segment
            # ends and ends in the next segment: pg_waldump must read both to see it
            c.psql("SELECT format('CREATE TABLE junk%s (id int PRIMARY KEY, t text)', g) FROM generate_series(1, 60) g \\gexec")
            dropped = c.psql("BEGIN; DROP TABLE orders, " + ", ".join(f"junk{i}" for i in range(1, 61)) + ";"
                             "SELECT 1 WHERE pg_logical_emit_message(true, 'pad', repeat('x', greatest(0, (1048576 - ((pg_current_wal_insert_lsn() "
                             "- '0/0') % 1048576))::int - 3000))) IS NULL;"
                             "SELECT txid_current() % 4294967296; COMMIT")
            c.psql("INSERT INTO events (customer_id, what) VALUES (1, 'after the drop')")
            events = _sum(c, "events")
            time.sleep(1.1)
            before_delete = datetime.now(UTC)
            time.sleep(1.1)
            deleted = c.psql("BEGIN; DELETE FROM events; SELECT txid_current() % 4294967296; COMMIT")
            time.sleep(0.3)
        finally:
            writer.join()
        assert writer.rows > 20, writer.rows
        now = datetime.now(UTC)
        last = switch(c)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
        emptied = c.psql("BEGIN; TRUNCATE other; SELECT txid_current() % 4294967296; COMMIT")  # only in the receiver's .partial
        position = c.psql("SELECT pg_current_wal_lsn()")
        wait_for(lambda: c.psql(f"SELECT flush_lsn >= '{position}' FROM pg_stat_replication") == "t", "the receiver to flush the TRUNCATE")
    finally:
        assert receiver.stop() == 0
    live = {t: _sum(c, t) for t in ("customers", "other", "staging")}
    recent = cli(pitr_env, "pitr", "find", "--truncated-table", "public.other").stdout
    assert f"transaction {emptied} emptied" in recent and "not archived yet" in recent, recent

    found = cli(pitr_env, "pitr", "find", "--dropped-table", "public.orders")
    assert f"transaction {dropped} dropped public.orders" in found.stdout, found.stdout
    assert f"pg-backup-sidecar restore --to-xid {dropped} --exclusive --table public.orders" in found.stdout, found.stdout
    commit = json.loads(cli(pitr_env, "pitr", "find", "--dropped-table", "public.orders", "--json").stdout)["lsn"]
    assert (1 << 20) - parse_lsn(commit) % (1 << 20) < 8000, commit  # it did start at the end of a segment
    assert f"transaction {truncated} emptied or rewrote public.staging" in cli(pitr_env, "pitr", "find", "--truncated-table", "public.staging").stdout
    last_write = cli(pitr_env, "pitr", "find", "--last-write-to", "public.events", "--before", now.isoformat(), "--json").stdout
    assert f'"xid": {deleted}' in last_write, last_write
    unknown = cli(pitr_env, "pitr", "find", "--truncated-table", "public.nope", check=False)
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1 and "public.nope" in unknown.stderr, unknown.stderr

    # the three commands of the README: find (above), restore beside the live tables, copy back
    restored = cli(pitr_env, "restore", "--to-xid", dropped, "--exclusive", "--table", "public.orders", "--table", "public.customers")
    assert "into postgres as public.orders_pitr (2000 rows)" in restored.stdout, restored.stdout
    assert _sum(c, "orders_pitr") == orders
    assert c.psql("SELECT count(*) FROM pg_constraint WHERE conrelid = 'orders_pitr'::regclass AND contype = 'f' "
                  "AND confrelid = 'customers_pitr'::regclass") == "1"  # a foreign key between restored tables stays
    assert c.psql("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY indexrelid::regclass::text) FROM pg_index WHERE indrelid = 'orders_pitr'::regclass") == \
        "orders_customer_pitr,orders_pkey_pitr"
    # its own sequence, past every id it had given (recovery moves a sequence up to 32 values ahead, as after a crash)
    assert 2000 < int(c.psql("SELECT nextval('orders_id_seq_pitr')")) <= 2033
    assert {t: _sum(c, t) for t in ("customers", "other", "staging")} == live  # the live tables are untouched
    c.psql("ALTER TABLE orders_pitr RENAME TO orders")

    at = cli(pitr_env, "restore", "--to-time", before_delete.isoformat(), "--table", "public.events")
    assert _sum(c, "events_pitr") == events, at.stdout
    assert "left out: foreign key events_customer_id_fkey of events_pitr to customers (not restored)" in at.stdout, at.stdout
    again = cli(pitr_env, "restore", "--to-time", before_delete.isoformat(), "--table", "public.events", check=False)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "public.events_pitr (a table) already exists in database postgres" in again.stderr, again.stderr
    assert not list(scratch_tmp.iterdir())  # every scratch server and directory removed


def test_a_table_of_a_logical_backup_is_restored_beside_the_live_one(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent, v text);"
                 "INSERT INTO parent SELECT generate_series(1, 10); INSERT INTO child (parent_id, v) SELECT 1 + g % 10, md5(g::text) FROM generate_series(1, 300) g;"
                 "CREATE TABLE other (x int); INSERT INTO other VALUES (1);"
                 "CREATE TABLE measure (at date NOT NULL, v int) PARTITION BY RANGE (at); CREATE INDEX measure_at ON measure (at);"
                 "CREATE TABLE measure_2025 PARTITION OF measure FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
                 "CREATE TABLE measure_2026 PARTITION OF measure FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
                 "INSERT INTO measure SELECT date '2025-06-01' + g, g FROM generate_series(1, 400) g", db)
    expected = _sum(cluster, "child", db)
    measure = _sum(cluster, "measure", db)
    backup = backup_id(env)
    cluster.psql("DELETE FROM child; INSERT INTO other VALUES (2)", db)
    done = cli(env, "restore", backup, "--table", "public.child")
    assert f"restored public.child as of {backup} into {db} as public.child_restored (300 rows)" in done.stdout, done.stdout
    assert "left out: foreign key child_parent_id_fkey" in done.stdout, done.stdout
    assert _sum(cluster, "child_restored", db) == expected and cluster.psql("SELECT count(*) FROM child", db) == "0"
    assert cluster.psql("SELECT count(*) FROM other", db) == "2"
    assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_\\_tables\\_%'") == "0"
    for args, code, words in [(("--table", "public.child"), 2, "public.child_restored (a table) already exists"),
                              (("--table", "public.missing", "--as-suffix", "_x"), 2, "table public.missing is not in backup")]:
        refused = cli(env, "restore", backup, *args, check=False)
        assert refused.returncode == code and len(refused.stderr.strip().splitlines()) == 1 and words in refused.stderr, refused.stderr
    cluster.psql("TRUNCATE measure", db)
    partitioned = cli(env, "restore", backup, "--table", "public.measure", "--as-suffix", "_back")  # its partitions come along
    assert "as public.measure_back (400 rows)" in partitioned.stdout and _sum(cluster, "measure_back", db) == measure, partitioned.stdout
    assert cluster.psql("SELECT string_agg(c.relname || ':' || (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid), ',' ORDER BY c.relname) "
                        "FROM pg_inherits JOIN pg_class c ON c.oid = inhrelid WHERE inhparent = 'measure_back'::regclass", db) == \
        "measure_2025_back:1,measure_2026_back:1"
    into = cli(env, "restore", backup, "--table", "public.child", "--table", "public.parent", "--target-db", f"{db}_copy")
    assert "created: database" in into.stdout, into.stdout
    assert _sum(cluster, "child", f"{db}_copy") == expected


def test_a_table_comes_back_as_it_was_at_a_time_from_the_bucket_alone_once_the_volume_lost_its_base_backups_and_wal(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path, seaweed: SeaweedServer) -> None:
    from sidecar.config import load_config
    from sidecar.physical.offsite import copy_base, copy_wal

    c = wal_cluster
    prefix = "t-" + uuid.uuid4().hex[:12]
    env = {**pitr_env, **seaweed.environment(prefix)}
    backups = Path(env["BACKUP_DIR"])
    c.psql("CREATE TABLE orders (id serial PRIMARY KEY, amount int NOT NULL); CREATE INDEX orders_amount ON orders (amount)")
    receiver = Receiver(env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(env, "base-backup")
        c.psql("INSERT INTO orders (amount) SELECT g FROM generate_series(1, 1000) g")
        expected = _sum(c, "orders")
        time.sleep(1.1)
        at = datetime.now(UTC)
        time.sleep(1.1)
        c.psql("DELETE FROM orders WHERE amount > 10")  # the mistake
        last = switch(c)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    config, store = load_config(environ=env), seaweed.store(prefix)
    assert copy_base(config, store).ok and copy_wal(config, store).ok  # off-site, as the daemon's copier does
    shutil.rmtree(backups / "base")  # the volume lost its base backups and WAL: only the bucket has them
    shutil.rmtree(backups / "wal")

    restored = cli(env, "restore", "--to-time", at.isoformat(), "--table", "public.orders", "--from-remote")
    assert "into postgres as public.orders_pitr (1000 rows)" in restored.stdout, restored.stdout
    assert _sum(c, "orders_pitr") == expected
    assert c.psql("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY indexrelid::regclass::text) FROM pg_index "
                  "WHERE indrelid = 'orders_pitr'::regclass") == "orders_amount_pitr,orders_pkey_pitr"
    assert c.psql("SELECT count(*) FROM orders") == "10"  # the live table untouched
    assert not (backups / "base").exists() and not (backups / "wal").exists()  # nothing read from (or written back to) the volume
    for args, words in [(("--to-xid", "5", "--from-remote"), "transaction 5 is not in the WAL on the remote"),
                        (("--to-latest", "--database", "postgres"), "leave out --database")]:
        refused = cli(env, "restore", *args, "--table", "public.orders", "--as-suffix", "_x", check=False)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and words in refused.stderr, refused.stderr
