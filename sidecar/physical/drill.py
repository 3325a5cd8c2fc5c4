"""PITR drills (issue 16): prove that point-in-time recovery gives back the right data, not only a server that starts.

A drill creates a restore point on the live server together with the exact row count of every table at that very
point, waits until the WAL holding it is archived, restores to it (base backup + archived WAL, sidecar/physical/pitr.py)
into a scratch server, and compares the counts. The outcome is recorded on the volume (wal/.pitr-drill.json), where the
daemon's metrics read it, whichever process ran the drill.

Why the counts match the restore point exactly, with writes going on (the choice, and what it costs):
a restore point is a WAL record, not part of any snapshot. Recovery to it applies exactly the transactions whose commit
record precedes it in the WAL. A REPEATABLE READ snapshot is not a WAL prefix: a transaction writes its commit record,
then leaves the process array; a snapshot taken in between does not see it although its commit is in the WAL (and
snapshots taken just before the restore point miss commits that land between the two). Counting in a snapshot next to
the restore point would be off by whatever committed in that gap: rarely, but a drill that fails now and then for
no fault teaches people to ignore it.

So, per database: list the tables, then in a REPEATABLE READ transaction take SHARE locks on all of them (LOCK takes no
snapshot). A SHARE lock waits for every transaction that wrote to the table to end (its row locks are released only
after it left the process array) and lets no new writer in. Then `pg_export_snapshot()` takes the snapshot: every
committed change to those tables is in it and none can follow. The restore point is created while the locks are still
held, so the tables in the WAL at the restore point are the tables in that snapshot. A second connection imports the
snapshot (SET TRANSACTION SNAPSHOT), the first commits and releases the locks, and the counting runs in the imported
snapshot while writers go on. Writers wait only for the lock, the export, the restore point and the import
(milliseconds); `lock_timeout` and `statement_timeout` bound the wait behind a long transaction, for all the tables
together (retried, then the drill fails naming it).
Readers are never blocked. Unlogged and temporary tables are left out (their rows are not in the WAL).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from sidecar import postgres
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.physical.hold import recording
from sidecar.physical.wal import WalArchive
from sidecar.repository import iso_timestamp, write_atomically

log = logging.getLogger(__name__)

RECORD = ".pitr-drill.json"  # BACKUP_DIR/wal/.pitr-drill.json
TABLES = ("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
          "WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
          "AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1, 2")
LOCK_TIMEOUT = "2s"  # how long writers may queue behind the drill's lock request (all its tables), per attempt
LOCK_ATTEMPTS = 10
ARCHIVE_WAIT = 300.0  # seconds for the segment holding the restore point to be archived


@dataclass
class PitrDrillReport:
    ok: bool
    at: str  # when the drill started
    duration_seconds: float = 0.0
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    restore_point_time: str | None = None
    segment: str | None = None  # the WAL segment holding the restore point
    writers_held_seconds: float | None = None  # how long writers to the tables could have had to wait for the drill's locks
    base_backup: str | None = None
    wal_segments: int = 0
    databases: list[str] = field(default_factory=list)
    tables: int = 0
    rows: int = 0
    mismatches: list[str] = field(default_factory=list)
    error: str | None = None
    # on the way to the restore point, recovery first stops (paused) at a random moment between the end of the base
    # backup and the restore point: {"target", "replayedTo" (the last commit replayed), "databases" readable there}
    random_moment: dict[str, Any] | None = None
    anchor_time: str | None = None  # the drill's commit just before the restore point: the random moment's upper bound


Counts = dict[str, dict[str, int]]  # database -> "schema.table" -> rows


def _name(schema: str, table: str) -> str:
    return f"{schema}.{table}"


def _databases(config: Config) -> list[str]:
    """The databases the drill counts: those backed up (BACKUP_DATABASES), else the one of DATABASE_URL."""
    if not config.databases:
        return [config.database_name]
    from sidecar.logical.server import DATABASES, selected

    with postgres.connect(config) as conn:
        return selected(config, [row[0] for row in conn.execute(DATABASES)])


Tables = dict[str, list[tuple[str, str]]]  # database -> (schema, table)


def capture(config: Config, name: str, databases: list[str]) -> tuple[dict[str, Any], Tables, Counts]:
    """Create restore point `name` and count every table of `databases` exactly as the WAL has them at that point (see
    the module's docstring). ({lsn, time, segment, system}, the tables counted, counts)."""
    # a commit just before: a time target before it always has a commit to stop at before the restore point (the first
    # commit in the WAL stamped after the target), even on a quiet server; recovery that ran past the restore point could
    # not be sent back to it (its consistent point would be after it). Its time is the random moment's upper bound.
    with postgres.connect(config) as conn:
        row = conn.execute("SELECT clock_timestamp(), pg_current_xact_id()").fetchone()
    assert row is not None
    anchor = iso_timestamp(row[0].astimezone(UTC))
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            point, tables, counts = _capture_once(config, name, databases)
            return {**point, "anchor": anchor}, tables, counts
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled, psycopg.errors.UndefinedTable) as exc:
            # writers held the tables longer than the timeout, or a table was dropped after it was listed: again
            if attempt == LOCK_ATTEMPTS:
                raise SidecarError(f"could not lock the tables for the restore point in {LOCK_ATTEMPTS} tries of {LOCK_TIMEOUT}: "
                                   f"{postgres.describe(exc)}; a long transaction writes to them (or changes them): run the drill when "
                                   "it has ended") from None
            log.info("the drill's table locks: %s; trying again (%d of %d)", postgres.describe(exc), attempt, LOCK_ATTEMPTS)
            time.sleep(min(attempt, 5))
    raise AssertionError("unreachable")


