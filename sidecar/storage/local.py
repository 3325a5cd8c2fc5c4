"""The local volume as a store: temp name, fsync, link into place (create-only), fsync the directory."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sidecar.storage.base import CHUNK_SIZE, Chunks, Deleted, Hashing, ObjectExists, ObjectInfo, ObjectMissing, PutResult, StorageError, check_name, chunks_of, sha256_of
from sidecar.streams import fsync_dir

PARTIAL_SUFFIX = ".partial"  # the repository's own in-progress files: never listed as objects


def _disk_error(exc: OSError, path: Path) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(f"no space left writing {path} ({exc.strerror}); free space on the backup volume or lower the retention")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path} ({exc.strerror}); make the directory writable for this user")
    return StorageError(f"cannot write {path} ({exc.strerror})")


class LocalStore:
    """Objects are files (mode 0600) in one directory. A write goes to `.<name>.<random>.tmp` (the pattern the
    repository's cleanup removes), is fsynced, then hard-linked to its name, which fails if the name exists (so
    create-only holds even against a concurrent writer), and the directory is fsynced."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    @property
    def description(self) -> str:
        return str(self.dir)

    def _path(self, name: str) -> Path:
        return self.dir / check_name(name)

    def put_stream(self, name: str, data: Chunks, *, create_only: bool = True, sha256: str | None = None) -> PutResult:
        final = self._path(name)
        if create_only and final.exists():
            return self._same_or_refuse(final, data, sha256)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(exc, self.dir) from None
        tmp = self.dir / f".{name}.{secrets.token_hex(4)}.tmp"
        hashing = Hashing(chunks_of(data, CHUNK_SIZE), name, sha256)
        try:
            fd = _disk(lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), final)
            try:
                for chunk in hashing:  # an error of the source itself goes up unchanged
                    view = memoryview(chunk)
                    while view:
                        view = view[_disk(lambda v=view: os.write(fd, v), final):]  # type: ignore[misc]
                _disk(lambda: os.fsync(fd), final)
            finally:
                os.close(fd)
            if create_only:
                try:
                    os.link(tmp, final)  # fails if the name exists: create-only even against a concurrent writer
                except FileExistsError:
                    _unlink(tmp)
                    return self._same_or_refuse(final, iter(()), hashing.hexdigest(), hashing.size)
                except OSError as exc:
                    raise _disk_error(exc, final) from None
                _unlink(tmp)
            else:
                _disk(lambda: os.rename(tmp, final), final)
            fsync_dir(self.dir)
        except BaseException:
            _unlink(tmp)
            raise
        return PutResult(name, hashing.size, hashing.hexdigest())

    def _same_or_refuse(self, final: Path, data: Chunks, sha256: str | None, size: int | None = None) -> PutResult:
        if sha256 is None:
            sha256, size = sha256_of(chunks_of(data))
        existing, existing_size = sha256_of(self._read(final))
        if existing != sha256:
            raise ObjectExists(f"{final} already exists with different content (sha256 {existing}, new {sha256}); objects are never overwritten")
        return PutResult(final.name, existing_size, existing, existed=True)

    def _read(self, path: Path) -> Iterator[bytes]:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise ObjectMissing(f"{path} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path} ({exc.strerror})") from None
        with handle:
            while chunk := handle.read(CHUNK_SIZE):
                yield chunk

    def open_read(self, name: str) -> Iterator[bytes]:
        path = self._path(name)
        if not path.is_file():
            raise ObjectMissing(f"{path} does not exist")
        return self._read(path)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        try:
            with os.scandir(self.dir) as listing:
                found = [_info(item.name, item.stat()) for item in listing
                         if item.name.startswith(prefix) and not item.name.startswith(".") and not item.name.endswith(PARTIAL_SUFFIX)
                         and item.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.dir} ({exc.strerror})") from None
        return sorted(found, key=lambda info: info.name)

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            return _info(name, self._path(name).stat())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.dir / name} ({exc.strerror})") from None

    def delete(self, name: str) -> Deleted:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return Deleted.MISSING
        except PermissionError as exc:
            if exc.errno == errno.EPERM and _immutable(path):  # chattr +i: the file system's own lock
                return Deleted.KEPT_BY_LOCK
            raise StorageError(f"cannot delete {path} ({exc.strerror})") from None
        except OSError as exc:
            raise StorageError(f"cannot delete {path} ({exc.strerror})") from None
        fsync_dir(self.dir)
        return Deleted.DELETED


T = TypeVar("T")


def _disk(action: Callable[[], T], path: Path) -> T:
    try:
        return action()
    except OSError as exc:
        raise _disk_error(exc, path) from None


def _info(name: str, stat: os.stat_result) -> ObjectInfo:
    return ObjectInfo(name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))


FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20


def _immutable(path: Path) -> bool:
    """The file carries the immutable or append-only attribute (chattr +i / +a): no one, not even root, deletes it."""
    import array
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        return bool(flags[0] & (FS_IMMUTABLE_FL | FS_APPEND_FL))
    except OSError:
        return False
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
