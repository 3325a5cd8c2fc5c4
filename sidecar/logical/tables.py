"""Restore chosen tables, as they were at a point in time or in a logical backup, beside the live ones.

Both ways first build a *source* database that holds the tables as they were: a scratch PostgreSQL recovered to the
target (point in time), or a scratch database on the live server loaded by pg_restore's own selection from our stored
dump (a backup id). The renames happen there, in a database nobody else uses and that is thrown away: each table gets
the suffix (`orders` -> `orders_pitr`), and so do its indexes (with the constraints they back), its owned sequences and
its extended statistics, the names PostgreSQL keeps unique per schema; foreign keys to tables that are not restored are
dropped there (and named in the report). Then `pg_dump -Fc -t` of the renamed tables streams into `pg_restore
--single-transaction --exit-on-error` on the live server: every table appears with its rows, indexes and constraints in
one commit, or nothing does. Nothing is renamed in the live database, no live object is altered, and a name that is
taken there is refused (one line) before anything is written."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from sidecar import postgres
from sidecar.config import Config
from sidecar.errors import ChecksumMismatch, NotFound, SidecarError, UsageError
from sidecar.physical.find import Table, parse_table
from sidecar.postgres import Child
from sidecar.repository import Entry
from sidecar.storage.base import Store
from sidecar.storage.copy import find_remote

log = logging.getLogger(__name__)

MAX_NAME = 63
PITR_SUFFIX = "_pitr"
BACKUP_SUFFIX = "_restored"

__all__ = ["BACKUP_SUFFIX", "PITR_SUFFIX", "TableRestoreReport", "parse_table", "restore_tables_from_backup", "restore_tables_to_point"]


@dataclass
class TableRestoreReport:
    source: str  # "transaction 745 (just before)" or the backup id
    database: str
    tables: dict[str, str]  # as asked -> as restored
    rows: dict[str, int]  # as restored -> rows (partitions included)
    duration_seconds: float
    left_out: list[str] = field(default_factory=list)  # foreign keys to tables not restored
    created: list[str] = field(default_factory=list)  # the database / schemas created for them


def with_suffix(name: str, suffix: str) -> str:
    """`name` + `suffix` within 63 bytes, cutting `name` (on a character boundary) if needed (pure)."""
    room = MAX_NAME - len(suffix.encode())
    cut = name.encode()[:room].decode(errors="ignore")
    return cut + suffix


def plan(tables: list[Table], suffix: str) -> dict[Table, Table]:
    """What each table is restored as (pure): the same schema, the name with the suffix; a name too long is refused."""
    if len(set(tables)) != len(tables):
        raise UsageError("a table is given twice with --table")
    if len(suffix.encode()) > 30:
        raise UsageError(f"--as-suffix {suffix!r} is longer than 30 bytes")
    out = {}
    for table in tables:
        if len((table.name + suffix).encode()) > MAX_NAME:
            raise UsageError(f"{table} with the suffix {suffix!r} is longer than PostgreSQL's {MAX_NAME} bytes; give a shorter --as-suffix "
                             "or --target-db NAME (the tables keep their names there)")
        out[table] = Table(table.schema, table.name + suffix)
    return out


# --- the destination: checks before anything is written ------------------------------------------


def _taken(conn: psycopg.Connection[Any], names: list[Table]) -> list[str]:
    """Which of `names` a relation (table, index, sequence, view...) or a type already uses in the database."""
    if not names:
        return []
    rows = conn.execute(
        "WITH w(s, r) AS (SELECT * FROM unnest(%s::text[], %s::text[])) "
        "SELECT w.s, w.r, CASE c.relkind WHEN 'r' THEN 'a table' WHEN 'p' THEN 'a table' WHEN 'i' THEN 'an index' WHEN 'I' THEN 'an index' "
        "  WHEN 'S' THEN 'a sequence' WHEN 'v' THEN 'a view' WHEN 'm' THEN 'a materialized view' ELSE 'a relation' END "
        "FROM w JOIN pg_namespace n ON n.nspname = w.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.r "
        "UNION ALL SELECT w.s, w.r, 'a type' FROM w JOIN pg_namespace n ON n.nspname = w.s JOIN pg_type t ON t.typnamespace = n.oid AND t.typname = w.r "
        "  WHERE t.typrelid = 0 "
        "UNION ALL SELECT w.s, w.r, 'extended statistics' FROM w JOIN pg_namespace n ON n.nspname = w.s "
        "  JOIN pg_statistic_ext x ON x.stxnamespace = n.oid AND x.stxname = w.r",
        ([t.schema for t in names], [t.name for t in names])).fetchall()
    return [f"{Table(s, r)} ({what})" for s, r, what in rows]


def _refuse_taken(config: Config, database: str, names: list[Table]) -> bool:
    """Refuse (UsageError, one line) if a name is taken in `database`; False if that database does not exist yet."""
    try:
        conn = postgres.connect(config, dbname=database)
    except SidecarError:
        admin = _admin(config, database)
        try:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                return False
        finally:
            admin.close()
        raise
    try:
        taken = _taken(conn, names)
    finally:
        conn.close()
    if taken:
        raise UsageError(f"{taken[0]} already exists in database {database}" + (f" (and {len(taken) - 1} more)" if len(taken) > 1 else "")
                         + "; give another --as-suffix, or --target-db NAME; nothing was restored")
    return True


def _admin(config: Config, avoid: str) -> psycopg.Connection[Any]:
    for name in ("postgres", "template1"):
        if name != avoid:
            try:
                return postgres.connect(config, dbname=name)
            except SidecarError:
                continue
    return postgres.connect(config)


# --- the source: the tables as they were, renamed there -------------------------------------------


@dataclass
class Prepared:
    relations: list[Table]  # every table to dump (the chosen ones and their partitions / children), as renamed
    names: list[Table]  # every per-schema name the restore creates (tables, indexes, sequences, statistics), as renamed
    restored: dict[Table, Table]  # chosen -> as renamed
    left_out: list[str]


def prepare_source(conn: psycopg.Connection[Any], tables: list[Table], suffix: str, where: str) -> Prepared:
    """In the source database (thrown away afterwards): find the tables, add their partitions / inheritance children,
    drop foreign keys to tables not restored, rename everything per-schema-unique with the suffix. One transaction."""
    renames = plan(tables, suffix) if suffix else {t: t for t in tables}
    with conn.transaction():
        oids: dict[Table, int] = {}
        for table in tables:
            row = conn.execute("SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                               "WHERE n.nspname = %s AND c.relname = %s", (table.schema, table.name)).fetchone()
            if row is None:
                raise NotFound(f"table {table} did not exist {where}; nothing was restored")
            if row[1] not in ("r", "p"):
                raise UsageError(f"{table} is not a table (relkind {row[1]!r}) {where}; --table takes tables")
            oids[table] = int(row[0])
        rows = conn.execute(
            "WITH RECURSIVE tree(oid) AS (SELECT unnest(%s::oid[]) UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid) "
            "SELECT t.oid, n.nspname, c.relname FROM tree t JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "ORDER BY n.nspname, c.relname", (list(oids.values()),)).fetchall()
        everything = {int(oid): Table(s, r) for oid, s, r in rows}
        chosen = {oid: table for table, oid in oids.items()}
        names: list[Table] = []
        relations: list[Table] = []
        for oid, table in everything.items():
            new = renames[chosen[oid]] if oid in chosen else Table(table.schema, with_suffix(table.name, suffix))
            if new != table:
                conn.execute(sql.SQL("ALTER TABLE {}.{} RENAME TO {}").format(sql.Identifier(table.schema), sql.Identifier(table.name),
                                                                              sql.Identifier(new.name)))
            relations.append(new)
            names.append(new)
        for kind, query in (("INDEX", "SELECT c.oid, n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                      "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.indrelid = ANY(%s::oid[])"),
                            ("SEQUENCE", "SELECT c.oid, n.nspname, c.relname FROM pg_depend d JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S' "
                                         "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE d.classid = 'pg_class'::regclass "
                                         "AND d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY(%s::oid[]) AND d.deptype IN ('a', 'i')"),
                            ("STATISTICS", "SELECT x.oid, n.nspname, x.stxname FROM pg_statistic_ext x JOIN pg_namespace n ON n.oid = x.stxnamespace "
                                           "WHERE x.stxrelid = ANY(%s::oid[])")):
            for _oid, schema, name in conn.execute(query, (list(everything),)).fetchall():
                new = Table(schema, with_suffix(name, suffix))
                if suffix:
                    conn.execute(sql.SQL("ALTER {} {}.{} RENAME TO {}").format(sql.SQL(kind), sql.Identifier(schema), sql.Identifier(name),
                                                                               sql.Identifier(new.name)))
                names.append(new)
        left_out = []
        for name, owner, other in conn.execute(
                "SELECT conname, conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint "
                "WHERE contype = 'f' AND conparentid = 0 AND conrelid = ANY(%s::oid[]) AND NOT confrelid = ANY(%s::oid[]) ORDER BY 2, 1",
                (list(everything), list(everything))).fetchall():
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(owner), sql.Identifier(name)))
            left_out.append(f"foreign key {name} of {owner} to {other} (not restored)")
    return Prepared(relations, names, {t: renames[t] for t in tables}, left_out)


# --- source -> destination ----------------------------------------------------------------------------


def _pattern(table: Table) -> str:
    """pg_dump's -t pattern for exactly this table (in double quotes, * ? . and $ are taken literally)."""
    return '"' + table.schema.replace('"', '""') + '"."' + table.name.replace('"', '""') + '"'


