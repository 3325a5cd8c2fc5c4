"""`pitr find`: the transaction that dropped a table, emptied it, or last wrote to it before a time, read from the
archived WAL with pg_waldump, and the recovery target that stops just before it.

What WAL says about a table, by its OID (which never changes while the table lives) and its file (relfilenode):
- DROP TABLE: the dropping transaction's COMMIT record lists `dropped stats: 2/<db oid>/<table oid>` (PostgreSQL 15+);
- TRUNCATE (and VACUUM FULL, CLUSTER, a rewriting ALTER TABLE): the transaction takes an ACCESS EXCLUSIVE lock, logged
  as a Standby `LOCK xid X db D rel <table oid>` record, and its COMMIT lists the table's old files under `rels:`;
- INSERT / UPDATE / DELETE / COPY: Heap and Heap2 records on the table's file (`--relation=spc/db/relfilenode`).

The OID of a table that still exists comes from the live catalog. A dropped table is no longer in it: its OID is read
from the catalog of a scratch server restored to the end of the newest good base backup that has it (or to
`--existed-at T`), the same scratch PostgreSQL a point-in-time restore uses. WAL alone cannot give it (pg_class rows
are not printed by pg_waldump), and a logical backup's OIDs belong to whichever incarnation it dumped."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import age
from sidecar.config import Config
from sidecar.errors import SidecarError, UsageError
from sidecar.physical.base import BaseBackup, list_base_backups
from sidecar.physical.pitr import ScratchServer, Target, _partial, resolve_timeline, restore_to_data_dir, scratch_directory, wal_chain, waldump_tool
from sidecar.physical.wal import WalArchive, format_lsn, parse_lsn
from sidecar.repository import iso_timestamp

log = logging.getLogger(__name__)

KINDS = ("dropped", "truncated", "last-write")


class NothingFound(SidecarError):
    """The table is unknown, or no transaction of the kind asked for is in the archived WAL (exit 1)."""


@dataclass(frozen=True)
class Table:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{_ident(self.schema)}.{_ident(self.name)}"


def _ident(part: str) -> str:
    return part if re.fullmatch(r"[a-z_][a-z0-9_$]*", part) else '"' + part.replace('"', '""') + '"'


def parse_table(text: str) -> Table:
    """`schema.name`, either part in double quotes when it needs them (`"Sales"."Q1 orders"`), as psql prints it."""
    parts: list[str] = []
    i, text = 0, text.strip()
    while i <= len(text):
        if text[i:i + 1] == '"':
            j, part = i + 1, ""
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise UsageError(f"table {text!r}: unbalanced double quote; give it as schema.name")
                part += text[j:k]
                if text[k + 1:k + 2] == '"':
                    part, j = part + '"', k + 2
                    continue
                i = k + 1
                break
        else:
            k = text.find(".", i)
            k = len(text) if k < 0 else k
            part, i = text[i:k], k
            if part != part.strip() or not part:
                raise UsageError(f"table {text!r}: give it as schema.name (e.g. public.orders)")
            part = part.lower()  # unquoted: folded to lower case, as PostgreSQL does
        parts.append(part)
        if i == len(text):
            break
        if text[i] != ".":
            raise UsageError(f"table {text!r}: give it as schema.name (e.g. public.orders)")
        i += 1
    if len(parts) != 2 or not all(parts) or any(len(p.encode()) > 63 for p in parts):
        raise UsageError(f"table {text!r}: give it as schema.name (e.g. public.orders), each part at most 63 bytes")
    return Table(parts[0], parts[1])


@dataclass
class Moment:
    """A transaction found in the WAL and the target that stops just before it."""

    table: str
    kind: str  # dropped | truncated | last-write
    xid: int
    committed_at: str
    lsn: str
    segment: str
    base_backup: str
    segments_searched: int
    what: str
    archived: bool = True  # False: found in the receiver's newest segment, not archived yet (a restore cannot reach it yet)

    def restore_command(self) -> str:
        return f"pg-backup-sidecar restore --to-xid {self.xid} --exclusive --table {_shell(self.table)}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "target": {"to_xid": self.xid, "exclusive": True}, "restore_command": self.restore_command()}


def _shell(text: str) -> str:
    import shlex

    return shlex.quote(text)


# --- reading pg_waldump's lines (pure) -------------------------------------------------------------

RECORD = re.compile(r"rmgr: (\w+)\s+len \(rec/tot\):\s*\d+/\s*\d+, tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F/]+, desc: (.*)$")
END = re.compile(r"^(COMMIT|ABORT)(?:_PREPARED (\d+):)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC(.*)$")
LOCK = re.compile(r"xid (\d+) db (\d+) rel (\d+)")
WRITES = frozenset({"INSERT", "MULTI_INSERT", "UPDATE", "HOT_UPDATE", "DELETE", "TRUNCATE"})


@dataclass(frozen=True)
class Record:
    rmgr: str
    xid: int
    lsn: int
    desc: str


@dataclass(frozen=True)
class End:
    """A COMMIT or ABORT record: the transaction (top level), its subtransactions, what it dropped."""

    committed: bool
    xid: int
    lsn: int
    at: datetime
    subxacts: frozenset[int]
    rels: tuple[str, ...]
    dropped: frozenset[str]  # "2/<db>/<oid>" of each relation whose statistics it dropped (a DROP)


def parse_record(line: str) -> Record | None:
    match = RECORD.search(line.rstrip("\n"))
    if not match:
        return None
    return Record(match.group(1), int(match.group(2)), parse_lsn(match.group(3)), match.group(4))


def parse_end(record: Record) -> End | None:
    match = END.match(record.desc)
    if record.rmgr != "Transaction" or not match:
        return None
    kind, prepared, when, rest = match.groups()
    parts = {p.split(":", 1)[0].strip(): p.split(":", 1)[1].split() for p in rest.split(";") if ":" in p}
    return End(kind == "COMMIT", int(prepared or record.xid), record.lsn, datetime.fromisoformat(when).replace(tzinfo=UTC),
               frozenset(int(x) for x in parts.get("subxacts", []) if x.isdigit()), tuple(parts.get("rels", [])),
               frozenset(parts.get("dropped stats", [])))


def locks(record: Record) -> list[tuple[int, int, int]]:
    """(xid, database oid, relation oid) of each ACCESS EXCLUSIVE lock a Standby LOCK record logs."""
    if record.rmgr != "Standby" or not record.desc.startswith("LOCK"):
        return []
    return [(int(x), int(d), int(r)) for x, d, r in LOCK.findall(record.desc)]


def is_write(record: Record) -> bool:
    return record.rmgr in ("Heap", "Heap2") and record.xid != 0 and record.desc.split(" ", 1)[0].split("+")[0] in WRITES


@dataclass
class Search:
    """What is looked for, fed the records of the WAL in order (pure). `found` is the newest match so far."""

    kind: str
    database: int
    oid: int
    before: datetime | None = None
    found: End | None = None
    done: bool = False

    def __post_init__(self) -> None:
        self.locked: set[int] = set()  # (sub)transactions that took an ACCESS EXCLUSIVE lock on the table, not ended yet
        self.wrote: set[int] = set()  # (sub)transactions that wrote rows of the table, not ended yet

    def feed(self, record: Record) -> None:
        end = parse_end(record)
        if end is None:
            if self.kind != "dropped" and any(d == self.database and r == self.oid for _x, d, r in locks(record)):
                self.locked.add(record.xid)
            elif self.kind == "last-write" and is_write(record):
                self.wrote.add(record.xid)
            return
        ours = {end.xid, *end.subxacts}
        locked, wrote = bool(self.locked & ours), bool(self.wrote & ours)
        self.locked -= ours
        self.wrote -= ours
        if not end.committed:
            return
        if self.before is not None and end.at >= self.before:
            self.done = True  # commits come in time order: nothing later can be before `before`
            return
        if self.kind == "dropped":
            if f"2/{self.database}/{self.oid}" in end.dropped:
                self.found, self.done = end, True
        elif (locked and bool(end.rels)) or (wrote and self.kind == "last-write"):
            self.found = end  # a locker that replaced the table's files (TRUNCATE, a rewrite); or a writer of its rows


# --- the archive ------------------------------------------------------------------------------------


def _waldump(tool: str, directory: Path, args: list[str]) -> Iterator[Record]:
    from sidecar.postgres import base_env

    proc = subprocess.Popen([tool, "--path", str(directory), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=base_env(), cwd=directory)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for line in proc.stdout:
            record = parse_record(line)
            if record is not None:
                yield record
        error = proc.stderr.read(4096)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    unreadable = ("invalid magic number", "could not open", "WAL segment size", "could not read file", "unrecognized", "invalid option")
    if proc.returncode != 0 and any(text in error for text in unreadable):
        raise SidecarError(f"pg_waldump cannot read the WAL in {directory.name}: {error.strip()[:300]}")


def scan(config: Config, archive: WalArchive, system: str, chain: list[str], search: Search, tool: str, relation: str | None,
         segment_size: int, partial: Path | None = None) -> int:
    """Feed every record of `chain` that matters to `search`, a segment at a time, then of the receiver's `partial`
    segment if given; the number of segments read. Each segment is decoded into a scratch directory (sha256 checked)
    beside the next one, so that a record that starts in it and ends in the next is read whole (pg_waldump reads
    both, the records that start in the next are left to its own turn); then removed: two segments on disk at most."""
    from sidecar.physical.wal import parse_segment

    identity = age.parse_identities(config.identity_file) if config.identity_file else None
    names = [*chain, *([partial.name] if partial else [])]
    read = 0
    with tempfile.TemporaryDirectory(prefix="pg-backup-sidecar-find-") as scratch:
        directory = Path(scratch)

        def materialize(name: str) -> Path:
            path = directory / name.removesuffix(".partial")
            if not path.exists():
                if partial is not None and name == partial.name:
                    shutil.copyfile(partial, path)  # not archived yet: the receiver's copy, as it has it now
                else:
                    archive.fetch(system, name, path, identity)
            return path

        for i, name in enumerate(names):
            path = materialize(name)
            following = materialize(names[i + 1]) if i + 1 < len(names) else None
            read += 1
            timeline, segno = parse_segment(path.name, segment_size)
            start, end = segno * segment_size, (segno + 1) * segment_size
            window = ["--timeline", str(timeline), "--start", format_lsn(start), "--end", format_lsn(end + (segment_size if following else 0))]
            passes = [["--rmgr=Heap", "--rmgr=Heap2", f"--relation={relation}"]] if relation is not None else []  # writes before ends
            passes.append(["--rmgr=Transaction", "--rmgr=Standby"])
            for args in passes:
                for record in _waldump(tool, directory, [*window, *args]):
                    if record.lsn >= end:
                        break  # it starts in the next segment: read in its own turn
                    search.feed(record)
                    if search.done:
                        return read
            path.unlink()
    return read


@dataclass(frozen=True)
class Identity:
    database: int
    oid: int
    relation: str | None  # tablespace/database/relfilenode of its main file (a table that exists)
    base: BaseBackup  # the scan starts at its start


def _live_identity(config: Config, table: Table) -> tuple[int, int, str] | None:
    from sidecar import postgres

    conn = postgres.connect(config)
    try:
        row = conn.execute(
            "SELECT c.oid, d.oid, CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END, pg_relation_filenode(c.oid) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_database d "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'm') AND d.datname = current_database()",
            (table.schema, table.name)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    return int(row[0]), int(row[1]), f"{row[2]}/{row[1]}/{row[3]}"


def _catalog_identity(config: Config, table: Table, target: Target) -> tuple[tuple[int, int] | None, str]:
    """The table's (oid, database oid) in the catalog of a scratch server restored to `target`; and the base backup used."""
    import psycopg

    root = scratch_directory()
    try:
        result = restore_to_data_dir(config, target, root / "data")
        server = ScratchServer(config, root, result.get("serverMajor"))
        url = server.start_promoted(config, target.describe())
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute("SELECT c.oid, d.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_database d "
                                   "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'm') AND d.datname = current_database()",
                                   (table.schema, table.name)).fetchone()
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return ((int(row[0]), int(row[1])) if row else None), str(result["baseBackup"])


