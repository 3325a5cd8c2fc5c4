"""A push parser of the ustar stream pg_basebackup writes (`-Ft -D -`), in bounded memory: bytes are written in
as they come through our stages, and a handler sees each member begin, its data in pieces, and its end.

Used three ways: while a base backup is taken (keep `backup_label` and `backup_manifest`), by `verify` (sha256 of
every member against the manifest) and by the restore (extract into a data directory)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from sidecar.errors import SidecarError

BLOCK = 512
KEPT_SMALL = 64 << 10  # backup_label and tablespace_map are a few hundred bytes


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    kind: str  # file | dir | symlink
    mode: int
    linkname: str = ""


class Handler(Protocol):
    def begin(self, member: Member) -> None: ...
    def data(self, chunk: bytes) -> None: ...
    def end(self) -> None: ...


class TarError(SidecarError):
    pass


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU) for sizes beyond 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header(block: bytes) -> Member:
    stored = _number(block[148:156])
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != computed:
        raise TarError("the base backup's tar stream has a bad header checksum: it is damaged")
    name = block[0:100].split(b"\0", 1)[0].decode()
    prefix = block[345:500].split(b"\0", 1)[0].decode() if block[257:262] == b"ustar" else ""
    if prefix:
        name = prefix + "/" + name
    flag = block[156:157]
    kinds = {b"0": "file", b"\0": "file", b"5": "dir", b"2": "symlink"}
    if flag not in kinds:
        raise TarError(f"the base backup's tar stream has a member of type {flag!r} ({name}), which pg_basebackup does not write")
    return Member(name.rstrip("/"), _number(block[124:136]), kinds[flag], _number(block[100:108]) & 0o7777,
                  block[157:257].split(b"\0", 1)[0].decode())


class TarParser:
    """Feed it the tar stream with write(); close() fails if the stream ended inside a member or without its end blocks."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._buffer = bytearray()
        self._remaining = 0  # data bytes of the current member still to come
        self._padding = 0
        self._in_member = False
        self._ended = False
        self.members = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._in_member and self._remaining:
                piece = view[: self._remaining]
                self._handler.data(bytes(piece))
                self._remaining -= len(piece)
                view = view[len(piece):]
                continue
            if self._in_member:  # data done: skip padding, then end
                skip = min(self._padding, len(view))
                self._padding -= skip
                view = view[skip:]
                if self._padding == 0:
                    self._in_member = False
                    self._handler.end()
                continue
            need = BLOCK - len(self._buffer)
            self._buffer += view[:need]
            view = view[need:]
            if len(self._buffer) < BLOCK:
                break
            block = bytes(self._buffer)
            self._buffer.clear()
            if self._ended:
                continue  # the end blocks and whatever zero padding follows
            if block == bytes(BLOCK):
                self._ended = True
                continue
            member = _header(block)
            self.members += 1
            self._handler.begin(member)
            self._remaining = member.size if member.kind == "file" else 0
            self._padding = (-self._remaining) % BLOCK
            self._in_member = True
            if self._remaining == 0 and self._padding == 0:
                self._in_member = False
                self._handler.end()
        return len(data)

    def close(self) -> None:
        if self._in_member or not self._ended:
            raise TarError("the base backup's tar stream ends early: it is truncated")


