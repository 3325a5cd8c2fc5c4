"""Exact per-table row counts read from pg_dump's own output as it streams by: one pass over the data.

pg_dump writes every table's rows as COPY text, one row per line (newlines inside values are escaped
as `\\n`), ended by a `\\.` line. Counting the lines of each table's COPY data as the bytes go to the
backup file gives the same exact counts as `count(*)` in the dump's own snapshot, without a second scan
of every table on the server.

Two layouts are read:
- the custom format (`pg_dump -Fc -Z0`, see pg_dump's pg_backup_archiver.c WriteHead/WriteToc and
  pg_backup_custom.c): a header, the table of contents (which dump id is the TABLE DATA of which table),
  then the data blocks: a block type byte, the entry's dump id, then length-prefixed chunks up to a zero
  length (with -Z0 pg_dump writes one chunk per row). Large objects (BLK_BLOBS) are skipped.
- the plain format: `COPY schema.table (...) FROM stdin;` sections up to their `\\.` line.

Memory is bounded: chunk payloads are counted where they lie (bytes.count), never kept; only the table
of contents and a few bytes across a read boundary are held. Anything unexpected (a truncated stream, an
archive version newer than this code knows) makes `result()` raise DumpCountError, and the caller falls
back to counting in the snapshot.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from sidecar import age
from sidecar.errors import SidecarError

NL = b"\n"
BLK_DATA, BLK_BLOBS = 1, 3
MAX_VERSION = (1, 16)  # newest archive version this reader knows (pg_dump 17/18)


class DumpCountError(SidecarError):
    """pg_dump's output could not be read for row counts (truncated, or a layout this code does not know)."""


class RowCounter(Protocol):
    def feed(self, data: bytes) -> None: ...
    def result(self) -> dict[tuple[str, str], int]: ...


def row_counter(fmt: str) -> RowCounter:
    """A counter for pg_dump's output in `fmt` ("custom": -Fc -Z0, "plain": -Fp)."""
    return CustomCounter() if fmt == "custom" else PlainCounter()


def count_dump(chunks: Iterable[bytes], fmt: str) -> dict[tuple[str, str], int]:
    counter = row_counter(fmt)
    for chunk in chunks:
        counter.feed(chunk)
    return counter.result()