def find_moment(config: Config, table_text: str, kind: str, before: datetime | None = None, existed_at: datetime | None = None) -> Moment:
    """The newest transaction of `kind` (dropped, truncated, last-write) on the table, committed before `before`."""
    if kind not in KINDS:
        raise UsageError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    table = parse_table(table_text)
    archive = WalArchive(config.backup_dir)
    candidates, path = resolve_timeline(archive, config, list_base_backups(config), Target("latest"))
    good = [b for b in candidates if b.good]  # newest first
    if not good:
        raise NothingFound("no good base backup: there is no archived WAL to search; take one with 'pg-backup-sidecar base-backup'")
    identity = _identify(config, table, kind, good, existed_at)
    meta = identity.base.metadata
    tool = waldump_tool(config, meta.get("serverMajor"))
    if tool is None:
        raise SidecarError(f"pg_waldump of PostgreSQL {meta.get('serverMajor')} is not here (it reads only its own major version's WAL); "
                           "set PG_BIN_DIR to that version's bin directory")
    system = str(meta["systemIdentifier"])
    chain = wal_chain(archive, meta, Target("latest"), path)
    search = Search(kind, identity.database, identity.oid, before)
    partial = _partial(config, system, chain, int(meta["walSegmentSize"])) if chain else None
    read = scan(config, archive, system, chain, search, tool, identity.relation if kind == "last-write" else None,
                int(meta["walSegmentSize"]), partial)
    span = f"segments {chain[0]}..{chain[-1]}" if chain else "no segments"
    if search.found is None:
        what = {"dropped": "dropped it", "truncated": "emptied or rewrote it (TRUNCATE, VACUUM FULL, CLUSTER, a rewriting ALTER TABLE)",
                "last-write": "wrote to it"}[kind]
        limit = f" before {iso_timestamp(before)}" if before else ""
        since = " since its files were last replaced (TRUNCATE or a rewrite)" if kind == "last-write" else ""
        raise NothingFound(f"no transaction {what}{limit} in the archived WAL of system {system} ({span} from base backup "
                           f"{identity.base.id} searched{since}); check the table name and 'list --wal'")
    found = search.found
    segment = chain[-1]
    for name in [*chain, *([partial.name.removesuffix(".partial")] if partial else [])]:
        if _segment_start(name, meta) <= found.lsn:
            segment = name
    archived = segment in chain
    what = {"dropped": f"dropped {table}", "truncated": f"emptied or rewrote {table} (TRUNCATE, VACUUM FULL, CLUSTER or a rewriting ALTER TABLE)",
            "last-write": f"last wrote to {table}" + (f" before {iso_timestamp(before)}" if before else "")}[kind]
    log.info("transaction %d %s, committed at %s", found.xid, what, iso_timestamp(found.at), extra={"event": "pitr_find", "xid": found.xid})
    committed = found.at.isoformat().replace("+00:00", "Z")  # to the microsecond, as PostgreSQL records it
    return Moment(str(table), kind, found.xid, committed, format_lsn(found.lsn), segment, identity.base.id, read, what, archived)