class Keeper:
    """A handler that keeps backup_label in memory and writes backup_manifest to a file (its size grows with the
    number of files), and hashes every member (for the manifest check)."""

    def __init__(self, manifest_path: Path | None, hashing: bool = False) -> None:
        self.manifest_path = manifest_path
        self.label = b""
        self.hashing = hashing
        self.digests: dict[str, tuple[int, str]] = {}  # path -> (size, sha256) of every regular file
        self._member: Member | None = None
        self._hash: Any = None
        self._manifest: IO[bytes] | None = None
        self._label = bytearray()

    def begin(self, member: Member) -> None:
        self._member = member
        self._hash = hashlib.sha256() if self.hashing and member.kind == "file" else None
        if member.name == "backup_manifest" and self.manifest_path is not None:
            self._manifest = open(os.open(self.manifest_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")

    def data(self, chunk: bytes) -> None:
        assert self._member is not None
        if self._hash is not None:
            self._hash.update(chunk)
        if self._member.name == "backup_label" and len(self._label) < KEPT_SMALL:
            self._label += chunk
        elif self._manifest is not None:
            self._manifest.write(chunk)

    def end(self) -> None:
        assert self._member is not None
        if self._hash is not None:
            self.digests[self._member.name] = (self._member.size, self._hash.hexdigest())
        if self._member.name == "backup_label":
            self.label = bytes(self._label)
        if self._manifest is not None:
            self._manifest.flush()
            os.fsync(self._manifest.fileno())
            self._manifest.close()
            self._manifest = None
        self._member = None


class Extractor(Keeper):
    """A Keeper that also writes every member under `root` (a new data directory): never outside it, no device
    files, modes 0600/0700 as PostgreSQL wants them."""

    def __init__(self, root: Path, manifest_path: Path | None) -> None:
        super().__init__(manifest_path, hashing=True)
        self.root = root
        self._fd: int | None = None

    def _target(self, name: str) -> Path:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise TarError(f"the base backup names '{name[:80]}', which is outside a data directory; refusing it")
        return self.root.joinpath(*path.parts)

    def begin(self, member: Member) -> None:
        super().begin(member)
        target = self._target(member.name)
        if member.kind == "dir":
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif member.kind == "symlink":
            raise TarError(f"the base backup has a symbolic link {member.name} (a tablespace?); tablespaces are not supported yet")
        else:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)

    def data(self, chunk: bytes) -> None:
        super().data(chunk)
        if self._fd is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view):]

    def end(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().end()


def label_fields(label: bytes) -> dict[str, str]:
    """backup_label's `KEY: value` lines."""
    fields = {}
    for line in label.decode(errors="replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def manifest_wal_range(path: Path) -> dict[str, Any]:
    """The manifest's WAL-Ranges entry (at its end: read only the tail, the manifest can be large)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - (64 << 10)))
        tail = handle.read().decode(errors="replace")
    start = tail.rfind('"WAL-Ranges"')
    if start < 0:
        raise TarError("the base backup's manifest has no WAL-Ranges; pg_basebackup did not finish")
    body = tail[start:].split("[", 1)[1].split("]", 1)[0]
    ranges = json.loads("[" + body + "]")
    if len(ranges) != 1:
        raise TarError(f"the base backup's manifest has {len(ranges)} WAL ranges; one was expected")
    return dict(ranges[0])


def check_against_manifest(path: Path, digests: dict[str, tuple[int, str]]) -> list[str]:
    """Problems (one line each) comparing the files seen in the tar with the manifest: missing, sizes, sha256,
    and the manifest's own checksum."""
    raw = path.read_bytes()  # the manifest: ~200 bytes per file of the cluster
    problems = []
    body, sep, _ = raw.rpartition(b'"Manifest-Checksum"')
    manifest = json.loads(raw)
    if sep and hashlib.sha256(body).hexdigest() != manifest.get("Manifest-Checksum"):
        problems.append("backup_manifest: its own checksum does not match; the manifest is damaged")
    for item in manifest.get("Files", []):
        name = item.get("Path")
        seen = digests.get(name)
        if seen is None:
            problems.append(f"{name}: in the manifest, not in the base backup")
        elif seen[0] != item.get("Size"):
            problems.append(f"{name}: {seen[0]} bytes, the manifest says {item.get('Size')}")
        elif item.get("Checksum-Algorithm") == "SHA256" and seen[1] != item.get("Checksum"):
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def fix_modes(root: Path) -> None:
    """Directories 0700, files 0600 (PostgreSQL refuses a group- or world-readable data directory)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o700)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, 0o600)