def copy_tables(config: Config, source_conninfo: str, source_env: dict[str, str], prepared: Prepared, database: str, created_db: bool) -> list[str]:
    """Stream pg_dump of the prepared tables into pg_restore --single-transaction on `database`. Schemas it lacks are
    created first, and dropped again (with the database, if it was created) when the load fails. What was created."""
    created = [f"database {database}"] if created_db else []
    conn = postgres.connect(config, dbname=database)
    made: list[str] = []
    try:
        for schema in sorted({t.schema for t in prepared.relations}):
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                made.append(schema)
        pg_dump = postgres.find_tool("pg_dump", config.pg_bin_dir)
        pg_restore = postgres.find_tool("pg_restore", config.pg_bin_dir)
        argv = [pg_dump, "-Fc", "--no-password", "--strict-names", f"--dbname={source_conninfo}"]
        for table in prepared.relations:
            argv += ["-t", _pattern(table)]
        conninfo, env = postgres.child_env(config.with_database(database))
        dump = Child(argv, source_env)
        try:
            assert dump.proc.stdout is not None
            load = Child([pg_restore, "--single-transaction", "--exit-on-error", "--no-password", f"--dbname={conninfo}"], env,
                         stdin=dump.proc.stdout, stdout=subprocess.DEVNULL)
            dump.proc.stdout.close()  # pg_restore holds it now: pg_dump sees a closed pipe if pg_restore dies
            try:
                load.check("loading the tables")
            finally:
                load.terminate()
            dump.check("dumping the tables")
        finally:
            dump.terminate()
    except BaseException:
        for schema in made:
            try:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} RESTRICT").format(sql.Identifier(schema)))
            except psycopg.Error as exc:
                log.warning("schema %s, created for the restore, not dropped: %s", schema, postgres.describe(exc))
        raise
    finally:
        conn.close()
    return created + [f"schema {s} in {database}" for s in made]