def _capture_once(config: Config, name: str, databases: list[str]) -> tuple[dict[str, Any], Tables, Counts]:
    holders: list[psycopg.Connection[Any]] = []  # per database: the transaction holding the locks and the exported snapshot
    readers: list[psycopg.Connection[Any]] = []
    try:
        tables: Tables = {}
        snapshots: dict[str, str] = {}
        locked = 0.0
        for database in databases:
            holder = postgres.connect(config, database, autocommit=False)
            holders.append(holder)
            holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            tables[database] = [(str(s), str(t)) for s, t in _listed(config, database)]
            # lock_timeout bounds each table's wait, statement_timeout the whole LOCK: while it waits for one table, the
            # tables it holds already keep their writers waiting, so many tables must not add up their waits
            holder.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            holder.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            locked = locked or time.monotonic()
            if tables[database]:  # LOCK takes no snapshot: the export below does, once no writer can be in the middle
                try:
                    holder.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
                        sql.SQL(", ").join(sql.Identifier(s, t) for s, t in tables[database])))
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise SidecarError(f"the drill cannot lock the tables of {database!r} to count them at the restore point: "
                                       f"{postgres.describe(exc)}; the role needs UPDATE, DELETE or TRUNCATE on every table (or to own "
                                       "them), as a superuser has") from None
            holder.execute("SET LOCAL statement_timeout TO DEFAULT")
            row = holder.execute("SELECT pg_export_snapshot()").fetchone()
            assert row is not None
            snapshots[database] = str(row[0])
        try:
            row = holders[0].execute("SELECT lsn, clock_timestamp(), pg_walfile_name(lsn), (SELECT system_identifier FROM pg_control_system()) "
                                     "FROM pg_create_restore_point(%s) AS lsn", (name,)).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            raise SidecarError(f"role {config.conninfo().get('user', '')!r} may not create restore points: GRANT EXECUTE ON FUNCTION "
                               "pg_create_restore_point(text), pg_switch_wal() TO it (or use a superuser)") from None
        assert row is not None
        point: dict[str, Any] = {"lsn": str(row[0]), "time": iso_timestamp(row[1].astimezone(UTC)), "segment": str(row[2]), "system": str(row[3])}
        for database in databases:
            reader = postgres.connect(config, database, autocommit=False)
            readers.append(reader)
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshots[database])))
        for holder in holders:  # the locks go: writers continue; the readers keep the snapshot
            holder.commit()
        point["writers_held_seconds"] = round(time.monotonic() - locked, 4)  # from the first lock request to the last release
        counts: Counts = {}
        for database, reader in zip(databases, readers, strict=True):
            counts[database] = count_tables(reader, tables[database])
            reader.commit()
        return point, tables, counts
    finally:
        for conn in holders + readers:
            conn.close()


