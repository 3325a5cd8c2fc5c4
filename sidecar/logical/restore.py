"""Verify and restore: checksum first, load into a new database, compare row counts, then swap."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

from sidecar import age, postgres
from sidecar.config import Config
from sidecar.errors import ChecksumMismatch, NotFound, SidecarError, UsageError
from sidecar.logical import dbprops
from sidecar.logical.backup import TABLES, count_rows, table_key
from sidecar.logical.load import ParallelLoad
from sidecar.logical.validation import Finding, ValidationResult, split_known, validate
from sidecar.postgres import Child
from sidecar.repository import Entry, Repository
from sidecar.storage.base import ChunkReader, ObjectMissing, StorageError, Store, sha256_of
from sidecar.storage.copy import add_fact, find_remote, verify_remote
from sidecar.storage.offsite import count_error
from sidecar.streams import CHUNK_SIZE, Progress, ReadTap, decode, file_sha256, open_stored

log = logging.getLogger(__name__)

MAX_NAME = 63
PLAIN_TRAILER = b"PostgreSQL database dump complete"


@dataclass
class VerifyReport:
    backup_id: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def identities_for(config: Config, metadata: dict[str, Any]) -> age.Identities | None:
    if not metadata.get("encrypted"):
        return None
    if not config.identity_file:
        raise SidecarError(
            f"backup {metadata['id']} is encrypted; set BACKUP_ENCRYPTION_IDENTITY_FILE to the age secret key file of one of its recipients"
        )
    return age.parse_identities(config.identity_file)


def check_files(repo: Repository, entry: Entry) -> list[str]:
    """Problems with the stored files of a backup: status, size and sha256 of each file."""
    if not entry.good or entry.metadata is None:
        return [f"{entry.status}: {entry.problem}"]
    problems = []
    for item in entry.metadata["files"].values():
        digest, size = file_sha256(repo.path(item["name"]))
        if digest != item["checksum"]:
            problems.append(f"{item['name']}: sha256 {digest} does not match the recorded checksum {item['checksum']}")
        elif size != item["size"]:
            problems.append(f"{item['name']}: {size} bytes, metadata says {item['size']}")
    return problems


def verify_backup(config: Config, ref: str) -> VerifyReport:
    repo = Repository(config.backup_dir)
    entry = repo.get(ref)
    report = VerifyReport(entry.id, ok=False, problems=check_files(repo, entry))
    if report.problems:
        return report
    assert entry.metadata is not None
    if entry.metadata.get("encrypted") and not config.identity_file:
        report.notes.append("checksums match; contents not decrypted (no BACKUP_ENCRYPTION_IDENTITY_FILE)")
        report.ok = True
        return report
    identities = identities_for(config, entry.metadata)
    for kind, item in entry.metadata["files"].items():
        try:
            _read_to_end(config, repo.path(item["name"]), entry.metadata, kind, identities)
        except SidecarError as exc:
            report.problems.append(f"{item['name']}: {exc}")
    report.ok = not report.problems
    if report.ok:
        report.notes.append("checksums match; every file decodes to its end")
    return report


def _read_to_end(config: Config, path: Path, metadata: dict[str, Any], kind: str, identities: age.Identities | None) -> None:
    checker: Child | None = None
    dump = kind == "dump" or kind.startswith("dump:")  # a whole server's set has one `dump:<n>` per database
    if dump and metadata["format"] == "custom":
        pg_restore = postgres.find_tool("pg_restore", config.pg_bin_dir)
        checker = Child([pg_restore, "--list"], {}, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    sink = _Tail(200, (lambda data: _feed(checker, data)) if checker else None)
    try:
        with open_stored(path) as handle:
            decode(handle, sink, metadata["compression"], identities)
        if checker:
            assert checker.proc.stdin is not None
            checker.proc.stdin.close()
            checker.check("reading the archive's table of contents")
    finally:
        if checker:
            checker.terminate()
    if dump and metadata["format"] == "plain" and PLAIN_TRAILER not in sink.tail:
        raise SidecarError("the SQL dump does not end with pg_dump's completion line: it is truncated")


class _Tail:
    """A writer that passes data on (if `then` is given) and keeps the last `keep` bytes."""

    def __init__(self, keep: int, then: Callable[[bytes], object] | None) -> None:
        self.tail = b""
        self._keep = keep
        self._then = then

    def write(self, data: bytes) -> int:
        self.tail = (self.tail + data[-self._keep:])[-self._keep:]
        if self._then is not None:
            self._then(data)
        return len(data)


def _feed(child: Child, data: bytes) -> Child:
    """Write to a checker that may stop reading early (pg_restore --list reads only the header)."""
    assert child.proc.stdin is not None
    if data and child.proc.poll() is None:
        try:
            child.proc.stdin.write(data)
        except BrokenPipeError:
            pass
    return child


@dataclass
class RestoreReport:
    backup_id: str
    database: str
    previous_database: str | None
    mode: str  # swap | new-database | in-place
    duration_seconds: float
    tables_checked: int
    mismatches: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    new_findings: list[str] = field(default_factory=list)  # not recorded at backup time: they fail a restore
    preexisting_findings: list[str] = field(default_factory=list)  # already in the database when it was backed up
    ended_sessions: list[str] = field(default_factory=list)  # "application (user)" of each session the swap ended
    dropped_previous: list[str] = field(default_factory=list)  # older <db>__pre_restore_* copies dropped by restore.keep_previous_*


class Files(Protocol):
    """Where a backup's files are read from: the volume, or the remote store."""

    def open(self, name: str) -> AbstractContextManager[age.Readable]: ...