def count_rows(conn: psycopg.Connection[Any], tables: list[Table]) -> dict[Table, int]:
    out = {}
    with conn:
        for t in tables:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(t.schema), sql.Identifier(t.name))).fetchone()
            out[t] = int(row[0]) if row else 0
    return out


def _destination(config: Config, target_db: str | None, suffix: str | None, default_suffix: str) -> tuple[str, str]:
    database = target_db or config.database_name
    if target_db is not None and (not target_db or len(target_db.encode()) > MAX_NAME):
        raise UsageError(f"target database name {target_db!r} is empty or longer than {MAX_NAME} bytes")
    if suffix is None:
        suffix = default_suffix if database == config.database_name else ""
    elif not suffix and database == config.database_name:
        raise UsageError("--as-suffix is empty: the tables would take their live names; give a suffix, or --target-db NAME")
    return database, suffix


def _create_database(config: Config, database: str) -> None:
    admin = _admin(config, database)
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    except psycopg.Error as exc:
        raise SidecarError(f"cannot create database {database}: {postgres.describe(exc)}") from None
    finally:
        admin.close()


def _drop_database(config: Config, database: str) -> None:
    admin = _admin(config, database)
    try:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    except psycopg.Error as exc:
        log.error("could not drop %s: %s; drop it by hand", database, postgres.describe(exc))
    finally:
        admin.close()


