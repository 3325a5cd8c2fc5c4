"""The WAL archive on the volume: segment names and LSN arithmetic (pure), storing a segment through our stages,
reading one back (sha256 checked), and what is archived per system and timeline (with its gaps).

Layout, under BACKUP_DIR:
    wal/<system identifier>/<timeline, 8 hex digits>/<segment>.zst[.age]   the segment through zstd (and age)
    wal/<system identifier>/<timeline>/<segment>.json                      its record: sha256/size stored and raw
    wal/<system identifier>/history/<TLI>.history[.zst][.age] + .json     timeline history files
A segment is archived when its record exists (the record is written last, atomically)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import age, streams
from sidecar.errors import ChecksumMismatch, NotFound, SidecarError
from sidecar.repository import iso_timestamp, write_atomically

SEGMENT = re.compile(r"[0-9A-F]{24}")
HISTORY = re.compile(r"[0-9A-F]{8}\.history")
LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
WAL_DIR = "wal"
RECORD_SUFFIX = ".json"


# --- names and LSNs (pure) ------------------------------------------------------------------------

def parse_lsn(text: str) -> int:
    match = LSN.fullmatch(text.strip())
    if not match:
        raise ValueError(f"'{text[:40]}' is not an LSN (like 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segments_per_xlogid(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per = segments_per_xlogid(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segment_of(lsn: int, segment_size: int) -> int:
    return lsn // segment_size


def parse_segment(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, segment number) of a segment file name."""
    if not SEGMENT.fullmatch(name):
        raise ValueError(f"'{name[:40]}' is not a WAL segment name (24 hex digits)")
    return int(name[:8], 16), int(name[8:16], 16) * segments_per_xlogid(segment_size) + int(name[16:], 16)


def gaps(segnos: list[int]) -> list[tuple[int, int]]:
    """The missing runs (first, last) in a sorted list of segment numbers."""
    return [(a + 1, b - 1) for a, b in zip(segnos, segnos[1:], strict=False) if b > a + 1]


def stored_name(name: str, compression: str, encrypted: bool) -> str:
    return name + streams.EXTENSIONS[compression] + (".age" if encrypted else "")


# --- the archive ----------------------------------------------------------------------------------

@dataclass
class Timeline:
    """What is archived of one timeline of one system."""

    system_id: str
    timeline: int
    segment_size: int
    segnos: list[int] = field(default_factory=list)

    @property
    def first(self) -> str | None:
        return segment_name(self.timeline, self.segnos[0], self.segment_size) if self.segnos else None

    @property
    def last(self) -> str | None:
        return segment_name(self.timeline, self.segnos[-1], self.segment_size) if self.segnos else None

    def gap_names(self) -> list[str]:
        return [f"{segment_name(self.timeline, a, self.segment_size)}..{segment_name(self.timeline, b, self.segment_size)}"
                if b > a else segment_name(self.timeline, a, self.segment_size) for a, b in gaps(self.segnos)]

    def to_json(self) -> dict[str, Any]:
        return {"systemIdentifier": self.system_id, "timeline": self.timeline, "segments": len(self.segnos), "first": self.first,
                "last": self.last, "gaps": self.gap_names()}


