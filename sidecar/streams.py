"""Hash / compress / encrypt stages over byte chunks, in both directions, in bounded memory."""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from sidecar import age
from sidecar.errors import SidecarError

CHUNK_SIZE = 1 << 20
EXTENSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}


class Stage(Protocol):
    def update(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Compressor:
    def __init__(self, algorithm: str, level: int) -> None:
        self._obj: zstandard.ZstdCompressionObj | zlib._Compress
        if algorithm == "zstd":
            self._obj = zstandard.ZstdCompressor(level=level).compressobj()
        else:
            self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)

    def update(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def finish(self) -> bytes:
        return self._obj.flush()


class _Decompressor:
    def __init__(self, algorithm: str) -> None:
        self._algorithm = algorithm
        self._obj: zstandard.ZstdDecompressionObj | zlib._Decompress
        if algorithm == "zstd":
            self._obj = zstandard.ZstdDecompressor().decompressobj()
        else:
            self._obj = zlib.decompressobj(31)

    def update(self, data: bytes) -> bytes:
        try:
            return self._obj.decompress(data)
        except (zstandard.ZstdError, zlib.error) as exc:
            raise SidecarError(f"{self._algorithm} data is corrupt ({exc}); the backup file is damaged") from None

    def finish(self) -> bytes:
        if not self._obj.eof:
            raise SidecarError(f"{self._algorithm} stream ends early: the backup file is truncated")
        if self._obj.unused_data:
            raise SidecarError(f"{self._algorithm} stream has trailing garbage: the backup file is damaged")
        return b""


def compressor(algorithm: str, level: int) -> Stage | None:
    return None if algorithm == "none" else _Compressor(algorithm, level)


def decompressor(algorithm: str) -> Stage | None:
    return None if algorithm == "none" else _Decompressor(algorithm)


def _run(stages: list[Stage], data: bytes) -> bytes:
    for stage in stages:
        if not data:
            return b""
        data = stage.update(data)
    return data



class Pipeline:
    """Apply stages in order to a stream of chunks; finish() flushes each stage into the next."""

    def __init__(self, stages: list[Stage | None]) -> None:
        self.stages = [s for s in stages if s is not None]

    def update(self, data: bytes) -> bytes:
        return _run(self.stages, data)

    def finish(self) -> bytes:
        out = b""
        for stage in self.stages:
            out = stage.update(out) if out else b""
            out += stage.finish()
        return out


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

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                raise disk_error(exc, self.path) from None
            view = view[written:]
        self.size += len(data)

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


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read_chunks(path: Path) -> Iterator[bytes]:
    try:
        handle: BinaryIO = open(path, "rb")
    except OSError as exc:
        raise SidecarError(f"cannot read {path} ({exc.strerror})") from None
    with handle:
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in read_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def encode_stages(compression: str, level: int, recipients: tuple[str, ...] | None) -> Pipeline:
    return Pipeline([compressor(compression, level), age.Encryptor(list(recipients)) if recipients else None])


def decode_stages(compression: str, identities: age.Identities | None) -> Pipeline:
    return Pipeline([age.Decryptor(identities) if identities is not None else None, decompressor(compression)])
