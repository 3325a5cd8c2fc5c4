"""The backup flow: snapshot, row counts, pg_dump -> sha256 + compress + encrypt -> commit -> prune."""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from sidecar import __version__, postgres
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.logical import dbprops, dumpcounts, roles
from sidecar.logical.validation import validate
from sidecar.postgres import Child
from sidecar.repository import PARTIAL_SUFFIX, Repository, dump_extension, globals_extension, iso_timestamp, new_id
from sidecar.streams import HashingFile, Progress, ReadTap, encode

log = logging.getLogger(__name__)

TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
   AND n.nspname NOT LIKE 'pg\\_temp%'
   AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY 1, 2
"""


def table_key(schema: str, table: str) -> str:
    return f"{schema}.{table}"


def count_rows(conn: psycopg.Connection[Any], tables: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """Exact row count of every user table (or of `tables`), in the connection's current transaction."""
    from psycopg import sql

    counts = {}
    for schema, table in conn.execute(TABLES).fetchall() if tables is None else tables:
        query = sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        counts[table_key(schema, table)] = int(row[0]) if row else 0
    return counts


LOCK_WAITS = """
SELECT w.pid, left(w.query, 120), extract(epoch FROM now() - w.query_start)::int, b.pid, coalesce(nullif(b.application_name, ''), 'unnamed'),
       coalesce(b.usename, '?'), coalesce(b.state, '?'), extract(epoch FROM now() - coalesce(b.xact_start, b.query_start))::int, left(b.query, 120)
  FROM pg_stat_activity w CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocking(pid) JOIN pg_stat_activity b ON b.pid = blocking.pid
 WHERE w.datname = current_database() AND w.wait_event_type = 'Lock' AND w.application_name = 'pg-backup-sidecar' AND w.pid <> pg_backend_pid()
 ORDER BY 1, 4
"""