def _transplant(config: Config, source: str, source_env: dict[str, str], connect: Callable[[], psycopg.Connection[Any]], tables: list[Table],
                suffix: str, database: str, where: str) -> tuple[Prepared, dict[Table, int], list[str]]:
    """Prepare the source (`source`: a conninfo without secrets, for pg_dump with `source_env`; `connect`: a connection to
    it), check every name in the destination, copy, compare row counts."""
    with connect() as conn:
        conn.autocommit = True
        prepared = prepare_source(conn, tables, suffix, where)
    exists = _refuse_taken(config, database, prepared.names)
    if not exists:
        _create_database(config, database)
    try:
        created = copy_tables(config, source, source_env, prepared, database, not exists)
    except BaseException:
        if not exists:
            _drop_database(config, database)
        raise
    before = count_rows(connect(), list(prepared.restored.values()))
    after = count_rows(postgres.connect(config, dbname=database), list(prepared.restored.values()))
    wrong = [f"{t}: {after[t]} rows, the source had {before[t]}" for t in before if after[t] != before[t]]
    if wrong:
        raise SidecarError(f"the restored tables do not have the source's rows ({'; '.join(wrong)}); they are left in {database} to look at")
    return prepared, after, created


def _report(source: str, database: str, prepared: Prepared, rows: dict[Table, int], created: list[str], clock: float) -> TableRestoreReport:
    return TableRestoreReport(source, database, {str(a): str(b) for a, b in prepared.restored.items()}, {str(t): n for t, n in rows.items()},
                              round(time.monotonic() - clock, 3), prepared.left_out, created)


# --- point in time ---------------------------------------------------------------------------------------


def restore_tables_to_point(config: Config, target: Any, table_texts: list[str], suffix: str | None = None,
                            target_db: str | None = None, from_remote: bool = False) -> TableRestoreReport:
    """The tables as they were at `target` (a pitr.Target), through a scratch PostgreSQL recovered to it (from the base
    backups and WAL on the volume, or with `from_remote` from the bucket alone: physical/offsite.restore_from_remote),
    into the live database under new names (or into `target_db` under their own)."""
    from sidecar.physical.pitr import ScratchServer, restore_to_data_dir, scratch_directory

    clock = time.monotonic()
    tables = [parse_table(t) for t in table_texts]
    database, suffix = _destination(config, target_db, suffix, PITR_SUFFIX)
    renames = plan(tables, suffix) if suffix else {t: t for t in tables}
    _refuse_taken(config, database, list(renames.values()))  # the tables' own names, before the long part
    root = scratch_directory()
    try:
        if from_remote:
            from sidecar.physical.offsite import restore_from_remote

            result = restore_from_remote(config, target, root / "data")
        else:
            result = restore_to_data_dir(config, target, root / "data")
        server = ScratchServer(config, root, result.get("serverMajor"))
        source = server.start_promoted(config, target.describe())
        try:
            log.info("scratch server recovered to %s; copying %s from it", result["target"], ", ".join(str(t) for t in tables))
            prepared, rows, created = _transplant(config, source, postgres.base_env(), lambda: psycopg.connect(source, autocommit=True), tables,
                                                  suffix, database, f"at {target.describe()}")
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log.info("restored %s as of %s into %s", ", ".join(str(t) for t in tables), target.describe(), database,
             extra={"event": "table_restore_completed"})
    return _report(target.describe(), database, prepared, rows, created, clock)


# --- a logical backup ------------------------------------------------------------------------------------

TOC_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")
# what a scratch copy of the backup leaves out: it runs nothing (event triggers, subscriptions), publishes nothing
# and needs no large objects or materialized view contents
LEFT_OUT = ("EVENT TRIGGER ", "PUBLICATION", "SUBSCRIPTION", "BLOB", "LARGE OBJECT", "MATERIALIZED VIEW DATA ", "FK CONSTRAINT ")


def toc_entries(lines: list[str]) -> list[tuple[str, str]]:
    """(line, what) of each entry of `pg_restore --list` (pure): `what` is the text after the dump id and catalog ids,
    e.g. `TABLE DATA public orders app`."""
    out = []
    for line in lines:
        match = TOC_LINE.match(line.rstrip("\n"))
        if match and not line.startswith(";"):
            out.append((line.rstrip("\n"), match.group(4)))
    return out


def _of(what: str, kind: str, table: Table) -> bool:
    return what.startswith(f"{kind} {table.schema} {table.name} ")


def select_entries(entries: list[tuple[str, str]], tables: list[Table], part: str) -> list[str]:
    """The list-file lines of one part of a table restore (pure): `schema` every definition the scratch copy needs
    (pre-data, left-out kinds excepted); `data` the chosen tables' rows and every sequence's value; `post` indexes,
    constraints, triggers...; `fk` the chosen tables' foreign keys."""
    if part == "data":
        return [line for line, what in entries if what.startswith("SEQUENCE SET ") or any(_of(what, "TABLE DATA", t) for t in tables)]
    if part == "fk":
        return [line for line, what in entries if any(_of(what, "FK CONSTRAINT", t) for t in tables)]
    return [line for line, what in entries if not what.startswith(LEFT_OUT)]


