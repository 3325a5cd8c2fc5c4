"""Hash / compress / encrypt over streams, in both directions, in bounded memory whatever the compression ratio.

Backup pulls: pg_dump's stdout -> compress (a reader) -> age encrypt -> file. Restore pushes what it pulls:
file -> sha256 tap -> age decrypt -> decompress (a writer, bounded output) -> the loader's stdin."""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from sidecar import age
from sidecar.errors import SidecarError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

CHUNK_SIZE = 1 << 20
OUTPUT_LIMIT = 1 << 20  # the most one decompression step may return
EXTENSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


class Decompressor:
    """A writer that decompresses into another writer, at most OUTPUT_LIMIT bytes at a time whatever the
    ratio (a 1 MiB read of a 1000:1 stream must not become 1 GiB in memory). `close()` fails if the
    stream ended early or has trailing bytes."""

    def __init__(self, algorithm: str, out: Writer) -> None:
        self._algorithm = algorithm
        self._out = out
        self._zstd = zstd.ZstdDecompressor() if algorithm == "zstd" else None
        self._zlib = zlib.decompressobj(31) if algorithm == "gzip" else None

    def write(self, data: bytes) -> int:
        if not data:
            return 0
        try:
            if self._zstd is not None:
                if self._zstd.eof:
                    raise self._trailing()
                self._out.write(self._zstd.decompress(data, max_length=OUTPUT_LIMIT))
                while not self._zstd.eof and not self._zstd.needs_input:
                    self._out.write(self._zstd.decompress(b"", max_length=OUTPUT_LIMIT))
                if self._zstd.unused_data:
                    raise self._trailing()
            elif self._zlib is not None:
                if self._zlib.eof:
                    raise self._trailing()
                self._out.write(self._zlib.decompress(data, OUTPUT_LIMIT))
                while self._zlib.unconsumed_tail:
                    self._out.write(self._zlib.decompress(self._zlib.unconsumed_tail, OUTPUT_LIMIT))
                if self._zlib.unused_data:
                    raise self._trailing()
        except (zstd.ZstdError, zlib.error) as exc:
            raise SidecarError(f"{self._algorithm} data is corrupt ({exc}); the backup file is damaged") from None
        return len(data)

    def _trailing(self) -> SidecarError:
        return SidecarError(f"{self._algorithm} stream has trailing garbage: the backup file is damaged")

    def close(self) -> None:
        if self._zlib is not None and not self._zlib.eof:
            try:
                self._out.write(self._zlib.flush())  # at most one pending match: a few hundred bytes
            except zlib.error:
                pass
        if not (self._zstd or self._zlib).eof:  # type: ignore[union-attr]
            raise SidecarError(f"{self._algorithm} stream ends early: the backup file is truncated")