def _segment_start(name: str, meta: dict[str, Any]) -> int:
    from sidecar.physical.wal import parse_segment

    _timeline, segno = parse_segment(name, int(meta["walSegmentSize"]))
    return segno * int(meta["walSegmentSize"])


def _identify(config: Config, table: Table, kind: str, good: list[BaseBackup], existed_at: datetime | None) -> Identity:
    if kind != "dropped":
        live = _live_identity(config, table)
        if live is None:
            hint = f"; if it was dropped: pitr find --dropped-table {_shell(str(table))}"
            raise NothingFound(f"table {table} is not in database {config.database_name}{hint}")
        return Identity(live[1], live[0], live[2], good[-1])  # from the oldest good base backup: all the WAL a restore can reach
    tried: list[str] = []
    targets: Iterable[tuple[Target, BaseBackup | None]]
    if existed_at is not None:
        targets = [(Target("time", time=existed_at), None)]
    else:
        targets = [(Target("lsn", lsn=parse_lsn(b.metadata["endLsn"])), b) for b in good]
    for target, base in targets:
        log.info("looking %s up in the catalog of a scratch server restored to %s", table, target.describe())
        found, used = _catalog_identity(config, table, target)
        tried.append(used)
        if found is not None:
            oid, database = found
            _not_there_now(config, table, oid)
            chosen = base or next(b for b in good if b.id == used)
            return Identity(database, oid, None, chosen)
    if existed_at is not None:
        raise NothingFound(f"table {table} did not exist at {iso_timestamp(existed_at)}; check the name (schema.name), or give another "
                           "--existed-at T, a moment it existed")
    raise NothingFound(f"table {table} is in no good base backup ({', '.join(tried)}): it was created after the newest, or the name is "
                       "wrong (schema.name); give --existed-at T, a moment it existed (e.g. shortly before it was dropped)")


def _not_there_now(config: Config, table: Table, oid: int) -> None:
    from sidecar import postgres

    conn = postgres.connect(config)
    try:
        row = conn.execute("SELECT 1 FROM pg_class WHERE oid = %s AND relname = %s", (oid, table.name)).fetchone()
    finally:
        conn.close()
    if row is not None:
        raise NothingFound(f"table {table} (oid {oid}) was not dropped: it is in database {config.database_name} now; "
                           f"pitr find --truncated-table or --last-write-to {_shell(str(table))} --before T")
