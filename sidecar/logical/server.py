"""A whole server (issue 14): one run = one backup set = one id.

Design
- BACKUP_DATABASES (`backup.databases`) unset: nothing here runs; the backup is the single database of DATABASE_URL,
  with exactly the metadata it always had (logical/backup.py), and existing backups keep working.
- `all` (every database that accepts connections, templates excepted) or a comma list: one backup set. It holds
  * `<id>.globals.sql[.zst|.gz][.age]`: every role (not the `pg_*` ones) with its memberships and settings, from
    `pg_dumpall --roles-only` turned by logical/roles.py into SQL that creates only the missing roles;
  * `<id>.tablespaces.sql[...]` if the server has tablespaces of its own: `pg_dumpall --tablespaces-only`; a restore
    creates the missing ones (never alters one that exists);
  * per database, `<id>.dbNNN.dump[.zst][.age]` (or `.dbNNN.sql.gz` with BACKUP_COMPRESSION=gzip: the spec's layout,
    `gunzip | psql`): NNN is the database's index in the set (1, 2, ...), never its name, so a file name cannot
    collide or lead out of the directory whatever the database is called;
  * one metadata document, written last (nothing is listed before it): `files` has `globals`, `tablespaces` and `dump:NNN` (each
    name, size, sha256), and `databases` lists, per database, its name, its file key, size on disk, owner,
    encoding, locale, properties (logical/dbprops.py: settings, role-in-database settings, grants, comment,
    connection limit), exact row counts (one pass, from pg_dump's own stream) and validation. The top-level
    `database` is null and `size` is the sum of the dumps.
  Each database is dumped in its own snapshot (a server has no snapshot across databases); BACKUP_PARALLEL of them at
  once, each a pg_dump streaming through its own bounded stages (memory: one pipeline's buffers per worker). A
  database that fails fails the whole set: nothing is listed, the error names the database.
- list / verify / retention / off-site copies see one backup (they go over `files`: verify decodes every dump).
- restore ID of a set: roles and tablespaces first (created only where missing), then each database through the single-database
  path (new database, row counts, validation, properties, swap) with its own view of the metadata; one that fails
  is left as it was (the others are restored) and the error names it. `--database NAME` restores one of them.
- Metrics stay per backup (sizes are the totals of `files`): no label per database name.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from sidecar import __version__, postgres
from sidecar.config import ALL_DATABASES, Config
from sidecar.errors import ChecksumMismatch, ConfigError, PartlyFailed, SidecarError, UsageError
from sidecar.logical import dbprops, roles
from sidecar.logical import restore as _restore
from sidecar.logical.backup import Destination, LockWatch, Output, RemoteDestination, VolumeDestination, _dump_globals, dump_database, dump_format
from sidecar.logical.validation import validate
from sidecar.postgres import Child
from sidecar.repository import Entry, Repository, dump_extension, globals_extension, iso_timestamp, new_id
from sidecar.storage.base import StorageError, Store
from sidecar.storage.copy import find_remote
from sidecar.streams import EXTENSIONS, ReadTap, decode, encode

log = logging.getLogger(__name__)

DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"
ROLES = "SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pg\\_%'"
TABLESPACES = "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1"
TABLESPACE_LINE = re.compile(r"^(?:CREATE|ALTER|COMMENT ON|SECURITY LABEL FOR \S+ ON|(?:GRANT|REVOKE) .*? ON) TABLESPACE " + roles.IDENT + r"[ ;]")
MAX_TABLESPACES_SQL = 16 << 20  # pg_dumpall --tablespaces-only of any real server is a few KB; read whole, so it is bounded


def is_set(metadata: dict[str, Any] | None) -> bool:
    return isinstance(metadata, dict) and isinstance(metadata.get("databases"), list)


def file_key(index: int) -> str:
    return f"dump:{index:03d}"


def dump_name(backup_id: str, index: int, config: Config) -> str:
    return f"{backup_id}.db{index:03d}" + dump_extension(dump_format(config), config.compression, config.encryption)


def selected(config: Config, available: list[str]) -> list[str]:
    """The databases of the set: every one that accepts connections (`all`), or the configured list, each of which
    must be one of them (a ConfigError naming the first that is not). Pure."""
    if config.databases == ALL_DATABASES:
        return list(available)
    for name in config.databases:
        if name not in available:
            shown = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "")
            raise ConfigError([f"BACKUP_DATABASES: {name!r} is not a database on the server that accepts connections ({shown}); "
                               "fix the list or set BACKUP_DATABASES=all"])
    return list(config.databases)


def view(metadata: dict[str, Any], name: str) -> dict[str, Any]:
    """One database of a set as a single-database backup's metadata (its dump as `files.dump`, no globals: the
    set's roles are created once, first), for logical/restore.py's path."""
    for item in metadata["databases"]:
        if item["name"] == name:
            database = {k: v for k, v in item.items() if k not in ("name", "file")}
            return {**metadata, **database, "database": name, "files": {"dump": metadata["files"][item["file"]]}}
    names = ", ".join(d["name"] for d in metadata["databases"])
    raise UsageError(f"backup {metadata['id']} has no database {name!r}; it has {names}")


# --- backup ---------------------------------------------------------------------------------------

def create_set(config: Config, label: str | None = None, keep: bool = False, store: Store | None = None) -> dict[str, Any]:
    """Take one backup set of the databases BACKUP_DATABASES names; returns its metadata (listed only when complete)."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    with repo.lock("backup"):
        removed = repo.cleanup()
        if removed:
            log.info("removed leftovers of an interrupted backup: %s", ", ".join(removed))
        return _create_set(config, VolumeDestination(repo) if store is None else RemoteDestination(store), label, keep)


