"""A custom-format archive streamed into a scratch database in three steps, the way `pg_restore -j` orders them:

1. the schema before the data (tables, types, functions: pg_dump's pre-data section), by `pg_restore
   --section=pre-data --single-transaction` from the archive's table of contents, which is read off the
   head of the stream and kept in memory (a memfd: the schema never touches the disk);
2. the data, as it streams by: every table's COPY rows are split into ~1 MiB batches handed in turn to
   `jobs` connections, each running its own COPY of that table in its own thread (a big table loads on
   every core the server has, not on one), through small bounded queues;
3. the rest (sequence values, primary keys, indexes, constraints, foreign keys, triggers), by `pg_restore
   --section=data --section=post-data -j jobs` from the same table of contents, the table data left out: pg_restore
   builds them in parallel in its own dependency order.

The database is a scratch one until the swap (restore.py drops it on any failure), so the load needs no
single transaction. An archive this reader cannot split (large objects, data compressed by pg_dump, an archive
version it does not know) is passed whole to one `pg_restore --single-transaction` instead, as before.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from sidecar import postgres
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.logical.dumpcounts import BLK_DATA, NL, CustomCounter, DumpCountError, _decode
from sidecar.postgres import Child

log = logging.getLogger(__name__)

BATCH = 1 << 20  # bytes of COPY rows per hand-off to a connection
QUEUED = 4  # batches waiting per connection: memory stays under jobs * QUEUED * BATCH
# the load's own sessions (pg_restore's children through PGOPTIONS, our COPY connections): nothing here waits
# for a commit to reach the disk (a crash drops the scratch database anyway), and no server default timeout
# cuts a long COPY or index build short. maintenance_work_mem is left to the server: 256MB instead of 64MB
# made no measurable difference to this data's index builds (bench/RESULTS.md) and costs the server memory.
LOAD_SETTINGS = {"synchronous_commit": "off", "statement_timeout": "0", "lock_timeout": "0", "idle_in_transaction_session_timeout": "0"}
_STOP = object()


class _Copier:
    """`jobs` connections, each in its own thread, running the COPY of the batches its bounded queue gets."""

    def __init__(self, config: Config, dbname: str, jobs: int, encoding: str) -> None:
        self.error: BaseException | None = None
        self.rows: dict[int, int] = {}
        self._lock = threading.Lock()
        self._conns: list[psycopg.Connection[Any]] = []
        try:
            for _ in range(jobs):
                conn = postgres.connect(config, dbname=dbname)
                self._conns.append(conn)
                # what pg_restore sets on its own connection before it loads data
                conn.execute("SELECT pg_catalog.set_config('search_path', '', false)")
                for name, value in {**LOAD_SETTINGS, "client_encoding": encoding, "row_security": "off", "xmloption": "content"}.items():
                    conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (name, value))
        except BaseException:
            self.close()
            raise
        self._queues: list[queue.Queue[Any]] = [queue.Queue(QUEUED) for _ in self._conns]
        self._threads = [threading.Thread(target=self._run, args=(conn, q), name=f"copy-{i}", daemon=True)
                         for i, (conn, q) in enumerate(zip(self._conns, self._queues, strict=True))]
        for thread in self._threads:
            thread.start()
        self._next = 0

    def send(self, dump_id: int, statement: bytes, data: bytes | None, to: int | None = None) -> int:
        """Queue a batch of a table's rows (None: the table's end) for the next connection (or `to`); which one took it."""
        which = self._next if to is None else to
        if to is None:
            self._next = (self._next + 1) % len(self._queues)
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queues[which].put((dump_id, statement, data), timeout=0.2)
                return which
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait for every COPY to end; raises the first error of any connection."""
        self._stop()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        with self._lock:
            self.error = self.error or SidecarError("aborted")
        self._stop()

    def _stop(self) -> None:
        for q in self._queues:
            while True:
                try:
                    q.put(_STOP, timeout=0.2)
                    break
                except queue.Full:
                    if not any(thread.is_alive() for thread in self._threads):
                        break
        for thread in self._threads:
            thread.join()
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()

    def _run(self, conn: psycopg.Connection[Any], q: queue.Queue[Any]) -> None:
        cursor = conn.cursor()
        copy: Any = None
        context: Any = None
        try:
            while (item := q.get()) is not _STOP:
                if self.error is not None:
                    continue  # drain: another connection failed
                dump_id, statement, data = item
                if data is None:  # the table's end: this connection's COPY of it (if it had rows of it) commits
                    if context is not None:
                        context.__exit__(None, None, None)
                        context = None
                        with self._lock:
                            self.rows[dump_id] = self.rows.get(dump_id, 0) + cursor.rowcount
                    continue
                if context is None:  # pg_dump's statement, as bytes in the archive's encoding (the connection's)
                    context = cursor.copy(statement.rstrip().rstrip(b";"))
                    copy = context.__enter__()
                copy.write(data)
        except BaseException as exc:
            with self._lock:
                self.error = self.error or SidecarError(f"loading the data failed: {postgres.describe(exc)}")
            while q.get() is not _STOP:
                pass
        finally:
            if context is not None:
                try:
                    context.__exit__(SidecarError, SidecarError("aborted"), None)  # CopyFail: nothing of this batch commits
                except Exception:
                    pass


