"""The backup flow: snapshot, row counts, pg_dump -> sha256 + compress + encrypt -> commit -> prune.

With a volume the files are written as `.partial` and committed by rename; without one (BACKUP_VOLUME=false) they
stream straight to the remote store (multipart, bounded memory): data objects first, the metadata object last, so
a remote backup is listed only once complete, and an interrupted upload is aborted, never listed."""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from sidecar import __version__, postgres
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.logical import dbprops, dumpcounts, roles
from sidecar.logical.validation import validate
from sidecar.postgres import Child
from sidecar.repository import METADATA_SUFFIX, PARTIAL_SUFFIX, Repository, dump_extension, globals_extension, iso_timestamp, new_id
from sidecar.storage.base import PutResult, StorageError, Store
from sidecar.storage.copy import Uploaded, metadata_bytes
from sidecar.streams import HashingFile, Prefetch, Progress, ReadTap, encode, remove_quietly

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


class Output(Protocol):
    """Where one file of a backup is written: a `.partial` file on the volume, or an upload to the remote store."""

    size: int

    def write(self, data: bytes) -> int: ...

    def close(self) -> str: ...  # the sha256; the file is complete (not yet listed: the metadata comes last)

    def abort(self) -> None: ...


class _Aborted(Exception):
    """Raised inside an upload's source when the backup stops: obstore then aborts the multipart upload."""