class _VolumeFiles:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def open(self, name: str) -> AbstractContextManager[age.Readable]:
        return open_stored(self.repo.path(name))


class _RemoteFiles:
    """Objects streamed from the store, never written to the volume."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def open(self, name: str) -> AbstractContextManager[age.Readable]:
        return closing(ChunkReader(self.store.open_read(name)))


def restore_backup(config: Config, ref: str, target_db: str | None = None, in_place: bool = False, force: bool = False,
                   store: Store | None = None) -> RestoreReport:
    """Restore from the volume, or with `store` straight from the remote store."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    with repo.lock("restore"):
        return _restore(config, repo, ref, target_db, in_place, force, store)


def _restore(config: Config, repo: Repository, ref: str, target_db: str | None, in_place: bool, force: bool,
             store: Store | None = None) -> RestoreReport:
    clock = time.monotonic()
    files: Files
    if store is None:
        entry = repo.get(ref)
        files = _VolumeFiles(repo)
    else:
        entry = find_remote(store, ref)
        files = _RemoteFiles(store)
    if not entry.good or entry.metadata is None:
        raise SidecarError(f"backup {entry.id} cannot be restored: {entry.status}: {entry.problem}")
    metadata = entry.metadata
    identities = identities_for(config, metadata)
    # From the volume every file's sha256 is checked before anything starts; from the remote store in the same single
    # pass that restores it (remote_entries has checked that every object is there with its size): the restore's
    # child commits only once the whole file matched, and the swap comes after that. A backup with roles reads the
    # remote objects twice: the roles commit before the dump is read, so everything is checked first (_check_remote_first).
    problems = check_files(repo, entry) if store is None else []
    if problems:
        raise ChecksumMismatch(f"restore refused, nothing was changed: {problems[0]}")
    if isinstance(metadata.get("databases"), list):
        raise UsageError(f"backup {entry.id} is a whole server's set: restore it with 'restore {entry.id}' (every database) or "
                         f"'restore {entry.id} --database NAME'")
    if store is not None and metadata["files"].get("globals"):
        _check_remote_first(store, metadata)
    return restore_database(config, files, metadata, entry.id, target_db, in_place, force, identities, clock)