def _create_set(config: Config, destination: Destination, label: str | None, keep: bool) -> dict[str, Any]:
    started = datetime.now(UTC)
    clock = time.monotonic()
    pg_dump = postgres.find_tool("pg_dump", config.pg_bin_dir)
    opened: list[Output] = []  # every file of the set, aborted unless the set is committed
    lock = threading.Lock()

    def open_file(name: str) -> Output:
        out = destination.open(name)
        with lock:
            opened.append(out)
        return out

    try:
        conn = postgres.connect(config)
        try:
            info = postgres.server_info(conn)
            names = selected(config, [row[0] for row in conn.execute(DATABASES)])
            dump_version = postgres.check_dump_version(pg_dump, info["major"])
            backup_id = new_id(started, destination.taken())
            globals_name = backup_id + globals_extension(config.compression, config.encryption)
            globals_file = open_file(globals_name)
            role_passwords = _dump_globals(config, conn, globals_file, wanted={row[0] for row in conn.execute(ROLES)})
            globals_digest = globals_file.close()
            tablespaces = [row[0] for row in conn.execute(TABLESPACES)]
            tablespaces_file: dict[str, Any] | None = None
            if tablespaces:
                name = backup_id + ".tablespaces.sql" + EXTENSIONS[config.compression] + (".age" if config.encryption else "")
                out = open_file(name)
                _dump_tablespaces(config, out)
                tablespaces_file = {"name": name, "checksum": out.close(), "size": out.size}
        finally:
            conn.close()
        log.info("backup set %s: %d databases (%s), %d at a time", backup_id, len(names), ", ".join(names), config.parallel)

        given_up = threading.Event()  # one database failed: the set fails, so the dumps not started yet are not started

        def one(index: int, name: str) -> dict[str, Any] | None:
            if given_up.is_set():
                return None
            file_name = dump_name(backup_id, index, config)
            try:
                return _dump_one(config, name, index, file_name, open_file(file_name))
            except BaseException:
                given_up.set()
                raise

        with ThreadPoolExecutor(max_workers=config.parallel, thread_name_prefix="dump") as pool:
            futures = [(name, pool.submit(one, index, name)) for index, name in enumerate(names, start=1)]
            databases, failed, skipped = [], [], []
            for name, future in futures:
                try:
                    result = future.result()
                except SidecarError as exc:
                    failed.append((name, exc))
                    continue
                if result is None:
                    skipped.append(name)
                else:
                    databases.append(result)
        if failed:
            first, why = failed[0]
            more = f" ({len(failed) - 1} more failed: {', '.join(n for n, _ in failed[1:])})" if len(failed) > 1 else ""
            not_started = f"; not dumped after it: {', '.join(skipped)}" if skipped else ""
            raise SidecarError(f"backup failed: database {first}: {str(why).removeprefix('backup failed: ')}{more}{not_started}; "
                               f"nothing of set {backup_id} is listed")

        files = {"globals": {"name": globals_name, "size": globals_file.size, "checksum": globals_digest}}
        if tablespaces_file:
            files["tablespaces"] = tablespaces_file
        for item in databases:
            files[item["file"]] = item.pop("_file")
        metadata: dict[str, Any] = {
            "id": backup_id,
            "timestamp": iso_timestamp(started),
            "size": sum(item["size"] for item in databases),
            "checksum": None,  # one per file: files.*.checksum
            "compressed": config.compression != "none",
            "encrypted": config.encryption,
            "databaseVersion": info["version"],
            "format": dump_format(config),
            "compression": config.compression,
            "compressionLevel": config.compression_level if config.compression != "none" else None,
            "encryption": "age" if config.encryption else None,
            "recipients": list(config.recipients) if config.encryption else [],
            "database": None,
            "databases": databases,
            "rolePasswords": role_passwords,
            "tablespaces": tablespaces,  # their definitions (owner, location, options, comment): files.tablespaces
            "pgDumpVersion": dump_version,
            "completedAt": iso_timestamp(datetime.now(UTC)),
            "durationSeconds": round(time.monotonic() - clock, 3),
            "rowCounts": {},  # per database: databases[].rowCounts
            "sidecarVersion": __version__,
            "label": label,
            "validation": combined_validation(databases),  # each database's own: databases[].validation
            "keep": keep,
            "parallel": config.parallel,
            "files": files,
        }
        destination.commit(metadata)
        opened.clear()
        log.info("backup set %s complete: %d databases, %d bytes in %.1fs", backup_id, len(databases), metadata["size"], metadata["durationSeconds"],
                 extra={"event": "backup_completed", "backup_id": backup_id, "duration_seconds": metadata["durationSeconds"],
                        "size_bytes": metadata["size"]})
        return metadata
    except psycopg.Error as exc:
        raise SidecarError(f"backup failed: {postgres.describe(exc)}") from None
    finally:
        for leftover in opened:
            leftover.abort()