class WalArchive:
    def __init__(self, backup_dir: Path, file_mode: int = 0o600, dir_mode: int = 0o700) -> None:
        self.root = backup_dir / WAL_DIR
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def _make_dirs(self, path: Path) -> None:
        missing = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=self.dir_mode)
            except FileExistsError:
                pass
            os.chmod(directory, self.dir_mode)

    def directory(self, system_id: str, name: str) -> Path:
        """Where a segment (its timeline's directory) or a history file of `system_id` lives."""
        if not system_id.isdigit():
            raise SidecarError(f"'{system_id[:40]}' is not a system identifier")
        if HISTORY.fullmatch(name):
            return self.root / system_id / "history"
        if not SEGMENT.fullmatch(name):
            raise NotFound(f"'{name[:40]}' is not a WAL segment or timeline history file name")
        return self.root / system_id / name[:8]

    def record(self, system_id: str, name: str) -> dict[str, Any] | None:
        path = self.directory(system_id, name) / (name + RECORD_SUFFIX)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SidecarError(f"the record of WAL file {name} cannot be read ({exc}); check {path} by hand") from None
        return data if isinstance(data, dict) else None

    def store(self, system_id: str, source: Path, compression: str, level: int, recipients: tuple[str, ...] | None) -> tuple[dict[str, Any], bool]:
        """Archive the completed WAL file `source` (a segment or a history file): encode it to a temporary name,
        fsync, rename, then write its record atomically. Returns (record, stored now); a file archived before
        with the same content is not stored again, with another content it is an error (never overwritten)."""
        name = source.name
        raw_sha, raw_size = streams.file_sha256(source)
        existing = self.record(system_id, name)
        if existing is not None:
            if existing.get("rawSha256") == raw_sha:
                return existing, False
            raise SidecarError(f"WAL file {name} of system {system_id} is archived already with another content (sha256 {existing.get('rawSha256')}, "
                               f"now {raw_sha}); two servers with one system identifier? nothing was overwritten, check {source}")
        directory = self.directory(system_id, name)
        self._make_dirs(directory)
        encrypted = bool(recipients)
        final = directory / stored_name(name, compression, encrypted)
        tmp = directory / ("." + final.name + ".tmp")
        streams.remove_quietly(tmp)
        out = streams.HashingFile(tmp)
        try:
            with streams.open_stored(source) as handle:
                streams.encode(handle, out, compression, level, recipients if encrypted else None)
            checksum = out.close()
        except BaseException:
            out.abort()
            raise
        os.chmod(tmp, self.file_mode)
        os.rename(tmp, final)
        record = {"name": name, "file": final.name, "sha256": checksum, "size": out.size, "rawSha256": raw_sha, "rawSize": raw_size,
                  "compression": compression, "encrypted": encrypted, "archivedAt": iso_timestamp(datetime.now(UTC))}
        write_atomically(directory / (name + RECORD_SUFFIX), json.dumps(record, sort_keys=True).encode() + b"\n", self.file_mode)
        return record, True

    def fetch(self, system_id: str, name: str, dest: Path, identities: age.Identities | None) -> None:
        """Decode an archived WAL file into `dest` atomically: NotFound if it is not archived, ChecksumMismatch
        (naming it) if the stored file is not what was archived."""
        self.check(system_id, name)  # before anything is written: a damaged file never reaches the server
        record = self.record(system_id, name)
        assert record is not None
        stored = self.directory(system_id, name) / str(record["file"])
        if record.get("encrypted") and identities is None:
            raise SidecarError(f"WAL file {name} is encrypted; set BACKUP_ENCRYPTION_IDENTITY_FILE to the age secret key file")
        tmp = dest.with_name("." + dest.name + ".sidecar.tmp")
        streams.remove_quietly(tmp)
        out = streams.HashingFile(tmp)
        try:
            with streams.open_stored(stored) as handle:
                tap = streams.ReadTap(handle, hashing=True)
                streams.decode(tap, out, str(record.get("compression", "none")), identities if record.get("encrypted") else None)
            raw = out.close()
            if tap.hexdigest() != record.get("sha256") or raw != record.get("rawSha256"):
                raise ChecksumMismatch(f"WAL file {name}: what was read back does not match its record; the archived segment is damaged")
        except BaseException:
            out.abort()
            raise
        os.rename(tmp, dest)

    def check(self, system_id: str, name: str) -> None:
        """ChecksumMismatch naming the file if the stored file of an archived WAL file is not what its record says."""
        record = self.record(system_id, name)
        if record is None:
            raise NotFound(f"WAL file {name} is not in the archive of system {system_id}")
        directory = self.directory(system_id, name)
        stored = directory / str(record.get("file", ""))
        if not stored.is_file() or stored.parent != directory:
            raise ChecksumMismatch(f"WAL file {name}: its stored file is missing; the archive is damaged")
        digest, size = streams.file_sha256(stored)
        if digest != record.get("sha256") or size != record.get("size"):
            raise ChecksumMismatch(f"WAL segment {name} is damaged: {stored.name} has sha256 {digest[:16]}..., its record says "
                                   f"{str(record.get('sha256'))[:16]}...; restore to an earlier point or from another copy")

    def timelines(self) -> list[Timeline]:
        """Every (system, timeline) with archived segments, and their segment numbers (sorted)."""
        found: list[Timeline] = []
        if not self.root.is_dir():
            return found
        for system in sorted(p for p in self.root.iterdir() if p.name.isdigit() and p.is_dir()):
            for tli_dir in sorted(p for p in system.iterdir() if re.fullmatch(r"[0-9A-F]{8}", p.name) and p.is_dir()):
                names = sorted(n[: -len(RECORD_SUFFIX)] for n in os.listdir(tli_dir) if n.endswith(RECORD_SUFFIX) and SEGMENT.fullmatch(n[:24]))
                size = segment_size_of(system)
                found.append(Timeline(system.name, int(tli_dir.name, 16), size, [parse_segment(n, size)[1] for n in names]))
        return found

    def has_segments(self, system_id: str, timeline: int, first: int, last: int, segment_size: int) -> str | None:
        """None if every segment first..last of the timeline is archived, else the name of the first missing one."""
        for segno in range(first, last + 1):
            name = segment_name(timeline, segno, segment_size)
            if not (self.directory(system_id, name) / (name + RECORD_SUFFIX)).exists():
                return name
        return None