def restore_database(config: Config, files: Files, metadata: dict[str, Any], backup_id: str, target_db: str | None, in_place: bool,
                     force: bool, identities: age.Identities | None, clock: float) -> RestoreReport:
    """One database from `metadata` (a single-database backup's, or one database's view of a set: logical/server.py),
    its files already checked: roles from its globals (if it has them), then a new database and the swap."""
    target = config.database_name if target_db is None else target_db  # an empty name is refused below, never the live database
    if not target or len(target.encode()) > MAX_NAME:
        raise UsageError(f"target database name {target!r} is empty or longer than {MAX_NAME} bytes")
    if in_place and metadata["format"] != "custom":
        raise UsageError("--in-place needs a custom-format backup (.dump); restore this plain SQL backup into a new database instead")
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    admin = _admin_connection(config, target)
    try:
        _drop_leftovers(admin, target)
        _run_globals(config, files, metadata, admin_db=admin.info.dbname, identities=identities)
        exists = _database_exists(admin, target)
        if in_place:
            if not exists:
                raise UsageError(f"--in-place: database {target!r} does not exist; leave out --in-place to create it")
            log.warning("in-place restore into %s: objects are dropped and recreated; this is not atomic", target)
            _load(config, files, metadata, target, identities, clean=True)
            mismatches, checked, new, known = _check_restored(config, target, metadata, None)
            return RestoreReport(backup_id, target, None, "in-place", round(time.monotonic() - clock, 3), len(metadata["rowCounts"]), mismatches,
                                 checked.to_json() if checked else None, _lines(new), _lines(known))

        # a new database is loaded under a scratch name too and renamed once whole: a restore killed mid-load
        # leaves a scratch database (dropped by the next restore), never a partly loaded one under the target name
        scratch = f"{target[:MAX_NAME - 24]}__restore_{stamp}"
        _check_space(config, admin, metadata, backup_id)
        _create_database(admin, scratch, metadata)
        where = "the live database was not touched" if exists else f"nothing was created under the name {target}"
        steps = _Steps(clock, "checksums, roles and a new database")
        try:
            try:
                loaded = _load(config, files, metadata, scratch, identities, clean=False)
            except SidecarError as exc:
                raise type(exc)(f"{exc}; {where}") from None
            steps.done("load")
            mismatches, checked, new, known = _check_restored(config, scratch, metadata, loaded, steps)
            # owner, privileges, settings, comment, connection limit: before the swap, so the restored
            # database is never open to a role the live one kept out
            problems = mismatches + _lines(new) + dbprops.apply(admin, scratch, dbprops.unseal(metadata.get("databaseProperties"), identities))
            steps.done("database properties")
            if problems and not force:
                raise SidecarError(f"restore of {backup_id} failed validation ({'; '.join(problems[:3])}); {where} (use --force to accept it)")
        except BaseException:
            _drop_database(admin, scratch)
            raise
        previous = None
        ended: list[str] = []
        dropped: list[str] = []
        if exists:
            previous = _free_previous_name(admin, target, datetime.now(UTC))
            ended = _swap(admin, target, scratch, previous)
            if not config.keep_previous_database:
                _drop_database(admin, previous)
                previous = None
            dropped = _prune_previous(config, admin, target)
        else:
            _rename_new(admin, scratch, target)
        steps.done("swap" if exists else "rename")
        log.info("restore of %s: %s", backup_id, steps)
        log.info("restored %s into %s", backup_id, target, extra={"event": "restore_completed", "backup_id": backup_id,
                                                                "duration_seconds": round(time.monotonic() - clock, 3), "sessions": len(ended)})
        return RestoreReport(backup_id, target, previous, "swap" if exists else "new-database", round(time.monotonic() - clock, 3),
                             len(metadata["rowCounts"]), mismatches, checked.to_json() if checked else None, _lines(new), _lines(known), ended, dropped)
    except psycopg.Error as exc:
        raise SidecarError(f"restore failed: {postgres.describe(exc)}") from None
    finally:
        admin.close()


def _admin_connection(config: Config, target: str) -> psycopg.Connection[Any]:
    """A connection to a database other than the target (for CREATE/RENAME/DROP DATABASE)."""
    last: SidecarError | None = None
    for name in ("postgres", "template1"):
        if name == target:
            continue
        try:
            return postgres.connect(config, dbname=name)
        except SidecarError as exc:
            last = exc
    assert last is not None
    raise last


def _drop_leftovers(conn: psycopg.Connection[Any], target: str) -> None:
    """Scratch databases of a restore or drill that was killed (we hold the volume lock, so none is in use)."""
    prefix = target[:MAX_NAME - 24].replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
    rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s OR datname LIKE %s",
                        (prefix + "\\_\\_restore\\_%", prefix + "\\_\\_drill\\_%")).fetchall()
    for (name,) in rows:
        log.warning("dropping %s, left by an interrupted restore or drill", name)
        _drop_database(conn, name)


def _database_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _create_database(conn: psycopg.Connection[Any], name: str, metadata: dict[str, Any]) -> None:
    owner = metadata.get("databaseOwner")
    has_owner = owner and conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,)).fetchone()
    base = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    if has_owner and owner:
        base += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    if metadata.get("encoding"):
        base += sql.SQL(" ENCODING {}").format(sql.Literal(metadata["encoding"]))
    try:
        conn.execute(base + sql.SQL(" LC_COLLATE {} LC_CTYPE {}").format(sql.Literal(metadata["collate"]), sql.Literal(metadata["ctype"])))
    except psycopg.errors.InvalidParameterValue as exc:
        log.warning("creating %s with the server's default locale: %s", name, postgres.describe(exc))
        conn.execute(base)


PREVIOUS = re.compile(r"__pre_restore_(\d{14})$")