class _Compressing:
    """A reader of the compressed form of another reader (compressed output never outgrows its input)."""

    def __init__(self, source: age.Readable, algorithm: str, level: int) -> None:
        self._source = source
        self._zstd = zstd.ZstdCompressor(level=level) if algorithm == "zstd" else None
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31) if algorithm == "gzip" else None
        self._buffer = memoryview(b"")
        self._done = False

    def _compress(self, data: bytes) -> bytes:
        if self._zstd is not None:
            return self._zstd.compress(data) if data else self._zstd.flush(zstd.ZstdCompressor.FLUSH_FRAME)
        assert self._zlib is not None
        return self._zlib.compress(data) if data else self._zlib.flush()

    def read(self, size: int = -1) -> bytes:
        while not self._buffer and not self._done:
            chunk = self._source.read(CHUNK_SIZE)
            self._done = not chunk
            self._buffer = memoryview(self._compress(chunk))
        size = len(self._buffer) if size < 0 else size
        data = bytes(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return data


class ReadTap:
    """A reader that counts, optionally hashes (sha256) and reports progress of what goes through it."""

    def __init__(self, reader: age.Readable, progress: Progress | None = None, hashing: bool = False) -> None:
        self._reader = reader
        self._progress = progress
        self._hash = hashlib.sha256() if hashing else None
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._reader.read(CHUNK_SIZE if size < 0 else size)
        self.size += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self._progress is not None:
            self._progress.add(len(data))
        return data

    def hexdigest(self) -> str:
        assert self._hash is not None
        return self._hash.hexdigest()


class Prefetch:
    """A reader that reads `source` ahead in a thread of its own, at most `depth` reads of CHUNK_SIZE ahead (bounded
    memory): what the source does (reading pg_dump's pipe, counting rows) runs beside what its reader does (compress,
    encrypt, hash, write: C code that lets go of the GIL). An exception in the thread is raised by the read that reaches
    it. `close()` stops the thread; it never waits on the source (a thread blocked on a pipe ends when the pipe does)."""

    def __init__(self, source: age.Readable, depth: int = 1) -> None:
        self._source = source
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._buffer = memoryview(b"")
        self._done = False
        self._failed: BaseException | None = None  # raised again by every later read: never mistaken for the stream's end
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item: bytes | BaseException
        try:
            while not self._stop.is_set():
                item = self._source.read(CHUNK_SIZE)
                self._put(item)
                if not item:
                    return
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        if self._failed is not None:
            raise self._failed
        if not self._buffer and not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done, self._failed = True, item
                raise item
            self._done = not item
            if 0 <= size < len(item):
                self._buffer = memoryview(item)
            else:
                return item
        size = len(self._buffer) if size < 0 else size
        data = bytes(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return data

    def close(self) -> None:
        """Stop reading ahead; after the end of the source was read, the thread has ended (joined)."""
        self._stop.set()
        if self._done:
            self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode(source: age.Readable, out: Writer, compression: str, level: int, recipients: tuple[str, ...] | None) -> None:
    """source -> compress -> encrypt -> out, pulled CHUNK_SIZE at a time: memory stays flat."""
    stream: age.Readable = source if compression == "none" else _Compressing(source, compression, level)
    if recipients:
        age.encrypt(stream, out, recipients)
        return
    while data := stream.read(CHUNK_SIZE):
        out.write(data)


def decode(source: age.Readable, out: Writer, compression: str, identities: age.Identities | None) -> None:
    """source -> decrypt -> decompress -> out, every step with bounded output; raises SidecarError (or
    the exception `out` raised) if the stream is damaged or truncated."""
    sink: Writer = out if compression == "none" else Decompressor(compression, out)
    if identities is not None:
        age.decrypt(source, sink, identities)
    else:
        while data := source.read(CHUNK_SIZE):
            sink.write(data)
    if isinstance(sink, Decompressor):
        sink.close()


class Progress:
    """Logs `what: N MiB [of M MiB], R MiB/s` every `every` seconds while bytes go through."""

    def __init__(self, what: str, total: int | None = None, every: float = 10.0) -> None:
        import logging
        import time

        self._log = logging.getLogger("sidecar.progress")
        self._clock = time.monotonic
        self.what, self.total, self.every = what, total, every
        self.done = 0
        self._start = self._last = self._clock()

    def add(self, count: int) -> None:
        self.done += count
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            rate = self.done / max(now - self._start, 1e-9) / (1 << 20)
            of = f" of {self.total >> 20} MiB ({100 * self.done // max(self.total, 1)}%)" if self.total else ""
            self._log.info("%s in progress: %d MiB%s, %.1f MiB/s", self.what, self.done >> 20, of, rate)


class HashingFile:
    """Write to a file while counting bytes and computing sha256; fsync on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: bytes) -> int:
        if not data:
            return 0
        self._hash.update(data)
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                raise disk_error(exc, self.path) from None
            view = view[written:]
        self.size += len(data)
        return len(data)

    def close(self) -> str:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise disk_error(exc, self.path) from None
        finally:
            os.close(self._fd)
        return self._hash.hexdigest()

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        remove_quietly(self.path)


def disk_error(exc: OSError, path: Path) -> SidecarError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SidecarError(f"no space left writing {path} ({exc.strerror}); free space on the backup volume or lower BACKUP_RETENTION_DAYS")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SidecarError(f"cannot write {path} ({exc.strerror}); make the backup directory writable for this user")
    return SidecarError(f"cannot write {path} ({exc.strerror})")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def open_stored(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise SidecarError(f"cannot read {path} ({exc.strerror})") from None


def read_chunks(path: Path) -> Iterator[bytes]:
    with open_stored(path) as handle:
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in read_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