def restore_tables_from_backup(config: Config, ref: str, table_texts: list[str], suffix: str | None = None,
                               target_db: str | None = None, database: str | None = None, store: Store | None = None) -> TableRestoreReport:
    """The tables of a logical backup (custom format), through a scratch database on the live server loaded with
    pg_restore's own selection (the stored dump streamed through our decode stages, sha256 checked first), into the
    live database under new names (or into `target_db` under their own). With `store` the backup is read from the
    remote store (each object's sha256 checked in a pass of its own before anything is created), never the volume. Of a
    whole server's set, `database` names the database whose tables these are: they go back into it (on DATABASE_URL's
    server)."""
    from sidecar.logical import restore as _restore
    from sidecar.repository import Repository

    clock = time.monotonic()
    tables = [parse_table(t) for t in table_texts]
    of_set = database  # the set's database whose tables these are (the destination is worked out below)
    if of_set is not None:
        config = config.with_database(of_set)
    database, suffix = _destination(config, target_db, suffix, BACKUP_SUFFIX)
    renames = plan(tables, suffix) if suffix else {t: t for t in tables}
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    with repo.lock("restore"):
        entry = repo.get(ref) if store is None else find_remote(store, ref)
        if not entry.good or entry.metadata is None:
            raise SidecarError(f"backup {entry.id} cannot be restored: {entry.status}: {entry.problem}")
        metadata = one_database(entry.id, entry.metadata, of_set)
        if metadata["format"] != "custom":
            raise UsageError(f"backup {entry.id} is plain SQL (.sql.gz): --table needs pg_restore's selection, i.e. a custom-format backup (.dump)")
        if store is None:
            problems = _restore.check_files(repo, Entry(entry.id, metadata, entry.status, entry.problem))
            if problems:
                raise ChecksumMismatch(f"restore refused, nothing was changed: {problems[0]}")
        else:  # roles and the scratch database are created before the dump is read to its end: every object checked first
            _restore._check_remote_first(store, metadata)
        identities = _restore.identities_for(config, metadata)
        files: _restore.Files = _restore._VolumeFiles(repo) if store is None else _restore._RemoteFiles(store)
        _refuse_taken(config, database, list(renames.values()))
        with tempfile.TemporaryDirectory(prefix="pg-backup-sidecar-tables-") as scratch_dir:
            entries = toc_entries(_pg_restore(config, files, metadata, identities, Path(scratch_dir), ["--list"], "reading the table of contents"))
            missing = [t for t in tables if not any(_of(what, "TABLE", t) for _line, what in entries)]
            if missing:
                raise NotFound(f"table {missing[0]} is not in backup {entry.id}; 'pg_restore --list' of it names its tables")
            stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
            scratch = f"{config.database_name[:MAX_NAME - 23]}__tables_{stamp}"
            admin = _restore._admin_connection(config, scratch)
            try:
                _drop_leftovers(admin, config.database_name)
                _restore._run_globals(config, files, metadata, admin_db=admin.info.dbname, identities=identities)
                _restore._create_database(admin, scratch, metadata)
            finally:
                admin.close()
            try:
                failed = _load_scratch(config, files, metadata, identities, Path(scratch_dir), scratch, tables, entries)
                source, env = postgres.child_env(config.with_database(scratch))
                prepared, rows, created = _transplant(config, source, env, lambda: postgres.connect(config, dbname=scratch), tables, suffix,
                                                      database, f"in backup {entry.id}")
                prepared.left_out += [f"foreign key {name} of {prepared.restored.get(t) or Table(t.schema, with_suffix(t.name, suffix))} "
                                      "(to a table not restored)" for t, name in failed]
            finally:
                _drop_database(config, scratch)
    log.info("restored %s from %s into %s", ", ".join(str(t) for t in tables), entry.id, database, extra={"event": "table_restore_completed"})
    return _report(entry.id, database, prepared, rows, created, clock)