def previous_to_drop(previous: list[tuple[str, datetime]], keep_count: int, keep_days: int, now: datetime) -> list[str]:
    """Which kept previous databases (name, when it was replaced) go: beyond the newest keep_count, or replaced
    more than keep_days ago (0 = no limit of that kind). Pure."""
    ordered = sorted(previous, key=lambda item: item[1], reverse=True)
    cutoff = now - timedelta(days=keep_days)
    return [name for i, (name, at) in enumerate(ordered) if (keep_count and i >= keep_count) or (keep_days and at < cutoff)]


def previous_databases(conn: psycopg.Connection[Any], target: str) -> list[tuple[str, datetime, int]]:
    """The `<target>__pre_restore_<time>` databases kept by earlier restores: (name, replaced at, size in bytes)."""
    prefix = target[:MAX_NAME - 28].replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
    out = []
    for name, size in conn.execute("SELECT datname, pg_database_size(oid) FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                                   (prefix + "\\_\\_pre\\_restore\\_%",)).fetchall():
        match = PREVIOUS.search(name)
        if match:
            out.append((name, datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC), int(size)))
    return out


def _free_previous_name(conn: psycopg.Connection[Any], target: str, now: datetime) -> str:
    """`<target>__pre_restore_<time>`, a second later while that name is taken (two restores in one second)."""
    while _database_exists(conn, name := f"{target[:MAX_NAME - 28]}__pre_restore_{now.strftime('%Y%m%d%H%M%S')}"):
        now += timedelta(seconds=1)
    return name


@dataclass
class PreviousDatabase:
    name: str
    replaced_at: str
    size: int
    action: str  # keep | drop


def manage_previous(config: Config, prune: bool) -> list[PreviousDatabase]:
    """The `<db>__pre_restore_*` copies earlier restores kept, with what restore.keep_previous_* decides for
    each; prune=True drops those it gives up."""
    conn = _admin_connection(config, config.database_name)
    try:
        kept = previous_databases(conn, config.database_name)
        drop = set(previous_to_drop([(n, at) for n, at, _ in kept], config.keep_previous_count, config.keep_previous_days, datetime.now(UTC)))
        if prune:
            for name in sorted(drop):
                log.info("dropping %s: beyond restore.keep_previous_count=%d / keep_previous_days=%d", name, config.keep_previous_count,
                         config.keep_previous_days)
                _drop_database(conn, name)
    except psycopg.Error as exc:
        raise SidecarError(f"cannot list the previous databases: {postgres.describe(exc)}") from None
    finally:
        conn.close()
    return [PreviousDatabase(n, at.isoformat(), size, "drop" if n in drop else "keep") for n, at, size in kept]


def _prune_previous(config: Config, conn: psycopg.Connection[Any], target: str) -> list[str]:
    kept = previous_databases(conn, target)
    drop = previous_to_drop([(name, at) for name, at, _ in kept], config.keep_previous_count, config.keep_previous_days, datetime.now(UTC))
    for name in drop:
        log.info("dropping %s: beyond restore.keep_previous_count=%d / keep_previous_days=%d", name, config.keep_previous_count,
                 config.keep_previous_days)
        _drop_database(conn, name)
    return drop


HEADROOM = 1.2  # the restored copy's indexes are rebuilt, and the load writes WAL


def _data_dir(config: Config, conn: psycopg.Connection[Any]) -> Path | None:
    """A local path on the database server's data file system: postgres.data_dir, or the server's own data
    directory when this process can see it (same machine, or the data volume mounted into the sidecar)."""
    if config.data_dir:
        return config.data_dir
    try:
        row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'data_directory'").fetchone()
    except psycopg.Error:
        return None
    path = Path(row[0]) if row and row[0] else None
    return path if path and path.is_dir() else None


def _check_space(config: Config, conn: psycopg.Connection[Any], metadata: dict[str, Any], backup_id: str) -> None:
    """Refuse, before anything is created, a restore that cannot fit on the database server's disk."""
    size = metadata.get("databaseSize")
    where = _data_dir(config, conn)
    if not size or where is None:
        log.debug("no free-space check before restoring %s (database size %s, data directory %s)", backup_id, size, where)
        return
    try:
        stat = os.statvfs(where)
    except OSError:
        return
    free, needed = stat.f_bavail * stat.f_frsize, int(size * HEADROOM)
    if free < needed:
        raise SidecarError(f"restore of {backup_id} refused, nothing was changed: it needs about {needed >> 20} MiB on the database server "
                           f"(the database was {size >> 20} MiB) but {where} has {free >> 20} MiB free; free space there, drop old "
                           "<db>__pre_restore_* copies, or restore onto another server (drills: DRILL_DATABASE_URL)")


def _drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    try:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        log.error("could not drop %s: %s; drop it by hand", name, postgres.describe(exc))