class _Reader(CustomCounter):
    """The archive's parser: the table of contents as the counter reads it, then every data block's rows
    handed to the loader (the chunk framing stripped: the connections get plain COPY text)."""

    def __init__(self, on_start: Callable[[bytes], None], send: Callable[[int, bytes, bytes | None], None], batch: int = BATCH) -> None:
        super().__init__()
        self._batch = batch
        self.head = bytearray()  # the header and table of contents: everything before the first data block
        self.started = False
        self._on_start, self._send = on_start, send
        self._fed = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._dump_id = 0
        self._copies: dict[int, bytes] = {}

    def feed(self, data: bytes) -> None:
        if self._phase != "data":
            self.head += data
        super().feed(data)

    def start(self) -> None:
        """After the table of contents: the schema is loaded, then the data comes."""
        if not self.started:
            self._copies = {e.dump_id: e.copy for e in self.entries if e.desc == b"TABLE DATA"}
            self._on_start(bytes(self.head[:self.toc_end]))
            self.started, self.head = True, bytearray()

    def _data(self, buf: bytes) -> None:
        if not self.started:
            self.start()
        self._buf = b""
        pos, end = 0, len(buf)
        isz = 1 + self._int
        parts = self._parts
        while pos < end:
            state = self._state
            if state == "block":
                if pos + 1 + isz > end:
                    break
                kind = buf[pos]
                dump_id = self._int_at(buf, pos + 1)
                if kind != BLK_DATA or dump_id not in self._copies:
                    raise DumpCountError(f"a data block of type {kind} for entry {dump_id}, which is not a table's data")
                pos += 1 + isz
                self._dump_id = dump_id
                self._state = "chunk"
            elif state == "payload":
                stop = min(end, pos + self._remaining)
                self._remaining -= stop - pos
                parts.append(buf[pos:stop])
                self._size += stop - pos
                if self._remaining == 0:
                    self._state = "chunk"
                pos = stop
            else:  # "chunk": length-prefixed chunks (one per row with -Z0) up to a zero length
                pos = self._chunks_to(buf, pos)
                if self._state == "chunk" and pos + isz > end:  # a chunk length cut by the read boundary
                    break
            if self._size >= self._batch:
                self._flush()
        self._buf = buf[pos:]

    def _chunks_to(self, buf: bytes, pos: int) -> int:
        """The hot loop, once per row: from `pos`, chunk payloads are gathered until a batch is full (counted in
        framed bytes), the table ends, or a chunk goes on in the next read. Returns where it stopped."""
        end = len(buf)
        isz = 1 + self._int
        unpack = self._unpack
        append = self._parts.append
        begin = pos
        room = self._batch - self._size
        while pos + isz <= end:
            if unpack is not None:
                sign, length = unpack(buf, pos)
            else:
                sign, length = buf[pos], int.from_bytes(buf[pos + 1:pos + isz], "little")
            start = pos + isz
            stop = start + length
            if length == 0 or sign or stop > end:
                if sign:
                    raise DumpCountError("negative chunk length")
                self._size += pos - begin
                if length == 0:
                    self._flush()
                    self._send(self._dump_id, self._copies[self._dump_id], None)
                    self._state = "block"
                    return start
                # the chunk goes on in the next read
                self._state, self._remaining = "payload", stop - end
                append(buf[start:end])
                self._size += end - pos
                return end
            append(buf[start:stop])
            pos = stop
            if pos - begin >= room:
                break
        self._size += pos - begin
        return pos

    def _flush(self) -> None:
        if self._parts:
            self._send(self._dump_id, self._copies[self._dump_id], b"".join(self._parts))
            self._parts.clear()
            self._size = 0

    def complete(self) -> bool:
        return self._phase == "data" and self._state == "block" and not self._buf