def combined_validation(databases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The set's validation for `list` and the metrics (one outcome per backup, no label per database): ok when every
    database's is, with every finding (its `database` added). None when validation was off. Pure."""
    checked = [(item["name"], item["validation"]) for item in databases if item.get("validation") is not None]
    if not checked:
        return None
    return {"ok": all(v.get("ok", True) for _, v in checked), "findings": [{**f, "database": name} for name, v in checked for f in v.get("findings") or []],
            "databases": len(checked)}


def _dump_tablespaces(config: Config, out: Output) -> None:
    """`pg_dumpall --tablespaces-only` (owner, location, options, grants, comment) through our stages into `out`."""
    conninfo, env = postgres.child_env(config)
    child = Child([postgres.find_tool("pg_dumpall", config.pg_bin_dir), "--tablespaces-only", "--no-password", f"--dbname={conninfo}"], env)
    assert child.proc.stdout is not None
    try:
        data = child.proc.stdout.read(MAX_TABLESPACES_SQL + 1)
        child.check("pg_dumpall --tablespaces-only")
    finally:
        child.terminate()
    if len(data) > MAX_TABLESPACES_SQL:
        raise SidecarError(f"pg_dumpall --tablespaces-only wrote more than {MAX_TABLESPACES_SQL >> 20} MiB; not a tablespace list")
    encode(io.BytesIO(data), out, config.compression, config.compression_level, config.recipients if config.encryption else None)


def tablespace_statements(dumpall_sql: str, missing: set[str]) -> list[str]:
    """The statements of `pg_dumpall --tablespaces-only` output that concern the tablespaces in `missing`, in order. Pure."""
    return [line for line in dumpall_sql.splitlines() if (match := TABLESPACE_LINE.match(line)) and roles.unquote(match.group(1)) in missing]


def _create_tablespaces(config: Config, files: _restore.Files, metadata: dict[str, Any], identities: Any) -> list[str]:
    """The set's tablespaces that this server lacks, created from their recorded definitions (an existing one is never
    altered). Returns what could not be created (a location directory missing on this machine, say): logged; a
    database that uses such a tablespace then fails its own restore, named."""
    item = metadata["files"].get("tablespaces")
    if not item:
        return []
    sink = io.BytesIO()
    with files.open(item["name"]) as handle:
        source = ReadTap(handle, hashing=True)
        decode(source, sink, metadata["compression"], identities)
    if source.hexdigest() != item["checksum"] or source.size != item["size"]:
        raise ChecksumMismatch(f"{item['name']}: sha256 {source.hexdigest()} does not match the metadata ({item['checksum']}); nothing was changed")
    conn = _restore._admin_connection(config, "")
    problems = []
    try:
        have = {row[0] for row in conn.execute("SELECT spcname FROM pg_tablespace")}
        missing = set(metadata.get("tablespaces") or []) - have
        for statement in tablespace_statements(sink.getvalue().decode(), missing):
            try:
                conn.execute(statement.encode())
            except psycopg.Error as exc:
                problems.append(f"{statement[:80]}: {postgres.describe(exc)}")
                log.warning("tablespace not restored: %s: %s; create it (its directory) on this server and restore the databases that use it again",
                            statement[:120], postgres.describe(exc))
    finally:
        conn.close()
    return problems


def _dump_one(config: Config, name: str, index: int, file_name: str, out: Output) -> dict[str, Any]:
    """One database of the set, in its own snapshot, into `out` (closed here); its entry of `databases`. Its own lock
    watch says in the log when its dump waits for a lock in that database, and who holds it."""
    cfg = config.with_database(name)
    watch = LockWatch(cfg)
    try:
        return _dump_watched(config, cfg, name, index, file_name, out)
    finally:
        watch.stop()


def _dump_watched(config: Config, cfg: Config, name: str, index: int, file_name: str, out: Output) -> dict[str, Any]:
    clock = time.monotonic()
    try:
        checked = validate(cfg) if config.validation_enabled else None
        if checked and not checked.is_valid and config.validation_block_backup:
            raise SidecarError(f"validation found {len(checked.findings)} problems ({checked.errors[0]}); "
                               "fix them or set validation.block_backup_on_failure: false")
        conn = postgres.connect(cfg, autocommit=False)
        try:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            info = postgres.server_info(conn)
            properties = dbprops.read(conn, name)
            size_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            snapshot_row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            assert snapshot_row is not None
            counts = dump_database(cfg, conn, snapshot_row[0], out)
            digest = out.close()
            conn.rollback()
        finally:
            conn.close()
    except psycopg.Error as exc:
        raise SidecarError(postgres.describe(exc)) from None
    key = file_key(index)
    log.info("backup set: %s dumped (%d bytes, %d tables) in %.1fs", name, out.size, len(counts), time.monotonic() - clock)
    return {
        "name": name,
        "file": key,
        "size": out.size,
        "databaseOwner": info["owner"],
        "encoding": info["encoding"],
        "collate": info["collate"],
        "ctype": info["ctype"],
        "databaseProperties": dbprops.seal(properties, config.recipients if config.encryption else ()),
        "databaseSize": int(size_row[0]) if size_row else None,
        "rowCounts": counts,
        "validation": checked.to_json(samples=not config.encryption) if checked else None,
        "durationSeconds": round(time.monotonic() - clock, 3),
        "_file": {"name": file_name, "size": out.size, "checksum": digest},
    }


# --- restore --------------------------------------------------------------------------------------

@dataclass
class SetRestoreReport:
    backup_id: str
    duration_seconds: float
    restored: list[_restore.RestoreReport] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # database -> why; it was left as it was
    ok: bool = True


def restore_set(config: Config, ref: str, database: str | None = None, force: bool = False, store: Store | None = None) -> SetRestoreReport:
    """Restore every database of a set (or `database`), roles first. Each database goes through the single-database
    path into its own name on DATABASE_URL's server; one that fails is left as it was and named in the report."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    with repo.lock("restore"):
        clock = time.monotonic()
        entry: Entry = repo.get(ref) if store is None else find_remote(store, ref)
        files: _restore.Files = _restore._VolumeFiles(repo) if store is None else _restore._RemoteFiles(store)
        if not entry.good or entry.metadata is None:
            raise SidecarError(f"backup {entry.id} cannot be restored: {entry.status}: {entry.problem}")
        metadata = entry.metadata
        if not is_set(metadata):
            raise UsageError(f"backup {entry.id} is of one database ({metadata.get('database')}); leave out --database")
        names = [item["name"] for item in metadata["databases"]]
        if database is not None:
            view(metadata, database)  # refuses a name the set does not have
            names = [database]
        identities = _restore.identities_for(config, metadata)
        problems = _restore.check_files(repo, entry) if store is None else []
        if problems:
            raise ChecksumMismatch(f"restore refused, nothing was changed: {problems[0]}")
        if store is not None:  # roles and the first databases change the server before the last dump is read: check all first
            _restore._check_remote_first(store, metadata)
        try:
            _restore._run_globals(config, files, metadata, admin_db=_admin_db(config), identities=identities)
            _create_tablespaces(config, files, metadata, identities)
        except psycopg.Error as exc:
            raise SidecarError(f"restore failed while creating roles and tablespaces: {postgres.describe(exc)}") from None
        report = SetRestoreReport(entry.id, 0.0)
        for name in names:
            try:
                report.restored.append(_restore.restore_database(config.with_database(name), files, view(metadata, name), entry.id, name,
                                                                 False, force, identities, time.monotonic()))
            except SidecarError as exc:
                report.failed[name] = str(exc)
                log.error("restore of %s: database %s failed and was left as it was: %s", entry.id, name, exc)
        report.ok = not report.failed
        report.duration_seconds = round(time.monotonic() - clock, 3)
        if report.failed:
            done = ", ".join(r.database for r in report.restored) or "none"
            name, why = next(iter(report.failed.items()))
            raise PartlyFailed(f"restore of {entry.id}: {len(report.failed)} of {len(names)} databases failed and were left as they were "
                               f"({name}: {why}); restored: {done}", asdict(report))
        return report


def _admin_db(config: Config) -> str:
    """A database to run the roles' SQL in: `postgres` if there is one, else template1."""
    conn = _restore._admin_connection(config, "")
    try:
        return str(conn.info.dbname)
    finally:
        conn.close()


def drill_set(config: Config, repo: Repository, backup_id: str, store: Store | None, stamp: str) -> tuple[list[str], list[str], list[str]]:
    """A restore drill of every database of a set on `config`'s server (the drill server), each into
    `<name>__drill_<stamp>`, never swapped, dropped after. Called by restore.drill_backup, which holds the lock and
    records the outcome. Returns (findings, findings already present at backup time, the scratch databases);
    a damaged or missing file (of the remote copy too) raises, as for one database."""
    entry = repo.get(backup_id) if store is None else find_remote(store, backup_id)
    if not entry.good or entry.metadata is None:
        raise SidecarError(f"backup {entry.id} cannot be restored: {entry.status}: {entry.problem}")
    metadata = entry.metadata
    files: _restore.Files = _restore._VolumeFiles(repo) if store is None else _restore._RemoteFiles(store)
    identities = _restore.identities_for(config, metadata)
    problems = _restore.check_files(repo, entry) if store is None else []
    if problems:
        raise ChecksumMismatch(f"restore refused, nothing was changed: {problems[0]}")
    if store is not None:  # the roles are created before the dumps are read: check every object first
        _restore._check_remote_first(store, metadata)
    try:
        _restore._run_globals(config, files, metadata, admin_db=_admin_db(config), identities=identities)
        _create_tablespaces(config, files, metadata, identities)
    except psycopg.Error as exc:
        raise SidecarError(f"creating roles and tablespaces: {postgres.describe(exc)}") from None
    findings: list[str] = []
    known: list[str] = []
    scratches: list[str] = []
    for item in metadata["databases"]:
        name = item["name"]
        scratch = f"{name[:_restore.MAX_NAME - 24]}__drill_{stamp}"
        scratches.append(scratch)
        admin = _restore._admin_connection(config, name)
        try:
            _restore._drop_leftovers(admin, name)  # of a drill or restore that was killed
        finally:
            admin.close()
        try:
            report = _restore.restore_database(config, files, view(metadata, name), entry.id, scratch, False, True, identities, time.monotonic())
            findings += [f"{name}: {line}" for line in report.mismatches + report.new_findings]
            known += [f"{name}: {line}" for line in report.preexisting_findings]
        except ChecksumMismatch:
            raise
        except SidecarError as exc:
            if store is not None and isinstance(exc, StorageError):
                raise
            findings.append(f"{name}: {exc}")
        finally:
            admin = _restore._admin_connection(config, scratch)
            try:
                _restore._drop_database(admin, scratch)
            finally:
                admin.close()
    return findings, known, scratches