def _swap(conn: psycopg.Connection[Any], live: str, restored: str, previous: str) -> list[str]:
    """Rename live -> previous and restored -> live in one transaction, after ending sessions on both.
    Returns the sessions it ended ("application (user)" each), which are logged."""
    ended: list[str] = []
    for attempt in range(20):
        rows = conn.execute(
            "SELECT coalesce(nullif(application_name, ''), 'unnamed') || ' (' || coalesce(usename, '?') || ')', pg_terminate_backend(pid)"
            "  FROM pg_stat_activity WHERE datname IN (%s, %s) AND pid <> pg_backend_pid() ORDER BY 1",
            (live, restored),
        ).fetchall()
        if rows:
            ended += [row[0] for row in rows]
            log.warning("ending %d sessions on %s to swap in the restored database: %s", len(rows), live, _summary([row[0] for row in rows]))
        time.sleep(0.1 * (attempt + 1) if attempt else 0.05)
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(live), sql.Identifier(previous)))
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), sql.Identifier(live)))
            return ended
        except psycopg.errors.ObjectInUse:
            continue
    raise SidecarError(f"could not swap in the restored database: sessions keep reconnecting to {live} ({_summary(ended)}); "
                       "stop the application and retry")


def _rename_new(conn: psycopg.Connection[Any], scratch: str, target: str) -> None:
    """The whole, checked new database under its name (it was loaded as `scratch`; a tool that connects to every
    database, e.g. a monitoring agent, may have found it: such sessions are ended, as the swap ends them)."""
    for attempt in range(20):
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (scratch,))
        time.sleep(0.1 * attempt)
        try:
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(scratch), sql.Identifier(target)))
            return
        except psycopg.errors.ObjectInUse:
            continue
        except psycopg.errors.DuplicateDatabase:
            _drop_database(conn, scratch)
            raise SidecarError(f"database {target} was created by someone else during the restore; it was not touched and the "
                               "restored copy was dropped: restore again to swap it in, or choose another --target-db") from None
    raise SidecarError(f"could not rename the restored database {scratch} to {target}: sessions keep connecting to it; it is left "
                       "as it is (the next restore drops it)")


def _summary(sessions: list[str]) -> str:
    """'3 x app (alice), 1 x psql (bob)'"""
    counts: dict[str, int] = {}
    for session in sessions:
        counts[session] = counts.get(session, 0) + 1
    return ", ".join(f"{n} x {name}" for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))) or "none"


def _check_remote_first(store: Store, metadata: dict[str, Any]) -> None:
    """From the remote store, the roles are created (and committed) before the dump is read: so every object's sha256
    is checked first, in a streaming pass of its own (bounded memory; it costs one more read of the dump from the
    store), and a damaged copy is refused before any change, no role created."""
    for item in metadata["files"].values():
        name = item["name"]
        try:
            digest, size = sha256_of(store.open_read(name))
        except ObjectMissing:
            raise ChecksumMismatch(f"{name} is missing from {store.description}; restore refused, nothing was committed") from None
        if digest != item["checksum"] or size != item["size"]:
            raise ChecksumMismatch(f"{name}: sha256 {digest} ({size} bytes) does not match the metadata ({item['checksum']}, "
                                   f"{item['size']} bytes): it changed or is damaged; restore refused before any change, nothing was committed")