def keyed(counts: dict[tuple[str, str], int], tables: list[tuple[str, str]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The counts keyed as `count_rows` keys them ("schema.table", in its table order), for the tables in
    `tables` (the catalog's list: extension tables pg_dump also dumps are left out), and the tables of that
    list the dump had no data for."""
    out: dict[str, int] = {}
    missing = []
    for schema, table in tables:
        if (schema, table) in counts:
            out[f"{schema}.{table}"] = counts[(schema, table)]
        else:
            missing.append((schema, table))
    return out, missing


class CountingReader:
    """Passes reads through and feeds every byte to a row counter (the tap on pg_dump's output). A counter
    that fails stops counting but never stops the backup stream: the failure is kept for `result()`."""

    def __init__(self, reader: age.Readable, counter: RowCounter) -> None:
        self._reader, self._counter = reader, counter
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._reader.read(size)
        if self.error is None and data:
            try:
                self._counter.feed(data)
            except Exception as exc:  # reported by result(): the dump itself goes on
                self.error = exc
        return data

    def result(self) -> dict[tuple[str, str], int]:
        if self.error is not None:
            raise DumpCountError(f"pg_dump output not understood: {self.error}")
        return self._counter.result()


def _decode(raw: bytes, encoding: str) -> str:
    from psycopg._encodings import pg2pyenc

    try:
        codec = pg2pyenc(encoding.encode())
    except Exception:
        codec = "utf-8"
    return raw.decode(codec, errors="surrogateescape")


# the end of a table's COPY data: a `\.` line (then pg_dump's two blank lines), at a line start
_TERMINATOR = re.compile(rb"\n\\\.\n*\Z")
_ENCODING = re.compile(rb"SET client_encoding = '([^']*)';")


class TocEntry(NamedTuple):
    """What a loader needs of one table-of-contents entry (the definitions themselves are not kept)."""

    dump_id: int
    desc: bytes
    had_dumper: bool  # the entry has a data block (TABLE DATA, large objects)
    namespace: bytes
    tag: bytes
    copy: bytes  # for TABLE DATA: pg_dump's `COPY schema.table (columns) FROM stdin;`


class _Short(Exception):
    """Not enough bytes buffered yet."""


# the end of a chunk (a row's newline) and the next chunk's length (sign byte 0, 4 bytes little-endian); COPY text never
# holds a NUL byte and holds a raw newline only at a row's end, so from a chunk boundary after a newline this matches
# exactly once per chunk and takes the whole next length with it
_CHUNK_END = re.compile(rb"\n\x00(....)", re.DOTALL)
ZERO = bytes(4)  # a zero length: the end of the table's data
FIRST_WINDOW, LAST_WINDOW = 4096, 1 << 20  # bytes searched at once: small first (a small table ends soon), then doubled


def _stretch(buf: bytes, pos: int, stop: int) -> tuple[int, int, bool | None]:
    """Chunks from the boundary `pos` (buf[pos - 1] is a newline), found in buf[pos - 1:stop] by _CHUNK_END, all but
    the last two found (and none from a zero length on, the table's end): those are left to the exact stepping, with
    whatever crosses the read's end. The stretch is taken only as pg_dump writes it: the first match at `pos`, the
    lengths' sum landing on the last match kept, and exactly one newline per chunk (outside the lengths' bytes). The
    regular expression can only lose step after a chunk that does not end with a newline, which the last check rules
    out. Returns (where the stepping goes on, the rows of the stretch, True), (pos, 0, False) when there are too few
    chunks to gain from, or (pos, 0, None) when the chunks are not pg_dump's one row each (stepped through instead)."""
    found = _CHUNK_END.findall(buf, pos - 1, stop)
    try:
        keep = found.index(ZERO) - 2
    except ValueError:
        keep = len(found) - 2
    if keep < 1:
        return pos, 0, False
    heads = b"".join(found[:keep])
    ahead = pos + 5 * keep + sum(struct.unpack(f"<{keep}I", heads))  # where chunk number `keep` starts, if they chain
    if (buf[pos:pos + 5] != b"\x00" + found[0] or ahead + 5 > stop or buf[ahead - 1:ahead + 5] != b"\n\x00" + found[keep]
            or buf.count(NL, pos, ahead) != keep + heads.count(NL)):  # one row per chunk, each ending at its end
        return pos, 0, None
    return ahead, keep, True


class CustomCounter:
    """Row counts from a custom-format archive (pg_dump -Fc -Z0) fed in chunks of any size."""

    def __init__(self) -> None:
        self._buf = b""  # header/TOC bytes not parsed yet, or a few bytes of a block header cut by a read boundary
        self._pos = 0
        self._phase = "head"
        self._int = 4
        self._off = 8
        self._version = (0, 0, 0)
        self._toc_left = -1
        self._tables: dict[int, tuple[bytes, bytes]] = {}  # dump id of a TABLE DATA entry -> (schema, table)
        self.entries: list[TocEntry] = []  # the table of contents, once read
        self.toc_end = -1  # where the data blocks start: the length of the header and table of contents
        self._fed = 0
        self._encoding = "UTF8"
        self._counts: dict[tuple[bytes, bytes], int] = {}
        # data phase
        self._state = "block"  # block: type + id | chunk: a chunk length | payload | oid: a large object's oid
        self._kind = 0
        self._entry: tuple[bytes, bytes] | None = None  # table whose rows are being counted, None when skipping
        self._remaining = 0  # bytes left in the current chunk
        self._rows = 0
        self._tail = NL  # the table's last COPY bytes (17 at most) after a NL for its start: where its `\\.` line is
        self._unpack: Callable[[bytes, int], tuple[int, int]] | None = None
        self.fast_bytes = 0  # data bytes read by _stretch rather than stepped through (for tests)

    # -- primitives over self._buf / self._pos (header and TOC)
    def _need(self, n: int) -> None:
        if self._pos + n > len(self._buf):
            raise _Short

    def _byte(self) -> int:
        self._need(1)
        self._pos += 1
        return self._buf[self._pos - 1]

    def _intval(self) -> int:
        self._need(1 + self._int)
        sign = self._buf[self._pos]
        value = int.from_bytes(self._buf[self._pos + 1:self._pos + 1 + self._int], "little")
        self._pos += 1 + self._int
        return -value if sign else value

    def _str(self) -> bytes | None:
        length = self._intval()
        if length < 0:
            return None
        self._need(length)
        self._pos += length
        return self._buf[self._pos - length:self._pos]

    def feed(self, data: bytes) -> None:
        self._fed += len(data)
        if self._phase == "data":
            self._data(self._buf + data if self._buf else data)
            return
        if self._phase == "done":
            if data:
                raise DumpCountError("bytes after the end of the archive")
            return
        self._buf = self._buf[self._pos:] + data
        self._pos = 0
        try:
            if self._phase == "head":
                try:
                    self._head()
                except _Short:
                    self._pos = 0
                    raise
                self._phase = "toc"
            while self._toc_left != 0:
                start = self._pos
                try:
                    self._toc_entry()
                except _Short:
                    self._pos = start
                    raise
        except _Short:
            return
        self._phase = "data"
        rest, self._buf, self._pos = self._buf[self._pos:], b"", 0
        self.toc_end = self._fed - len(rest)
        if rest:
            self._data(rest)

    def _head(self) -> None:
        self._need(11)
        if self._buf[:5] != b"PGDMP":
            raise DumpCountError("not a pg_dump custom-format archive (no PGDMP header)")
        self._version = (self._buf[5], self._buf[6], self._buf[7])
        if self._version[:2] > MAX_VERSION or self._version[:2] < (1, 12):
            raise DumpCountError(f"archive version {'.'.join(map(str, self._version))} is not one this reader knows")
        self._int, self._off, fmt = self._buf[8], self._buf[9], self._buf[10]
        if self._int == 4:
            self._unpack = struct.Struct("<BI").unpack_from
        if fmt != 1:
            raise DumpCountError(f"archive format {fmt} is not the custom format")
        self._pos = 11
        if self._version[:2] >= (1, 15):
            algorithm = self._byte()
            if algorithm != 0:
                raise DumpCountError("the archive's data is compressed (row counts need pg_dump -Z0)")
        elif self._intval() != 0:
            raise DumpCountError("the archive's data is compressed (row counts need pg_dump -Z0)")
        for _ in range(7):  # creation time
            self._intval()
        for _ in range(3):  # database name, server and pg_dump versions
            self._str()
        self._toc_left = self._intval()

    def _toc_entry(self) -> None:
        dump_id = self._intval()
        had_dumper = self._intval()
        self._str()  # catalog table oid
        self._str()  # oid
        tag = self._str()
        desc = self._str()
        self._intval()  # section
        defn = self._str()
        self._str()  # drop statement
        copy = self._str()
        namespace = self._str()
        self._str()  # tablespace
        self._str()  # table access method
        if self._version[:2] >= (1, 16):
            self._intval()  # relkind
        self._str()  # owner
        self._str()  # "false" (with oids)
        while self._str() is not None:  # dependencies
            pass
        self._byte()  # offset flag
        self._need(self._off)
        self._pos += self._off
        self.entries.append(TocEntry(dump_id, desc or b"", bool(had_dumper), namespace or b"", tag or b"", copy or b""))
        if desc == b"TABLE DATA":
            self._tables[dump_id] = (namespace or b"", tag or b"")
        elif desc == b"ENCODING" and defn and (m := _ENCODING.search(defn)):
            self._encoding = m.group(1).decode("ascii", "replace")
        self._toc_left -= 1

    # -- data blocks
    def _data(self, buf: bytes) -> None:
        self._buf = b""
        pos, end = 0, len(buf)
        isz = 1 + self._int
        while pos < end:
            state = self._state
            if state == "chunk":
                pos = self._chunks(buf, pos)
                if self._state == "chunk":  # a chunk length cut by the read boundary
                    break
            elif state == "payload":
                stop = min(end, pos + self._remaining)
                self._remaining -= stop - pos
                if self._remaining == 0:
                    self._state = "chunk"
                if self._entry is not None:
                    self._rows += buf.count(NL, pos, stop)
                    self._tail = (self._tail + buf[max(pos, stop - 17):stop])[-17:]
                pos = stop
            elif state == "block":
                if pos + 1 + isz > end:
                    break
                kind = buf[pos]
                dump_id = self._int_at(buf, pos + 1)
                pos += 1 + isz
                self._kind = kind
                if kind == BLK_DATA:
                    self._entry = self._tables.get(dump_id)
                    if self._entry is not None and self._entry in self._counts:
                        raise DumpCountError(f"two data blocks for table {self._entry!r}")
                    self._rows, self._tail = 0, NL
                    self._state = "chunk"
                elif kind == BLK_BLOBS:
                    self._entry = None
                    self._state = "oid"
                else:
                    raise DumpCountError(f"unknown data block type {kind}")
            else:  # "oid": the next large object of a BLK_BLOBS block, 0 at its end
                if pos + isz > end:
                    break
                oid = self._int_at(buf, pos)
                pos += isz
                self._state = "chunk" if oid else "block"
        self._buf = buf[pos:]

    def _chunks(self, buf: bytes, pos: int) -> int:
        """The hot loop: length-prefixed chunks (one per row with -Z0) from `pos`, their newlines counted in C
        (bytes.count). Where a chunk ends with a newline, the stretch of chunks after it is read by `_stretch` (a
        regular expression, in C); otherwise, and for the last two chunks before the end of a read or of the table,
        Python steps from one length to the next. Returns where it stopped."""
        end = len(buf)
        isz = 1 + self._int
        unpack = self._unpack
        count = buf.count
        begin, prev, last, stop = pos, -1, -1, -1
        rows = self._rows
        ended = False
        fast, window, wait = isz == 5, FIRST_WINDOW, 0
        while pos + isz <= end:
            if fast and not wait and pos and buf[pos - 1] == 10:
                ahead, found, quick = _stretch(buf, pos, min(end, pos + window))
                if quick is None:  # not what pg_dump writes: step through the rest of this read
                    fast = False
                elif ahead > pos:
                    rows += found
                    self.fast_bytes += ahead - pos
                    pos = ahead
                    window = min(window * 2, LAST_WINDOW)
                    continue
                else:  # too few chunks in the window: step two before looking again
                    wait = 2
            wait = max(wait - 1, 0)
            if unpack is not None:
                sign, length = unpack(buf, pos)
            else:
                sign, length = buf[pos], int.from_bytes(buf[pos + 1:pos + isz], "little")
            if sign:
                raise DumpCountError("negative chunk length")
            if length == 0:
                pos += isz
                ended = True
                break
            start = pos + isz
            stop = start + length
            if stop > end:  # the chunk goes on in the next read
                self._state, self._remaining = "payload", stop - end
                stop = end
            rows += count(NL, start, stop)
            prev, last = last, start
            pos = stop
        entry = self._entry
        if entry is None:
            self._rows = 0
        else:
            self._rows = rows
            if last >= 0:
                # the payload's last bytes, for the `\\.` line: the last two chunks, after what came before
                # them if nothing was stepped over (else a byte that matches nothing: a miss, never a false match)
                first = prev if prev >= 0 else last
                base = self._tail if first - isz == begin else b"\x00"
                earlier = buf[max(prev, last - isz - 17):last - isz] if prev >= 0 else b""
                self._tail = (base + earlier + buf[max(last, stop - 17):stop])[-17:]
        if ended:
            if self._kind == BLK_BLOBS:
                self._state = "oid"
            else:
                self._state = "block"
                if entry is not None:
                    self._finish_table(entry)
        return pos

    def _int_at(self, buf: bytes, pos: int) -> int:
        value = int.from_bytes(buf[pos + 1:pos + 1 + self._int], "little")
        return -value if buf[pos] else value

    def _finish_table(self, entry: tuple[bytes, bytes]) -> None:
        match = _TERMINATOR.search(self._tail)
        if match is None:
            raise DumpCountError(f"table {entry!r}: its COPY data does not end with a \\. line")
        self._counts[entry] = self._rows - (len(match.group()) - 3)
        self._entry = None

    def result(self) -> dict[tuple[str, str], int]:
        if self._phase != "data" or self._state != "block" or self._buf:
            raise DumpCountError("the archive ended early (truncated)")
        missing = [t for t in self._tables.values() if t not in self._counts]
        if missing:
            raise DumpCountError(f"no data block for table {missing[0]!r}")
        return {(_decode(s, self._encoding), _decode(t, self._encoding)): n for (s, t), n in self._counts.items()}


_IDENT = rb'(?:"(?:[^"]|"")*"|[^\s".()]+)'
# pg_dump's `COPY schema.table (columns) FROM stdin;` (two spaces and no list for a table with no columns)
_COPY = re.compile(rb"COPY (" + _IDENT + rb")\.(" + _IDENT + rb') (?:\((?:"(?:[^"]|"")*"|[^")])*\) )? ?FROM stdin;\n')
_LONGEST_COPY = 1 << 20  # a COPY statement is shorter than this (1600 columns of 63-byte quoted names)
_DUMP_END = b"-- PostgreSQL database dump complete"


def _unquote(ident: bytes) -> bytes:
    return ident[1:-1].replace(b'""', b'"') if ident.startswith(b'"') else ident


class PlainCounter:
    """Row counts from a plain-format dump (pg_dump -Fp): the lines of each `COPY ... FROM stdin;` section
    up to its `\\.` line. A COPY statement is recognized at a line start outside the data; the statements
    pg_dump writes for the schema could, in theory, hold such a line inside a quoted function body or
    comment: a table seen twice is an error (the caller then counts in the snapshot)."""

    def __init__(self) -> None:
        self._buf = b""  # in "sql": text from a line start not searched yet; in "data": the byte before the uncounted data, then it
        self._state = "sql"
        self._table: tuple[bytes, bytes] = (b"", b"")
        self._rows = 0
        self._counts: dict[tuple[bytes, bytes], int] = {}
        self._encoding, self._encoding_seen = "UTF8", False
        self._end = b""  # the stream's last bytes: a complete dump ends with pg_dump's closing comment

    def feed(self, data: bytes) -> None:
        self._end = (self._end + data[-256:])[-256:]
        self._run(self._buf + data if self._buf else data, final=False)

    def _run(self, buf: bytes, final: bool) -> None:
        pos = 0
        while True:
            if self._state == "data":
                found = buf.find(b"\n\\.\n", pos)
                if found < 0:
                    keep = max(pos, len(buf) - 4)
                    self._rows += buf.count(NL, pos + 1, keep + 1)
                    self._buf = buf[keep:]
                    return
                self._rows += buf.count(NL, pos + 1, found + 1)
                if self._table in self._counts:
                    raise DumpCountError(f"two COPY sections for table {self._table!r}")
                self._counts[self._table] = self._rows
                pos = found + 4
                self._state = "sql"
                continue
            if not self._encoding_seen and (m := _ENCODING.search(buf, pos)):
                self._encoding, self._encoding_seen = m.group(1).decode("ascii", "replace"), True
            found = buf.find(b"\nCOPY ", pos)
            if found < 0:
                self._buf = buf[max(pos, len(buf) - 5):]
                return
            match = _COPY.match(buf, found + 1)
            if match is None:
                if len(buf) - found < _LONGEST_COPY and not final:  # maybe cut by the read boundary: wait for more
                    self._buf = buf[found:]
                    return
                pos = found + 1
                continue
            self._table = (_unquote(match.group(1)), _unquote(match.group(2)))
            self._rows = 0
            self._state = "data"
            pos = match.end() - 1  # the statement's newline: the byte before the data

    def result(self) -> dict[tuple[str, str], int]:
        if self._state == "sql" and self._buf:
            self._run(self._buf, final=True)
        if self._state != "sql" or _DUMP_END not in self._end:
            raise DumpCountError("the dump ended early (truncated)")
        return {(_decode(s, self._encoding), _decode(t, self._encoding)): n for (s, t), n in self._counts.items()}
