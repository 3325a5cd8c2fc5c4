"""The storage interface every home of backups implements, and what the implementations share."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import BinaryIO, Protocol

from sidecar.errors import ChecksumMismatch, SidecarError

CHUNK_SIZE = 1 << 20


class StorageError(SidecarError):
    """A store operation failed (exit code 3). The message names the store and the object, never a secret."""

    transient = False  # worth retrying (a 5xx, a timeout, a refused connection)


class StoreUnusable(StorageError):
    """The store cannot be used at all: bad URL, missing bucket, wrong credentials, unreachable endpoint.

    `reason` is one of REASONS, so a caller (validate-config, metrics) can tell them apart without parsing."""

    REASONS = ("bad-url", "missing-bucket", "credentials", "access-denied", "unreachable", "other")

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ObjectExists(StorageError):
    """A create-only write found a different object already at that name."""


class ObjectMissing(StorageError):
    """The object asked for is not in the store."""


@dataclass(frozen=True)
class PutResult:
    name: str
    size: int
    sha256: str
    existed: bool = False  # the very same content was already there; nothing was written


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    modified: datetime


class Deleted(StrEnum):
    DELETED = "deleted"
    KEPT_BY_LOCK = "kept_by_lock"  # the store refused: Object Lock / retention / immutability policy
    MISSING = "missing"


Chunks = Iterable[bytes] | BinaryIO


class Store(Protocol):
    """Where bytes live. Names are flat ('backup_...dump.zst'); objects are written once and never rewritten."""

    @property
    def description(self) -> str:
        """Where this store is, for messages (a directory, or a URL without credentials)."""
        ...

    def put_stream(self, name: str, data: Chunks, *, create_only: bool = True, sha256: str | None = None) -> PutResult:
        """Write `data` as object `name`, visible only once complete.

        With create_only, an existing object with the same content is accepted (existed=True) and a different
        one raises ObjectExists. With `sha256`, the stream is checked as it goes and a mismatch raises
        ChecksumMismatch with nothing written."""
        ...

    def open_read(self, name: str) -> Iterator[bytes]:
        """The object's bytes in chunks of bounded size; ObjectMissing if it is not there."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Complete objects whose name starts with `prefix`, sorted by name."""
        ...

    def stat(self, name: str) -> ObjectInfo | None:
        ...

    def delete(self, name: str) -> Deleted:
        ...


def chunks_of(data: Chunks, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Bytes chunks from an iterable of chunks or a binary file object."""
    if hasattr(data, "read"):
        reader: BinaryIO = data  # type: ignore[assignment]
        while chunk := reader.read(size):
            yield chunk
    else:
        for chunk in data:
            if chunk:
                yield bytes(chunk)


class ChunkReader:
    """A binary reader (`read(size)`) over chunks (Store.open_read), holding at most one chunk at a time."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            rest = self._buffer[self._offset:] + b"".join(self._chunks)
            self._buffer, self._offset = b"", 0
            return rest
        while self._offset >= len(self._buffer):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._buffer, self._offset = chunk, 0
        data = self._buffer[self._offset:self._offset + size]
        self._offset += len(data)
        return data

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class Hashing:
    """Passes chunks through while counting them and computing their sha256; checks an expected digest at the end."""

    def __init__(self, chunks: Iterable[bytes], name: str, expected: str | None = None) -> None:
        self._chunks = chunks
        self._name = name
        self._expected = expected
        self._hash = hashlib.sha256()
        self.size = 0
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._hash.update(chunk)
            self.size += len(chunk)
            yield chunk
        if self._expected is not None and self.hexdigest() != self._expected:
            raise ChecksumMismatch(f"{self._name}: sha256 of the data written is {self.hexdigest()}, expected {self._expected}; "
                                   "the source changed or is corrupt, so nothing was stored")
        self.done = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def sha256_of(chunks: Iterable[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def check_name(name: str) -> str:
    """Object names are flat, printable and never hidden; anything else is a programming error shown plainly."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or not name.isprintable():
        raise StorageError(f"invalid object name {name[:80]!r}: names are flat file names that do not start with '.'")
    return name