def _listed(config: Config, database: str) -> list[tuple[Any, ...]]:
    with postgres.connect(config, database) as conn:
        return conn.execute(TABLES).fetchall()


def count_tables(conn: psycopg.Connection[Any], tables: list[tuple[str, str]]) -> dict[str, int]:
    counts = {}
    for schema, table in tables:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
        assert row is not None
        counts[_name(schema, table)] = int(row[0])
    return counts


def wait_archived(config: Config, system: str, segment: str, timeout: float = ARCHIVE_WAIT) -> None:
    """Complete the segment holding the restore point (pg_switch_wal) and wait until the receiver has archived it."""
    with postgres.connect(config) as conn:
        conn.execute("SELECT pg_switch_wal()")
    archive = WalArchive(config.backup_dir)
    deadline = time.monotonic() + timeout
    while archive.record(system, segment) is None:
        if time.monotonic() > deadline:
            raise SidecarError(f"WAL segment {segment}, which holds the drill's restore point, was not archived within {timeout:.0f}s: "
                               "is WAL streamed (WAL_ARCHIVING=true, 'pg-backup-sidecar wal-receive')? see 'list --wal'")
        time.sleep(0.2)


def compare(live: Counts, restored: Counts) -> list[str]:
    """What differs between the counts at the restore point and those of the restored server (pure)."""
    problems = []
    for database, tables in live.items():
        got = restored.get(database, {})
        for table, rows in tables.items():
            if table not in got:
                problems.append(f"{database}: table {table} ({rows} rows at the restore point) is missing from the restored server")
            elif got[table] != rows:
                problems.append(f"{database}: table {table} has {got[table]} rows restored, {rows} at the restore point")
    return problems


def _restore_and_count(config: Config, name: str, tables: Tables, report: PitrDrillReport) -> Counts:
    """Restore to restore point `name` into a scratch server, count the same tables there; the scratch server and its
    directory are removed whatever happens. The live server is not touched."""
    from sidecar.physical.pitr import ScratchServer, Target, restore_to_data_dir, scratch_directory

    root = scratch_directory()
    try:
        target = Target("name", name=name)
        result = restore_to_data_dir(config, target, root / "data")
        report.base_backup, report.wal_segments = result["baseBackup"], int(result["walSegments"])
        server = ScratchServer(config, root, result.get("serverMajor"))
        user = config.conninfo().get("user")
        base = make_conninfo(host=str(root), port=str(server.port), **({"user": user} if user else {}))
        try:
            moment = _random_moment(config, result["baseBackup"], report.anchor_time)
            if moment is not None:
                report.random_moment = _visit_moment(server, root, base, moment, name, list(tables))
            server.start()
            server.wait_promoted(make_conninfo(base, dbname="postgres"), target=target.describe())
            counts: Counts = {}
            for database, listed in tables.items():
                try:
                    with psycopg.connect(make_conninfo(base, dbname=database), autocommit=True) as conn:
                        present = {(str(s), str(t)) for s, t in conn.execute(TABLES).fetchall()}
                        counts[database] = count_tables(conn, [t for t in listed if t in present])
                except psycopg.OperationalError as exc:
                    raise SidecarError(f"the restored server has no usable database {database!r}: {postgres.describe(exc)}") from None
            return counts
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