class LockWatch:
    """While a backup runs, says in the log when pg_dump (or our row count) waits for a lock and who holds it:
    without it, a backup stuck behind a long transaction or a migration looks like a hang for the 5 minutes of
    --lock-wait-timeout. Checks every `every` seconds on its own connection; a repeat of the same wait is
    logged again only after `repeat` seconds."""

    def __init__(self, config: Config, every: float = 2.0, repeat: float = 30.0) -> None:
        self._stop = threading.Event()
        self._config, self._every, self._repeat = config, every, repeat
        self._thread = threading.Thread(target=self._run, name="lock-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        said: dict[tuple[int, int], float] = {}
        try:
            conn = postgres.connect(self._config)
        except SidecarError:
            return
        try:
            while not self._stop.wait(self._every):
                for waiter, what, waited, holder, app, user, state, held, query in conn.execute(LOCK_WAITS).fetchall():
                    now = time.monotonic()
                    if now - said.get((waiter, holder), -self._repeat) < self._repeat:
                        continue
                    said[(waiter, holder)] = now
                    limit = "; pg_dump gives up after 5 minutes (--lock-wait-timeout)" if what.startswith("LOCK TABLE") else ""
                    log.warning("backup waiting %ds for a lock (%s): held by pid %d, application %r, user %s, %s for %ds (%s)%s", waited, what,
                                holder, app, user, state, held, query, limit,
                                extra={"event": "lock_wait", "blocker": f"{app} ({user}, pid {holder})", "duration_seconds": waited})
        except psycopg.Error:
            pass  # only a diagnosis: the backup itself reports what failed
        finally:
            conn.close()


def dump_format(config: Config) -> str:
    """gzip keeps the spec's `.sql.gz` layout (gunzip | psql); otherwise pg_dump's custom format."""
    return "plain" if config.compression == "gzip" else "custom"


def _write_stream(child: Child, out: HashingFile, config: Config) -> dumpcounts.CountingReader:
    assert child.proc.stdout is not None
    source = dumpcounts.CountingReader(ReadTap(child.proc.stdout, Progress("backup (pg_dump output)")), dumpcounts.row_counter(dump_format(config)))
    encode(source, out, config.compression, config.compression_level, config.recipients if config.encryption else None)
    return source


def _row_counts(conn: psycopg.Connection[Any], tap: dumpcounts.CountingReader) -> dict[str, int]:
    """Exact row counts, keyed and ordered as count_rows has them, read from pg_dump's own output (one pass
    over the data). Tables the dump had no rows for, or every table if its output was not understood, are
    counted with count(*) in the snapshot (`conn` is still in it)."""
    tables = [(schema, table) for schema, table in conn.execute(TABLES).fetchall()]
    try:
        counts, missing = dumpcounts.keyed(tap.result(), tables)
    except dumpcounts.DumpCountError as exc:
        log.warning("row counts: %s; counting every table in the snapshot instead (a second read of the data)", exc)
        return count_rows(conn, tables)
    if not missing:
        return counts
    counted = count_rows(conn, missing)
    return {key: counts[key] if key in counts else counted[key] for key in (table_key(s, t) for s, t in tables)}


ROLE_PASSWORDS_LEFT_OUT = ("role passwords were left out: reading them (pg_authid) needs a superuser; roles restored onto a new server "
                           "from this backup have no password until one is set (ALTER ROLE ... PASSWORD)")


def _dump_globals(config: Config, conn: psycopg.Connection[Any], path: HashingFile) -> bool:
    """The roles the database refers to, into `path`. Returns whether their passwords are included."""
    pg_dumpall = postgres.find_tool("pg_dumpall", config.pg_bin_dir)
    conninfo, env = postgres.child_env(config)
    wanted = roles.referenced_roles(conn)
    text = ""
    for extra in ([], ["--no-role-passwords"]):  # reading passwords needs superuser; fall back without
        child = Child([pg_dumpall, "--roles-only", "--no-password", f"--dbname={conninfo}", *extra], env)
        assert child.proc.stdout is not None
        data = child.proc.stdout.read()
        if child.wait() == 0:
            text = data.decode()
            break
        error = child.stderr_tail()
    else:
        raise SidecarError(f"backup failed: pg_dumpall --roles-only: {error}")
    if extra:
        log.warning(ROLE_PASSWORDS_LEFT_OUT)
    source = io.BytesIO(roles.filter_globals(text, wanted).encode())
    encode(source, path, config.compression, config.compression_level, config.recipients if config.encryption else None)
    return not extra


def create_backup(config: Config, label: str | None = None, keep: bool = False) -> dict[str, Any]:
    """Take one backup; returns its metadata. Nothing is listed unless it is complete."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    with repo.lock("backup"):
        removed = repo.cleanup()
        if removed:
            log.info("removed leftovers of an interrupted backup: %s", ", ".join(removed))
        watch = LockWatch(config)  # validation, the row counts and pg_dump all read every table
        try:
            metadata = _create(config, repo, label, keep)
        finally:
            watch.stop()
    return metadata


def _create(config: Config, repo: Repository, label: str | None, keep: bool) -> dict[str, Any]:
    started = datetime.now(UTC)
    clock = time.monotonic()
    pg_dump = postgres.find_tool("pg_dump", config.pg_bin_dir)
    checked = validate(config) if config.validation_enabled else None
    if checked and not checked.is_valid and config.validation_block_backup:
        raise SidecarError(f"backup refused: validation found {len(checked.findings)} problems ({checked.errors[0]}); "
                           "fix them or set validation.block_backup_on_failure: false")
    conn = postgres.connect(config, autocommit=False)
    files: list[HashingFile] = []
    child: Child | None = None
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        info = postgres.server_info(conn)
        properties = dbprops.read(conn, info["database"])
        size_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        dump_version = postgres.check_dump_version(pg_dump, info["major"])
        snapshot_row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert snapshot_row is not None
        snapshot = snapshot_row[0]

        backup_id = new_id(started, {e.id for e in repo.entries()})
        fmt = dump_format(config)
        encrypted = config.encryption
        dump_name = backup_id + dump_extension(fmt, config.compression, encrypted)
        globals_name = backup_id + globals_extension(config.compression, encrypted)

        globals_file = HashingFile(repo.path(globals_name + PARTIAL_SUFFIX))
        files.append(globals_file)
        role_passwords = _dump_globals(config, conn, globals_file)

        dump_file = HashingFile(repo.path(dump_name + PARTIAL_SUFFIX))
        files.append(dump_file)
        conninfo, env = postgres.child_env(config)
        argv = [pg_dump, f"--dbname={conninfo}", f"--snapshot={snapshot}", "--no-password", "--lock-wait-timeout=5min"]
        argv += ["--format=plain"] if fmt == "plain" else ["--format=custom", "--compress=0"]
        child = Child(argv, env)

        # the exact row counts come from the dump's own COPY data as it streams by (same snapshot, one pass)
        tap = _write_stream(child, dump_file, config)
        child.check("backup")
        counts = _row_counts(conn, tap)
        checksums = {name: f.close() for name, f in (("globals", globals_file), ("dump", dump_file))}
        files.clear()
        conn.rollback()

        metadata: dict[str, Any] = {
            "id": backup_id,
            "timestamp": iso_timestamp(started),
            "size": dump_file.size,
            "checksum": checksums["dump"],
            "compressed": config.compression != "none",
            "encrypted": encrypted,
            "databaseVersion": info["version"],
            "format": fmt,
            "compression": config.compression,
            "compressionLevel": config.compression_level if config.compression != "none" else None,
            "encryption": "age" if encrypted else None,
            "recipients": list(config.recipients) if encrypted else [],
            "database": info["database"],
            "databaseOwner": info["owner"],
            "encoding": info["encoding"],
            "collate": info["collate"],
            "ctype": info["ctype"],
            "databaseProperties": properties,
            "rolePasswords": role_passwords,  # False: the backup user is not a superuser, roles come back without passwords
            "databaseSize": int(size_row[0]) if size_row else None,  # on disk: what a restore needs on the server
            "pgDumpVersion": dump_version,
            "completedAt": iso_timestamp(datetime.now(UTC)),
            "durationSeconds": round(time.monotonic() - clock, 3),
            "rowCounts": counts,
            "sidecarVersion": __version__,
            "label": label,
            "validation": checked.to_json(samples=not encrypted) if checked else None,
            "keep": keep,
            "files": {
                "dump": {"name": dump_name, "size": dump_file.size, "checksum": checksums["dump"]},
                "globals": {"name": globals_name, "size": globals_file.size, "checksum": checksums["globals"]},
            },
        }
        repo.commit(metadata)
        log.info("backup %s complete: %d bytes in %.1fs", backup_id, dump_file.size, metadata["durationSeconds"],
                 extra={"event": "backup_completed", "backup_id": backup_id, "duration_seconds": metadata["durationSeconds"], "size_bytes": dump_file.size})
        return metadata
    except psycopg.Error as exc:
        raise SidecarError(f"backup failed: {postgres.describe(exc)}") from None
    finally:
        if child is not None:
            child.terminate()
        for leftover in files:
            leftover.abort()
        conn.close()