def one_database(backup_id: str, metadata: dict[str, Any], database: str | None) -> dict[str, Any]:
    """The metadata to restore tables from (pure): a single database's backup as it is; of a whole server's set, the
    view of `database` (its dump, and the set's roles so that owners and grants restore), which must be given."""
    from sidecar.logical import server as _server

    if not _server.is_set(metadata):
        if database is not None:
            raise UsageError(f"backup {backup_id} is of one database ({metadata.get('database')}); leave out --database")
        return metadata
    if database is None:
        names = ", ".join(str(d["name"]) for d in metadata["databases"])
        raise UsageError(f"backup {backup_id} is a whole server's set ({names}): give --database NAME, the database whose tables to restore")
    one = _server.view(metadata, database)  # refuses a name the set does not have, naming the ones it has
    files = {"dump": one["files"]["dump"]}
    if metadata["files"].get("globals"):
        files["globals"] = metadata["files"]["globals"]
    return {**one, "files": files}


def _drop_leftovers(admin: psycopg.Connection[Any], database: str) -> None:
    """Scratch databases of a table restore that was killed (we hold the volume lock, so none is in use)."""
    prefix = database[:MAX_NAME - 23].replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
    for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "\\_\\_tables\\_%",)).fetchall():
        log.warning("dropping %s, left by an interrupted table restore", name)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _load_scratch(config: Config, files: Any, metadata: dict[str, Any], identities: Any, workdir: Path, scratch: str,
                  tables: list[Table], everything: list[tuple[str, str]]) -> list[tuple[Table, str]]:
    """The scratch database: every definition, the chosen tables' rows (and their partitions'), then indexes and
    constraints, then the chosen tables' foreign keys where they hold (one to a table not restored fails there: its
    rows have nothing to point to)."""
    conninfo, _env = postgres.child_env(config.with_database(scratch))
    into = ["--exit-on-error", "--single-transaction", f"--dbname={conninfo}"]
    pre = toc_entries(_pg_restore(config, files, metadata, identities, workdir, ["--list", "--section=pre-data"], "listing definitions"))
    _pg_restore(config, files, metadata, identities, workdir, into, "restoring definitions", select_entries(pre, tables, "schema"))
    with postgres.connect(config, dbname=scratch) as conn:
        rows = conn.execute(
            "WITH RECURSIVE tree(oid) AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "  WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
            "  UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid) "
            "SELECT n.nspname, c.relname FROM tree t JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace",
            ([t.schema for t in tables], [t.name for t in tables])).fetchall()
    family = [Table(s, r) for s, r in rows]
    _pg_restore(config, files, metadata, identities, workdir, into, "restoring the tables' rows", select_entries(everything, family, "data"))
    post = toc_entries(_pg_restore(config, files, metadata, identities, workdir, ["--list", "--section=post-data"], "listing indexes"))
    _pg_restore(config, files, metadata, identities, workdir, into, "restoring indexes and constraints", select_entries(post, family, "schema"))
    foreign = select_entries(everything, family, "fk")
    if foreign:
        try:  # each on its own: one that points to a table not restored fails, the others stay
            _pg_restore(config, files, metadata, identities, workdir, [f"--dbname={conninfo}"], "foreign keys", foreign)
        except ChecksumMismatch:
            raise
        except SidecarError as exc:
            log.info("foreign keys of the chosen tables to tables not restored are left out (%s)", str(exc)[:200])
    wanted = [(t, what[len(f"FK CONSTRAINT {t.schema} {t.name} "):].rsplit(" ", 1)[0]) for _line, what in toc_entries(foreign)
              for t in family if _of(what, "FK CONSTRAINT", t)]
    with postgres.connect(config, dbname=scratch) as conn:
        there = {(s, r, n) for s, r, n in conn.execute(
            "SELECT n.nspname, c.relname, k.conname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f'").fetchall()}
    return [(t, name) for t, name in wanted if (t.schema, t.name, name) not in there]


def _pg_restore(config: Config, files: Any, metadata: dict[str, Any], identities: Any, workdir: Path, args: list[str], what: str,
                selection: list[str] | None = None) -> list[str]:
    """pg_restore ARGS [-L selection] fed the stored dump (decoded, streaming); its output lines (for --list)."""
    from sidecar.logical import restore as _restore

    argv = [postgres.find_tool("pg_restore", config.pg_bin_dir), "--no-password", *args]
    if selection is not None:
        listing = workdir / "selection.list"
        listing.write_text("".join(line + "\n" for line in selection))
        argv += ["-L", str(listing)]
    _conninfo, env = postgres.child_env(config)
    with tempfile.TemporaryFile(dir=workdir) as out:
        child = Child(argv, env, stdin=subprocess.PIPE, stdout=out)
        _restore._pump(child, files, metadata["files"]["dump"], metadata["compression"], identities, what)
        out.seek(0)
        return out.read().decode(errors="replace").splitlines()