def _unsupported(reader: CustomCounter) -> str | None:
    """Why this archive cannot be split (then it goes whole to one pg_restore), or None."""
    for entry in reader.entries:
        if entry.had_dumper and entry.desc != b"TABLE DATA":
            return f"it has {entry.desc.decode('utf-8', 'replace').lower()}"
    return None


class ParallelLoad:
    """decode()'s writer for a custom-format archive restored into the scratch database `dbname`; `fallback()` starts
    the whole-archive pg_restore for what this cannot split. Call finish() after the last byte (and only once the
    stream's sha256 matched: the indexes and constraints come then), abort() on any failure."""

    def __init__(self, config: Config, dbname: str, jobs: int, fallback: Callable[[], Child]) -> None:
        self._config, self._dbname, self._jobs, self._fallback = config, dbname, jobs, fallback
        self._reader = _Reader(self._start, self._send)
        self._copier: _Copier | None = None
        self._child: Child | None = None
        self._toc_fd = -1
        self.mode = "parallel"  # or "single" (the fallback)
        self._last, self._open_row = 0, False
        self._times: list[float] = []  # the schema step's start and end
        self._ended: set[int] = set()  # dump ids of the TABLE DATA entries whose data block was read to its end
        self.rows: dict[int, int] = {}

    def write(self, data: bytes) -> int:
        if self._child is not None:
            self._to_child(data)
            return len(data)
        try:
            self._reader.feed(data)
        except DumpCountError as exc:
            if self._reader.started:
                raise SidecarError(f"the archive could not be read: {exc}") from None
            self._start_fallback(f"{exc}", bytes(self._reader.head))
        return len(data)

    def _start(self, head: bytes) -> None:
        why = _unsupported(self._reader)
        if why:
            raise DumpCountError(why)
        self._toc_fd = os.memfd_create("archive-toc", os.MFD_CLOEXEC)
        view = memoryview(head)
        while view:
            view = view[os.write(self._toc_fd, view):]
        self._times.append(time.monotonic())
        self._pg_restore(["--section=pre-data", "--single-transaction"], "restore: creating the schema")
        self._times.append(time.monotonic())
        self._copier = _Copier(self._config, self._dbname, self._jobs, self._reader._encoding)

    def _send(self, dump_id: int, statement: bytes, data: bytes | None) -> None:
        assert self._copier is not None
        if data is not None:
            # a batch that ends inside a row (a row longer than a batch, or cut by a read) is followed by the rest
            # of that row on the same connection; the next whole batch goes to the next one
            self._last = self._copier.send(dump_id, statement, data, to=self._last if self._open_row else None)
            self._open_row = not data.endswith(NL)
        else:  # the table's end, on every connection (each ends its own COPY of it, if it had one)
            self._open_row = False
            self._ended.add(dump_id)
            for i in range(self._jobs):
                self._copier.send(dump_id, statement, None, to=i)

    def _start_fallback(self, why: str, head: bytes) -> None:
        log.info("restoring the archive with one pg_restore, not in parallel: %s", why)
        self.mode = "single"
        self._child = self._fallback()
        self._to_child(head)

    def _to_child(self, data: bytes) -> None:
        assert self._child is not None and self._child.proc.stdin is not None
        self._child.proc.stdin.write(data)

    def finish(self) -> None:
        if self._child is not None:
            assert self._child.proc.stdin is not None
            try:
                self._child.proc.stdin.close()
            except BrokenPipeError:
                pass  # it stopped reading: its exit status and stderr tell why
            self._child.check("restore")
            return
        if not self._reader.started and self._reader.toc_end >= 0:  # an archive with no table data
            self._reader.start()
        if not self._reader.complete():
            raise SidecarError("the archive ended early (truncated)")
        assert self._copier is not None
        copier, self._copier = self._copier, None
        copier.finish()
        self.rows = copier.rows
        loaded = time.monotonic()
        self._pg_restore(["--section=data", "--section=post-data", f"--jobs={self._jobs}", f"--use-list={self._list()}"],
                         "restore: building indexes and constraints")
        self._close_toc()
        log.info("loaded the schema in %.1f s, the data of %d tables over %d connections in %.1f s, then the indexes and constraints "
                 "with pg_restore --jobs=%d in %.1f s", self._times[1] - self._times[0], len(self._reader._copies), self._jobs,
                 loaded - self._times[1], self._jobs, time.monotonic() - loaded)

    def row_counts(self) -> dict[tuple[str, str], int] | None:
        """After finish(): the rows loaded into each table whose data the archive had, keyed (schema, table) as the
        backup's counter keys them: the sum of the servers' own counts of what each COPY inserted (its command tag),
        0 for a table with an empty data block. None after the whole-archive fallback (nothing was counted).

        A table's count is that of its own TABLE DATA entry: with --load-via-partition-root a partition's rows are
        loaded through its root and the server routes each row; all of them were inserted, into the partition the
        restored database's bounds give them (the same one, except hash partitioning on an enum: pg_dump then loads
        through the root because the hash differs from one database to another)."""
        if self.mode != "parallel":
            return None
        tables = self._reader._tables
        return {(_decode(tables[i][0], self._reader._encoding), _decode(tables[i][1], self._reader._encoding)): self.rows.get(i, 0)
                for i in self._ended}

    def abort(self) -> None:
        if self._child is not None:
            self._child.terminate(grace=1)
        if self._copier is not None:
            self._copier.abort()
            self._copier = None
        self._close_toc()

    def _close_toc(self) -> None:
        if self._toc_fd >= 0:
            os.close(self._toc_fd)
            self._toc_fd = -1

    @property
    def _toc(self) -> str:
        return f"/proc/self/fd/{self._toc_fd}"

    def _list(self) -> str:
        """A --use-list file (another memfd) of every entry but the table data, which is loaded already."""
        tool = postgres.find_tool("pg_restore", self._config.pg_bin_dir)
        listed = subprocess.run([tool, "--list", self._toc], capture_output=True, pass_fds=(self._toc_fd,), check=False,
                                env=postgres.base_env())  # reads a file: no connection, and never the sidecar's secrets
        if listed.returncode != 0:
            raise SidecarError(f"restore failed: pg_restore --list: {listed.stderr.decode(errors='replace').strip()[-400:]}")
        data = {e.dump_id for e in self._reader.entries if e.desc == b"TABLE DATA"}
        keep = [line for line in listed.stdout.splitlines(keepends=True)
                if not line.lstrip().startswith(b";") and line.strip() and int(line.split(b";", 1)[0]) not in data]
        fd = os.memfd_create("archive-list", os.MFD_CLOEXEC)
        os.write(fd, b"".join(keep))
        self._list_fd = fd
        return f"/proc/self/fd/{fd}"

    def _pg_restore(self, args: list[str], what: str) -> None:
        conninfo, env = postgres.child_env(self._config.with_database(self._dbname))
        if LOAD_SETTINGS:
            options = " ".join(f"-c {name}={value}" for name, value in LOAD_SETTINGS.items())
            env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {options}".strip()
        fds = tuple(fd for fd in (self._toc_fd, getattr(self, "_list_fd", -1)) if fd >= 0)
        argv = [postgres.find_tool("pg_restore", self._config.pg_bin_dir), f"--dbname={conninfo}", "--exit-on-error", "--no-password",
                *args, self._toc]
        child = Child(argv, env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=fds)
        try:
            child.check(what)
        finally:
            child.terminate()
            if getattr(self, "_list_fd", -1) >= 0 and "--use-list" in " ".join(args):
                os.close(self._list_fd)
                self._list_fd = -1