MOMENT_MARGIN = 1.0  # seconds after the base backup's end: recovery is consistent by then (its commits come after the end LSN)


def _random_moment(config: Config, base_id: str, point_time: str | None) -> datetime | None:
    """A random moment between the end of base backup `base_id` and `point_time` (the drill's commit just before the
    restore point); None if they are too close."""
    from sidecar.physical.base import list_base_backups

    meta = next((b.metadata for b in list_base_backups(config) if b.id == base_id), None)
    if not meta or not point_time:
        return None
    start = datetime.fromisoformat(str(meta["finishedAt"]).replace("Z", "+00:00")).timestamp() + MOMENT_MARGIN
    end = datetime.fromisoformat(point_time.replace("Z", "+00:00")).timestamp()
    if end <= start:
        return None
    return datetime.fromtimestamp(start + (end - start) * secrets.SystemRandom().random(), UTC)


def _visit_moment(server: Any, root: Path, base: str, moment: datetime, name: str, databases: list[str]) -> dict[str, Any]:
    """Recover first to `moment` and pause there (hot standby): every database must be readable, and the last commit
    replayed no later than the moment. Then the data directory's target goes back to the restore point (the last
    occurrence of a setting in postgresql.auto.conf wins; an empty target unsets that kind) and the server is stopped, to
    continue from where it was."""
    conf = root / "data" / "postgresql.auto.conf"
    when = moment.strftime("%Y-%m-%d %H:%M:%S.%f+00")
    with open(conf, "a") as out:
        out.write(f"# PITR drill: first to a random moment, paused\nrecovery_target_name = ''\nrecovery_target_time = '{when}'\n"
                  "recovery_target_action = 'pause'\n")
    server.start()
    try:
        deadline = time.monotonic() + 3600
        while True:
            try:
                with psycopg.connect(make_conninfo(base, dbname="postgres"), autocommit=True, connect_timeout=5) as conn:
                    row = conn.execute("SELECT pg_is_wal_replay_paused(), pg_last_xact_replay_timestamp()").fetchone()
                    if row is not None and row[0]:
                        replayed = row[1]
                        break
            except psycopg.OperationalError:
                if not (root / "data" / "postmaster.pid").exists():
                    raise SidecarError(f"recovery to the random moment {iso_timestamp(moment)} failed; {server.log_tail()}") from None
            if time.monotonic() > deadline:
                raise SidecarError(f"recovery did not reach the random moment {iso_timestamp(moment)} in an hour; {server.log_tail()}")
            time.sleep(0.5)
        if replayed is not None and replayed > moment:
            raise SidecarError(f"recovery to {iso_timestamp(moment)} replayed a commit of {iso_timestamp(replayed)}, after it")
        for database in databases:
            try:
                with psycopg.connect(make_conninfo(base, dbname=database), autocommit=True) as conn:
                    conn.execute(TABLES).fetchall()
            except psycopg.Error as exc:
                raise SidecarError(f"at the random moment {iso_timestamp(moment)} database {database!r} is not readable: "
                                   f"{postgres.describe(exc)}") from None
    finally:
        server.stop()
    with open(conf, "a") as out:
        out.write(f"# then on to the restore point\nrecovery_target_time = ''\nrecovery_target_name = '{name}'\n"
                  "recovery_target_action = 'promote'\n")
    return {"target": iso_timestamp(moment), "replayedTo": iso_timestamp(replayed.astimezone(UTC)) if replayed else None,
            "databases": databases}