def _run_globals(config: Config, files: Files, metadata: dict[str, Any], admin_db: str | None, identities: age.Identities | None) -> None:
    item = metadata["files"].get("globals")
    if not item:
        return
    psql = postgres.find_tool("psql", config.pg_bin_dir)
    conninfo, env = postgres.child_env(config.with_database(admin_db or "postgres"))
    child = Child([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "--no-password", f"--dbname={conninfo}"],
                  env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _pump(child, files, item, metadata["compression"], identities, "creating roles")


def _load(config: Config, files: Files, metadata: dict[str, Any], dbname: str, identities: age.Identities | None,
          clean: bool) -> dict[tuple[str, str], int] | None:
    """Load the backup into `dbname`; the rows the load itself counted into each table (the parallel load of a custom
    archive into a new database: the server's own count of each COPY), or None (the whole-archive pg_restore, psql)."""
    conninfo, env = postgres.child_env(config.with_database(dbname))
    item = metadata["files"]["dump"]
    if metadata["format"] == "custom":
        argv = [postgres.find_tool("pg_restore", config.pg_bin_dir), f"--dbname={conninfo}", "--exit-on-error", "--single-transaction", "--no-password"]
        if clean:
            argv += ["--clean", "--if-exists"]
        else:  # a new (scratch) database: schema, data over several connections, then indexes and constraints in parallel
            return _load_parallel(config, files, metadata, dbname, identities,
                                  lambda: Child(argv, env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL))
    else:
        argv = [postgres.find_tool("psql", config.pg_bin_dir), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "--no-password", f"--dbname={conninfo}"]
    child = Child(argv, env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    trailer = PLAIN_TRAILER if metadata["format"] == "plain" else None
    _pump(child, files, item, metadata["compression"], identities, "restore", trailer)
    return None


def _load_parallel(config: Config, files: Files, metadata: dict[str, Any], dbname: str, identities: age.Identities | None,
                   fallback: Callable[[], Child]) -> dict[tuple[str, str], int] | None:
    """The archive into a scratch database (load.py); the indexes and constraints are built only once the whole
    file decoded and its sha256 matched again; any failure leaves a half-loaded scratch database, which the caller drops."""
    loader = ParallelLoad(config, dbname, config.restore_jobs, fallback)
    try:
        try:
            _stream(files, metadata["files"]["dump"], metadata["compression"], identities, "restore", loader.write)
        except BrokenPipeError:
            pass  # the whole-archive pg_restore stopped reading: its exit status and stderr tell why
        loader.finish()
    except BaseException:
        loader.abort()
        raise
    return loader.row_counts()


def _pump(child: Child, files: Files, item: dict[str, Any], compression: str, identities: age.Identities | None, what: str,
          trailer: bytes | None = None) -> None:
    """Stream a stored file, decoded, into a child's stdin. stdin is closed (so the child commits) only
    after the whole file decoded cleanly and its sha256 matched again; otherwise the child is killed."""
    assert child.proc.stdin is not None
    try:
        _stream(files, item, compression, identities, what, child.proc.stdin.write, trailer)
        child.proc.stdin.close()
    except BrokenPipeError:
        pass  # the child stopped reading: its exit status and stderr tell why
    except BaseException:
        child.terminate(grace=1)
        raise
    child.check(what)


def _stream(files: Files, item: dict[str, Any], compression: str, identities: age.Identities | None, what: str,
            write: Callable[[bytes], object], trailer: bytes | None = None) -> None:
    """Decode a stored file into `write`; raises if it fails to decode, is truncated, or its sha256 or size differ."""
    sink = _Tail(256, write)
    name, checksum = item["name"], item["checksum"]
    with files.open(name) as handle:
        source = ReadTap(handle, Progress(f"{what} ({name})", total=item["size"]), hashing=True)
        try:
            decode(source, sink, compression, identities)
        except ChecksumMismatch:
            raise
        except SidecarError as exc:
            # it stopped decoding (corrupt zstd, a failed age MAC): read the rest of the file, streaming, to tell a damaged
            # file (its sha256 differs: named as such) from anything else; the child never gets its end, so never commits
            while source.read(CHUNK_SIZE):
                pass
            if source.hexdigest() != checksum or source.size != item["size"]:
                raise _damaged(name, source, item, f" ({exc})") from None
            raise SidecarError(f"{name}: {exc}; nothing was committed") from None
    if trailer and trailer not in sink.tail:
        raise SidecarError(f"{name} does not end with pg_dump's completion line: the SQL is truncated; nothing was committed")
    if source.hexdigest() != checksum or source.size != item["size"]:
        raise _damaged(name, source, item)


def _damaged(name: str, source: ReadTap, item: dict[str, Any], why: str = "") -> ChecksumMismatch:
    return ChecksumMismatch(f"{name}: sha256 {source.hexdigest()} ({source.size} bytes) does not match the metadata "
                            f"({item['checksum']}, {item['size']} bytes): it changed or is damaged{why}; nothing was committed")


def _lines(findings: list[Finding]) -> list[str]:
    return [f"{f.check}: {f.message}" for f in findings]


class _Steps:
    """How long each step of a restore took, for one log line."""

    def __init__(self, clock: float, first: str) -> None:
        self._last = time.monotonic()
        self._parts = [(first, self._last - clock)]

    def done(self, step: str) -> None:
        now = time.monotonic()
        self._parts.append((step, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self._parts)


def _check_restored(config: Config, dbname: str, metadata: dict[str, Any], loaded: dict[tuple[str, str], int] | None,
                    steps: _Steps | None = None) -> tuple[list[str], ValidationResult | None, list[Finding], list[Finding]]:
    """Row counts against the metadata (exact: taken in the dump's own snapshot), then the consistency checks,
    split into findings that are new (the round trip damaged something: they fail the restore) and findings
    the validation at backup time recorded already (the database had them: reported, not failed on)."""
    mismatches = [f"row_counts: {m}" for m in _compare_counts(config, dbname, metadata, loaded)]
    if steps:
        steps.done("row counts")
    if not config.validation_enabled:
        return mismatches, None, [], []
    checked = validate(config, dbname=dbname, quiet=True)
    if steps:
        steps.done("validation")
    new, known = split_known(checked.findings, metadata.get("validation"))
    for finding in known:
        log.info("validation: %s: %s (already recorded when the backup was taken; not caused by the restore)", finding.check, finding.message)
    for finding in new:
        log.warning("validation: %s: %s (new: not recorded when the backup was taken)", finding.check, finding.message)
    if new and metadata.get("validation") is None:
        log.warning("backup %s recorded no validation to compare with (validation was off when it was taken): every finding counts as new",
                    metadata["id"])
    return mismatches, checked, new, known


def _compare_counts(config: Config, dbname: str, metadata: dict[str, Any], loaded: dict[tuple[str, str], int] | None) -> list[str]:
    """The restored database's row count of every table against the backup's. A table the load counted (`loaded`: the
    server's own count of the rows each COPY inserted, as exact as count(*) of a database nothing else writes to yet)
    is not scanned again; every other table is counted with count(*): all of them after a whole-archive pg_restore or
    a plain SQL backup, and those whose data the archive did not hold (excluded from the dump, unlogged)."""
    conn = postgres.connect(config, dbname=dbname)
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if loaded is None:
                actual = count_rows(conn)
            else:
                tables = [(schema, table) for schema, table in conn.execute(TABLES).fetchall()]
                actual = count_rows(conn, [t for t in tables if t not in loaded])
                actual.update({table_key(*t): loaded[t] for t in tables if t in loaded})
    finally:
        conn.close()
    expected: dict[str, int] = metadata.get("rowCounts", {})
    return [f"{table}: {actual.get(table, 'missing')} rows, backup had {rows}" for table, rows in sorted(expected.items()) if actual.get(table) != rows]


@dataclass
class DrillReport:
    backup_id: str
    ok: bool
    at: str
    scratch_database: str
    duration_seconds: float
    findings: list[str] = field(default_factory=list)
    preexisting_findings: list[str] = field(default_factory=list)  # recorded at backup time: reported, do not fail the drill
    skipped: str | None = None  # why the contents were not restored (only the checksums were verified)
    source: str = "volume"  # where the backup was read from: the volume, or the remote store's URL (DRILL_FROM_REMOTE)
    recorded: list[str] = field(default_factory=list)  # where the outcome was recorded: the local metadata, the remote fact object


NO_IDENTITY = ("the backup is encrypted and this sidecar has no identity to decrypt it (BACKUP_ENCRYPTION_IDENTITY_FILE unset, as when the "
               "secret key is kept outside the cluster): its checksums were verified, its contents not restored")


def _remote_entry(repo: Repository, store: Store, ref: str) -> Entry:
    """The backup to drill from the remote store; a backup on the volume that is not off-site yet is one line, exit 3."""
    try:
        return find_remote(store, ref)
    except NotFound as exc:
        if ref == "latest":
            raise SidecarError(f"no backup to drill from the remote store: {exc}") from None
        try:
            local = repo.get(ref)
        except (NotFound, OSError):
            raise exc from None
        raise SidecarError(f"backup {local.id} is not off-site yet: it is on the volume but not in {store.description}; copy it first "
                           f"('pg-backup-sidecar copy {local.id}'), or drill it from the volume (without --from-remote / DRILL_FROM_REMOTE)") from None


def drill_backup(config: Config, ref: str, store: Store | None = None) -> DrillReport:
    """Restore a backup into a scratch database on the drill server (DRILL_DATABASE_URL, else the live one), validate
    it and compare row counts, drop the scratch database, and record the outcome in the backup's metadata (`verified`).

    With `store` (DRILL_FROM_REMOTE, --from-remote) the backup is streamed from the remote store instead of the volume,
    each object's sha256 checked in the same pass, which proves the off-site copy restores. The outcome is then also
    recorded on the remote as a new 'verified' fact object (a passed drill adds a 'checked' one), and in the local
    metadata if the backup is on the volume, unless what failed was the remote copy itself (a damaged, missing or
    unreadable object): the volume's copy is not the one that failed, so `restore latest` still trusts it."""
    from sidecar.repository import iso_timestamp

    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    clock = time.monotonic()
    source = "volume" if store is None else store.description
    with repo.lock("drill"):
        entry = repo.get(ref) if store is None else _remote_entry(repo, store, ref)
        if entry.metadata is not None and entry.metadata.get("encrypted") and not config.identity_file:
            remote_failed = False
            if store is None:
                problems = check_files(repo, entry)
            else:
                try:
                    verify_remote(store, entry.metadata)
                    problems = []
                except SidecarError as exc:
                    problems, remote_failed = [str(exc)], True
            at = iso_timestamp(datetime.now(UTC))
            verified = {"at": at, "ok": False if problems else None, "skipped": NO_IDENTITY, "findings": problems}
            recorded = _record_drill(repo, store, entry.id, verified, remote_failed)
            (log.error if problems else log.warning)("restore drill of %s: %s", entry.id, "; ".join(problems) if problems else f"skipped: {NO_IDENTITY}",
                                                     extra={"event": "drill_failed" if problems else "drill_skipped", "backup_id": entry.id})
            return DrillReport(entry.id, not problems, at, "", round(time.monotonic() - clock, 3), problems, skipped=NO_IDENTITY,
                               source=source, recorded=recorded)
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        scratch = f"{config.database_name[:MAX_NAME - 24]}__drill_{stamp}"
        findings: list[str] = []
        known: list[str] = []
        remote_failed = False
        server = config.drill_server()  # a separate server (drill.database_url), or the live database's own
        if not config.drill_database_url:
            log.info("restore drill into %s on the live database's server (set DRILL_DATABASE_URL to drill on another one)", scratch)
        if store is not None:
            log.info("restore drill of %s streamed from the remote store %s", entry.id, store.description)
        admin = _admin_connection(server, config.database_name)
        try:
            _drop_leftovers(admin, config.database_name)
        finally:
            admin.close()
        try:
            if isinstance((entry.metadata or {}).get("databases"), list):  # a whole server's set: every database, each in its scratch
                from sidecar.logical import server as _server

                findings, known, scratches = _server.drill_set(server, repo, entry.id, store, stamp)
                scratch = ", ".join(scratches)
            else:
                report = _restore(server, repo, entry.id, scratch, in_place=False, force=True, store=store)
                findings, known = report.mismatches + report.new_findings, report.preexisting_findings
        except SidecarError as exc:
            findings = [str(exc)]
            # from the remote, a damaged, missing or unreadable object is the off-site copy's failure, not the backup's
            remote_failed = store is not None and isinstance(exc, (ChecksumMismatch, StorageError))
        finally:
            if "," not in scratch:  # a set's drill dropped its own scratch databases
                admin = _admin_connection(server, scratch)
                try:
                    _drop_database(admin, scratch)
                finally:
                    admin.close()
        at = iso_timestamp(datetime.now(UTC))
        verified = {"at": at, "ok": not findings, "findings": findings, "preexisting": known}
        recorded = _record_drill(repo, store, entry.id, verified, remote_failed)
        result = DrillReport(entry.id, not findings, at, scratch, round(time.monotonic() - clock, 3), findings, known, source=source, recorded=recorded)
    already = f" ({len(known)} findings already present when the backup was taken)" if known else ""
    where = "" if store is None else f" (from {store.description})"
    (log.info if result.ok else log.error)("restore drill of %s%s: %s%s", entry.id, where, "passed" if result.ok else "; ".join(findings[:3]), already,
                                           extra={"event": "drill_passed" if result.ok else "drill_failed", "backup_id": entry.id,
                                                  "duration_seconds": result.duration_seconds})
    return result


def _record_drill(repo: Repository, store: Store | None, backup_id: str, verified: dict[str, Any], remote_failed: bool) -> list[str]:
    """Write a drill's outcome where it belongs (see drill_backup); the places it was written to."""
    recorded = []
    if store is not None:
        verified = {**verified, "source": store.description}
        try:
            add_fact(store, backup_id, "verified", verified)
            if verified["ok"] is True:
                add_fact(store, backup_id, "checked", {"at": verified["at"], "by": "drill"})
            recorded.append(f"remote {store.description}")
        except SidecarError as exc:
            log.warning("the drill's outcome for %s could not be recorded on the remote store: %s", backup_id, exc)
    if remote_failed:
        count_error(repo, "drill")  # pg_backup_remote_errors_total{operation="drill"}
        log.warning("the off-site copy of %s failed its drill; the volume's copy (if any) keeps its own drill status", backup_id)
        return recorded
    try:
        fresh = repo.get(backup_id)
    except (NotFound, OSError):
        return recorded  # not on the volume (dropped there, or a server that lost its volume)
    if fresh.metadata is not None:
        repo.write_metadata({**fresh.metadata, "verified": verified})
        recorded.append("volume")
    return recorded