# --- the receiver's spool: WAL flushed but not archived yet ------------------------------------------------------------

SPOOL_SYSTEM_FILE = ".system_identifier"  # the spool's marker: the system whose WAL it holds
PARTIAL = ".partial"
LONG_HEADER = struct.Struct("<HHIQI4xQII")  # XLogLongPageHeaderData: magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz


def segment_header(path: Path) -> tuple[int, int, str, int] | None:
    """(timeline, page address, system identifier, segment size) from a segment file's first page (its long header);
    None if the file is shorter than that header or the header is all zeros (pg_receivewal pads a new .partial)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(LONG_HEADER.size)
    except OSError:
        return None
    if len(head) < LONG_HEADER.size or not any(head):
        return None
    _magic, _info, timeline, pageaddr, _rem, sysid, seg_size, _blcksz = LONG_HEADER.unpack(head)
    return timeline, pageaddr, str(sysid), seg_size


def spool_segment(spool: Path, system_id: str, name: str) -> Path | None:
    """The receiver's own copy of segment `name` of `system_id` in its spool, for a restore that finds it not archived:
    the completed file (the receiver was stopped before archiving it) or its `.partial` (the WAL flushed so far;
    pg_receivewal pads it with zeros, where recovery sees the end of the WAL). No sha256 was recorded for these, so
    what is checked instead: the spool is marked as `system_id`'s, and the file's first page header names this system,
    this timeline and this segment's position. None if there is no such file or it fails a check."""
    if not SEGMENT.fullmatch(name):
        return None
    try:
        if (spool / SPOOL_SYSTEM_FILE).read_text().strip() != system_id:
            return None
    except OSError:
        return None
    for candidate in (spool / name, spool / (name + PARTIAL)):
        header = segment_header(candidate)
        if header is None:
            continue
        timeline, pageaddr, sysid, seg_size = header
        if seg_size <= 0 or seg_size & (seg_size - 1):
            continue
        expected_timeline, segno = parse_segment(name, seg_size)
        if sysid == system_id and timeline == expected_timeline and pageaddr == segno * seg_size:
            return candidate
    return None


def copy_into_place(source: Path, dest: Path) -> None:
    """Copy `source` to `dest` through a temporary name (a reader of `dest` never sees half a file)."""
    tmp = dest.with_name("." + dest.name + ".sidecar.tmp")
    streams.remove_quietly(tmp)
    try:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        streams.remove_quietly(tmp)
        raise
    os.rename(tmp, dest)


SIZE_FILE = "segment_size"


def segment_size_of(system_dir: Path) -> int:
    try:
        return int((system_dir / SIZE_FILE).read_text().strip())
    except (OSError, ValueError):
        return 16 << 20


def record_segment_size(archive: WalArchive, system_id: str, size: int) -> None:
    directory = archive.root / system_id
    archive._make_dirs(directory)
    path = directory / SIZE_FILE
    if not path.exists():
        write_atomically(path, f"{size}\n".encode(), archive.file_mode)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- gaps, for the daemon: the receiver notes each one, the daemon answers with a base backup -------------------------

GAP_FILE = ".gap.json"  # wal/.gap.json: the newest gap the receiver saw {"at", "systemIdentifier", "reason"}


def note_gap(backup_dir: Path, system_id: str, reason: str, file_mode: int = 0o600) -> None:
    """Record that the archive of `system_id` has a gap now (written atomically; the newest gap wins). A volume that
    cannot take it is a warning in the caller's log, never a receiver failure."""
    root = backup_dir / WAL_DIR
    record = {"at": iso_timestamp(datetime.now(UTC)), "systemIdentifier": system_id, "reason": reason}
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(root / GAP_FILE, json.dumps(record).encode() + b"\n", file_mode)
    except OSError as exc:
        import logging

        logging.getLogger(__name__).warning("cannot note the WAL gap on the volume (%s): the daemon will not answer it with a base backup",
                                            exc.strerror or exc)


def last_gap(backup_dir: Path) -> dict[str, Any] | None:
    """The newest gap noted by the receiver, or None."""
    try:
        data = json.loads((backup_dir / WAL_DIR / GAP_FILE).read_bytes())
        datetime.fromisoformat(str(data["at"]).replace("Z", "+00:00"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None