class RemoteUpload:
    """A writer whose bytes stream to `store.put_stream(name, ...)` in a thread, through a small bounded queue:
    memory is the queue (QUEUE chunks) plus the store's multipart buffers. `close` waits for the upload and returns
    its sha256 (hashed once, by the store as it reads the chunks); `abort` makes the source raise, so the store aborts
    the upload and nothing is left.

    `budget`: how many more seconds the writer may wait for the store now (None: as long as it takes); a write or
    close that would wait longer raises StorageError. `blocked` is the time writes have waited so far."""

    QUEUE = 2  # chunks of 1 MiB: the tee adds only these on top of the store's part buffers

    def __init__(self, store: Store, name: str, budget: Callable[[], float] | None = None) -> None:
        self.store, self.name = store, name
        self.budget = budget
        self.size = 0
        self.blocked = 0.0
        self.began = time.monotonic()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self.QUEUE)
        self._stop = threading.Event()
        self._result: PutResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"upload {name}", daemon=True)
        self._thread.start()

    def _source(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                item = b""
            if self._stop.is_set():
                raise _Aborted(f"the backup stopped; the upload of {self.name} is aborted")
            if item is None:
                return
            if item:
                yield item

    def _run(self) -> None:
        try:
            self._result = self.store.put_stream(self.name, self._source())
        except BaseException as exc:  # handed to the writer's thread
            self._error = exc

    def _send(self, item: bytes | None) -> None:
        began = time.monotonic()
        allowed = None if self.budget is None else max(self.budget(), 0.0)
        try:
            while True:
                if not self._thread.is_alive():
                    raise self._failure()
                try:
                    self._queue.put(item, timeout=0.2)
                    return
                except queue.Full:
                    waited = time.monotonic() - began
                    if allowed is not None and waited >= allowed:
                        raise StorageError(f"the upload of {self.name} to {self.store.description} is slower than the backup: it waited "
                                           f"{self.blocked + waited:.1f}s for the store in {time.monotonic() - self.began:.0f}s{self._retrying()}") from None
        finally:
            self.blocked += time.monotonic() - began

    def _retrying(self) -> str:
        """What the store's retries met last (e.g. the endpoint cannot be reached), for the line that gives up on it."""
        last = getattr(self.store, "last_error", None)
        return f"; it was retrying after: {last}" if last else ""

    def _failure(self) -> BaseException:
        if isinstance(self._error, StorageError):
            return self._error
        return StorageError(f"upload of {self.name} to {self.store.description} failed: {self._error or 'it stopped'}")

    def write(self, data: bytes) -> int:
        if not data:
            return 0
        chunk = bytes(data)
        self.size += len(chunk)
        self._send(chunk)
        return len(chunk)

    def close(self) -> str:
        self._send(None)
        allowed = None if self.budget is None else max(self.budget(), 0.0)
        self._thread.join(allowed)
        if self._thread.is_alive():
            raise StorageError(f"the upload of {self.name} to {self.store.description} did not complete within {allowed:.1f}s of its end{self._retrying()}")
        if self._error is not None or self._result is None:
            raise self._failure()
        if self._result.size != self.size:
            raise StorageError(f"upload of {self.name} to {self.store.description}: the store holds {self._result.size} bytes, {self.size} were sent")
        return self._result.sha256

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def abandon(self) -> None:
        """Stop without waiting for the store (it may be hanging): the upload is aborted when it next reads, or left
        incomplete (never listed) if the process ends first."""
        self._stop.set()

    def abort(self) -> None:
        """Stop: an upload in progress is aborted by the store; one already complete is deleted (its backup never will be)."""
        self._stop.set()
        self._thread.join(timeout=60)
        if self._result is not None:
            try:
                self.store.delete(self.name)
            except StorageError as exc:
                log.warning("could not delete %s of a failed backup (%s); the next prune removes it", self.name, exc)


class TeeOutput:
    """A `.partial` file on the volume that also streams, as it is written, to the remote store through a RemoteUpload
    (same bounded memory). The volume is what matters: a remote that fails, or is slower than the backup (the writes
    waited for it more than TEE_GRACE seconds plus TEE_SHARE of the time so far: the tee never slows the local backup
    by more than that), is abandoned (its upload aborted, one warning) and the file is still written whole; `uploaded`
    then stays None and the copy after the commit sends it (the backup stays pending if that fails too)."""

    def __init__(self, local: HashingFile, remote: RemoteUpload) -> None:
        self.local, self.remote = local, remote
        self.failure: StorageError | None = None
        self.uploaded: Uploaded | None = None
        self._closed = False
        self.size = 0

    def _abandon(self, exc: StorageError) -> None:
        self.failure = exc
        log.warning("the upload of %s while it is written was abandoned (%s); the backup goes on, on the volume", self.remote.name, exc)
        self.remote.abandon()

    def write(self, data: bytes) -> int:
        written = self.local.write(data)
        self.size = self.local.size
        if self.failure is None:
            try:
                self.remote.write(data)
            except StorageError as exc:
                self._abandon(exc)
        return written

    def close(self) -> str:
        digest = self.local.close()
        self._closed = True
        if self.failure is None:
            try:
                sent = self.remote.close()
                if sent != digest:  # one hash each side: the file's, and the store's of what it read
                    raise StorageError(f"the store read {self.remote.name} with sha256 {sent}, the file written has {digest}")
            except StorageError as exc:
                self._abandon(exc)
                if self.remote.finished:
                    self.remote.abort()  # a complete object of the wrong content is deleted: the copy after the commit sends it again
            else:
                self.uploaded = Uploaded(sent, self.remote.size, round(time.monotonic() - self.remote.began, 3))
        return digest

    def abort(self) -> None:
        try:
            if self.failure is None:
                self.remote.abort()  # an upload complete already is deleted: its backup never will be
            else:
                self.remote.abandon()
        finally:
            if self._closed:
                remove_quietly(self.local.path)
            else:
                self.local.abort()


class Destination(Protocol):
    description: str

    def taken(self) -> set[str]: ...

    def open(self, name: str) -> Output: ...

    def commit(self, metadata: dict[str, Any]) -> None: ...


class VolumeDestination:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.description = str(repo.dir)

    def taken(self) -> set[str]:
        return {e.id for e in self.repo.entries()}

    def open(self, name: str) -> Output:
        return HashingFile(self.repo.path(name + PARTIAL_SUFFIX))

    def commit(self, metadata: dict[str, Any]) -> None:
        self.repo.commit(metadata)


class TeeDestination(VolumeDestination):
    """The volume, and each file streamed to `store` while it is written (TeeOutput). After the local commit, `uploaded`
    holds the objects that reached the store whole (name -> what was sent): copy_backup accepts them without sending
    them again and writes the metadata object last."""

    def __init__(self, repo: Repository, store: Store, grace: float | None = None, share: float | None = None) -> None:
        super().__init__(repo)
        self.store = store
        self.grace = TEE_GRACE if grace is None else grace
        self.share = TEE_SHARE if share is None else share
        self.began = time.monotonic()
        self.outputs: list[TeeOutput] = []

    def _budget(self) -> float:
        """Seconds the backup's writes may still wait for the store: TEE_GRACE plus TEE_SHARE of the time so far,
        less what they waited already (every file of this backup together)."""
        blocked = sum(tee.remote.blocked for tee in self.outputs)
        return self.grace + self.share * (time.monotonic() - self.began) - blocked

    def open(self, name: str) -> Output:
        local = HashingFile(self.repo.path(name + PARTIAL_SUFFIX))
        if self.failure is not None:  # the store failed on an earlier file: this backup no longer waits for it
            return local
        tee = TeeOutput(local, RemoteUpload(self.store, name, self._budget))
        self.outputs.append(tee)
        return tee

    @property
    def uploaded(self) -> dict[str, Uploaded]:
        return {tee.remote.name: tee.uploaded for tee in self.outputs if tee.uploaded is not None}

    @property
    def failure(self) -> StorageError | None:
        return next((tee.failure for tee in self.outputs if tee.failure is not None), None)


class RemoteDestination:
    """No volume: every file streams to the store; the metadata object is written last, once each file is complete."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.description = store.description

    def taken(self) -> set[str]:
        return {info.name.split(".", 1)[0] for info in self.store.list("backup_")}  # any object, not only complete backups

    def open(self, name: str) -> Output:
        return RemoteUpload(self.store, name)

    def commit(self, metadata: dict[str, Any]) -> None:
        self.store.put_stream(metadata["id"] + METADATA_SUFFIX, [metadata_bytes(metadata)])


def dump_format(config: Config) -> str:
    """gzip keeps the spec's `.sql.gz` layout (gunzip | psql); otherwise pg_dump's custom format."""
    return "plain" if config.compression == "gzip" else "custom"


def _write_stream(child: Child, out: Output, config: Config) -> dumpcounts.CountingReader:
    assert child.proc.stdout is not None
    source = dumpcounts.CountingReader(ReadTap(child.proc.stdout, Progress("backup (pg_dump output)")), dumpcounts.row_counter(dump_format(config)))
    with Prefetch(source) as ahead:  # pipe and row counts in one thread, compress, encrypt, hash and write in this one
        encode(ahead, out, config.compression, config.compression_level, config.recipients if config.encryption else None)
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


def _dump_globals(config: Config, conn: psycopg.Connection[Any], path: Output, wanted: set[str] | None = None) -> bool:
    """The roles the database refers to (or `wanted`: a whole server's set names every role), into `path`.
    Returns whether their passwords are included."""
    pg_dumpall = postgres.find_tool("pg_dumpall", config.pg_bin_dir)
    conninfo, env = postgres.child_env(config)
    wanted = roles.referenced_roles(conn) if wanted is None else wanted
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


def dump_database(config: Config, conn: psycopg.Connection[Any], snapshot: str, out: Output) -> dict[str, int]:
    """pg_dump of `config`'s database in `snapshot` (exported by `conn`, still in its transaction) through our stages
    into `out`; returns the exact row counts, read from the dump's own COPY data as it streams by (one pass)."""
    pg_dump = postgres.find_tool("pg_dump", config.pg_bin_dir)
    conninfo, env = postgres.child_env(config)
    argv = [pg_dump, f"--dbname={conninfo}", f"--snapshot={snapshot}", "--no-password", "--lock-wait-timeout=5min"]
    argv += ["--format=plain"] if dump_format(config) == "plain" else ["--format=custom", "--compress=0"]
    child = Child(argv, env)
    try:
        tap = _write_stream(child, out, config)
        child.check("backup")
    finally:
        child.terminate()
    return _row_counts(conn, tap)


TEE_GRACE = 5.0   # seconds the backup's writes may wait for the remote store in all (plus TEE_SHARE of the elapsed time)
TEE_SHARE = 0.05  # before the tee abandons it: a slow store slows the local backup by at most this


def create_backup(config: Config, label: str | None = None, keep: bool = False, store: Store | None = None,
                  tee: TeeDestination | None = None) -> dict[str, Any]:
    """Take one backup; returns its metadata. Nothing is listed unless it is complete. With `store` (no volume), the
    backup streams straight to it; `config.backup_dir` is then only the state directory that holds the lock. With
    `tee` (made by tee_destination), it is written to the volume and streamed to the remote at the same time; after
    the commit, `tee.uploaded` names the objects that are already in the store (see copy_backup)."""
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    with repo.lock("backup"):
        removed = repo.cleanup()
        if removed:
            log.info("removed leftovers of an interrupted backup: %s", ", ".join(removed))
        watch = LockWatch(config)  # validation, the row counts and pg_dump all read every table
        try:
            destination: Destination = tee or (VolumeDestination(repo) if store is None else RemoteDestination(store))
            metadata = _create(config, destination, label, keep)
        finally:
            watch.stop()
    return metadata


def _create(config: Config, destination: Destination, label: str | None, keep: bool) -> dict[str, Any]:
    started = datetime.now(UTC)
    clock = time.monotonic()
    pg_dump = postgres.find_tool("pg_dump", config.pg_bin_dir)
    checked = validate(config) if config.validation_enabled else None
    if checked and not checked.is_valid and config.validation_block_backup:
        raise SidecarError(f"backup refused: validation found {len(checked.findings)} problems ({checked.errors[0]}); "
                           "fix them or set validation.block_backup_on_failure: false")
    conn = postgres.connect(config, autocommit=False)
    files: list[Output] = []
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        info = postgres.server_info(conn)
        properties = dbprops.read(conn, info["database"])
        size_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        dump_version = postgres.check_dump_version(pg_dump, info["major"])
        snapshot_row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert snapshot_row is not None
        snapshot = snapshot_row[0]

        backup_id = new_id(started, destination.taken())
        fmt = dump_format(config)
        encrypted = config.encryption
        dump_name = backup_id + dump_extension(fmt, config.compression, encrypted)
        globals_name = backup_id + globals_extension(config.compression, encrypted)

        globals_file = destination.open(globals_name)
        files.append(globals_file)
        role_passwords = _dump_globals(config, conn, globals_file)
        globals_digest = ""
        if isinstance(globals_file, RemoteUpload | TeeOutput):  # completed before the dump's upload begins; deleted if the backup fails
            globals_digest = globals_file.close()

        dump_file = destination.open(dump_name)
        files.append(dump_file)
        counts = dump_database(config, conn, snapshot, dump_file)
        checksums = {"globals": globals_digest or globals_file.close(), "dump": dump_file.close()}
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
            "databaseProperties": dbprops.seal(properties, config.recipients if encrypted else ()),
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
        destination.commit(metadata)
        log.info("backup %s complete: %d bytes in %.1fs", backup_id, dump_file.size, metadata["durationSeconds"],
                 extra={"event": "backup_completed", "backup_id": backup_id, "duration_seconds": metadata["durationSeconds"], "size_bytes": dump_file.size})
        return metadata
    except psycopg.Error as exc:
        raise SidecarError(f"backup failed: {postgres.describe(exc)}") from None
    finally:
        for leftover in files:
            leftover.abort()
        conn.close()