def ready(config: Config) -> None:
    """Fail at once, before a restore point is made, when a drill cannot pass: no good base backup, or nothing streams
    the WAL (the segment holding the restore point would never be archived)."""
    from sidecar.errors import NotFound
    from sidecar.physical.base import list_base_backups

    backups = list_base_backups(config)
    if not any(b.good for b in backups):
        waiting = [b for b in backups if b.status == "waiting-for-wal"]
        raise NotFound("no good base backup to restore from" + (f" ({waiting[0].id} waits for its WAL)" if waiting else "")
                       + "; take one with 'pg-backup-sidecar base-backup' while WAL is streamed")
    with postgres.connect(config) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (config.wal_slot_name,)).fetchone()
    if row is None or not row[0]:
        raise SidecarError(f"no WAL receiver streams from replication slot {config.wal_slot_name} "
                           f"({'it does not exist' if row is None else 'it is not active'}), so the drill's restore point would never be "
                           "archived: run the daemon with WAL_ARCHIVING=true (or 'pg-backup-sidecar wal-receive')")


def run_pitr_drill(config: Config) -> PitrDrillReport:
    """One PITR drill; the outcome (passed or failed, and why) is recorded on the volume before it is returned."""
    started = time.monotonic()
    now = datetime.now(UTC)
    report = PitrDrillReport(ok=False, at=iso_timestamp(now))
    try:
        # at most 63 bytes, unique: the time and a random part (two drills at once never share a name)
        name = f"pg_backup_sidecar_drill_{now.strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(4)}"
        databases = _databases(config)
        report.databases, report.restore_point = databases, name
        ready(config)
        point, tables, live = capture(config, name, databases)
        report.restore_point_lsn, report.restore_point_time, report.segment = point["lsn"], point["time"], point["segment"]
        report.writers_held_seconds, report.anchor_time = point["writers_held_seconds"], point["anchor"]
        report.tables = sum(len(t) for t in live.values())
        report.rows = sum(sum(t.values()) for t in live.values())
        log.info("restore point %s created at %s (segment %s) with the counts of %d tables; waiting for its WAL to be archived", name,
                 point["lsn"], point["segment"], report.tables, extra={"event": "pitr_drill_restore_point"})
        wait_archived(config, point["system"], point["segment"])
        restored = _restore_and_count(config, name, tables, report)
        report.mismatches = compare(live, restored)
        report.ok = not report.mismatches
        if report.mismatches:
            report.error = f"{len(report.mismatches)} tables differ after restoring to the restore point: {report.mismatches[0]}"
    except SidecarError as exc:
        report.error = str(exc)
    except psycopg.Error as exc:
        report.error = f"the live server refused a step of the drill: {postgres.describe(exc)}"
    except OSError as exc:
        report.error = f"{exc.strerror or exc}{f' {exc.filename}' if exc.filename else ''}: check the backup volume and the scratch directory (TMPDIR)"
    report.duration_seconds = round(time.monotonic() - started, 3)
    record(config, report)
    (log.info if report.ok else log.error)("PITR drill %s in %.1fs%s", "passed" if report.ok else "FAILED", report.duration_seconds,
                                           "" if report.ok else f": {report.error}",
                                           extra={"event": "pitr_drill_passed" if report.ok else "pitr_drill_failed"})
    return report


# --- the record on the volume: the last drill, the last that passed, counters -----------------------

def record_path(config: Config) -> Path:
    return config.backup_dir / "wal" / RECORD


def read_record(backup_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((backup_dir / "wal" / RECORD).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(config: Config, report: PitrDrillReport) -> None:
    """Add a drill's outcome to wal/.pitr-drill.json (atomically): last, lastSuccess, lastFailure, passed, failed."""
    path = record_path(config)
    try:
        with recording(path.parent):  # a hand-run drill ending beside the daemon's: both outcomes counted
            data = read_record(config.backup_dir)
            entry = {**asdict(report), "finishedAt": iso_timestamp(datetime.now(UTC))}
            data["last"] = entry
            data["lastSuccess" if report.ok else "lastFailure"] = entry
            key = "passed" if report.ok else "failed"
            data[key] = int(data.get(key, 0)) + 1
            write_atomically(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
    except OSError as exc:
        log.error("cannot record the PITR drill's outcome on the backup volume (%s): the metrics will not show it", exc.strerror)
