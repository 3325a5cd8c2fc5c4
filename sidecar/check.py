"""`check`: does this setup work, beyond the configuration's syntax (pgBackRest's `check`)?

Connects, checks the role's rights (read every table, create databases, own the database, read role
passwords), pg_dump against the server, the backup volume (writable, free space) and that the age identity
belongs to a recipient, and the remote store when one is configured (reachable, bucket there, credentials
accepted, listable and writable; its backups and the pending copies counted), with WAL archiving what streaming needs (the
replication role, pg_hba.conf, the server's WAL settings) and the slot's state, and, when BASE_BACKUP_FULL_EVERY asks for
incremental base backups, whether the server can take them (PostgreSQL 17+, summarize_wal on). Every check runs even when an
earlier one failed; nothing is changed, except a one-byte file written to and removed from the backup volume
and a small probe object written to and removed from the remote store's `.check/` prefix."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.postgres import check_dump_version, connect, describe, find_tool, server_info, tool_version
from sidecar.repository import METADATA_SUFFIX, Repository, newest_good

if TYPE_CHECKING:
    from sidecar.storage.objectstore import ObjectStore

SHOWN = 5  # names listed in one line; the rest are counted


@dataclass
class CheckReport:
    connected: bool = False
    checked: list[str] = field(default_factory=list)  # what was checked and is fine
    problems: list[str] = field(default_factory=list)  # each breaks backups, restores or drills
    notes: list[str] = field(default_factory=list)  # works, with a limit worth knowing

    @property
    def ok(self) -> bool:
        return self.connected and not self.problems

    def lines(self) -> list[str]:
        summary = (f"{len(self.problems)} problem{'s' if len(self.problems) > 1 else ''} found" if self.problems
                   else f"all {len(self.checked)} checks passed")
        return ([f"ok: {line}" for line in self.checked] + [f"note: {line}" for line in self.notes]
                + [f"problem: {line}" for line in self.problems] + [summary])


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_setup(config: Config) -> CheckReport:
    report = CheckReport()
    server_major = _check_database(config, report)
    _check_wal(config, report)
    _check_tools(config, report, server_major)
    _check_volume(config, report)
    _check_encryption(config, report)
    _check_remote(config, report)
    return report


def _check_database(config: Config, report: CheckReport) -> int | None:
    try:
        conn = connect(config)
    except SidecarError as exc:
        report.problems.append(str(exc))
        return None
    try:
        report.connected = True
        info = server_info(conn)
        role, superuser, createdb, createrole, bypassrls, owns = _one(conn, (
            "SELECT r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolbypassrls, pg_has_role(d.datdba, 'MEMBER')"
            " FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()"))
        report.checked.append(f"connected to database {info['database']} on PostgreSQL {info['version'].split()[-1]} as {role}"
                              + (" (superuser)" if superuser else ""))
        _check_reading(conn, report, role, superuser or bypassrls, info["major"])
        if superuser or createdb:
            report.checked.append(f"{role} can create databases (restores and drills load into a new database)")
        else:
            report.problems.append(f"role {role} can neither create databases nor is it a superuser: restores and drills "
                                   f"(which load into a new database) will fail; ALTER ROLE {role} CREATEDB, or restore with --in-place")
        if not (superuser or owns):
            report.problems.append(f"role {role} does not own database {info['database']}: a restore cannot rename it to swap in "
                                   f"the restored copy; ALTER DATABASE {info['database']} OWNER TO {role}, or restore with --in-place")
        if superuser:
            report.checked.append("role passwords are included in backups (superuser reads pg_authid)")
        else:
            report.notes.append(f"role {role} is not a superuser: backups hold the roles but not their passwords "
                                "(pg_authid is readable only by superusers); set them again after a restore onto a new server")
            if not createrole:
                report.notes.append(f"role {role} cannot create roles (no CREATEROLE): a restore onto a server that lacks "
                                    "the database's roles will fail")
        _check_incremental(conn, config, report, int(info["major"]))
        return int(info["major"])
    except psycopg.Error as exc:
        report.problems.append(f"cannot inspect the database's rights: {describe(exc)}")
        return None
    finally:
        conn.close()


def _check_wal(config: Config, report: CheckReport) -> None:
    """WAL_ARCHIVING (or a WAL_REPLICATION_URL): what streaming and base backups need (the replication role, its right,
    pg_hba.conf, the server's WAL settings: physical/server.replication_problems, which the receiver and base-backup
    refuse to start without), and the state of the slot."""
    if not (config.wal_archiving or config.wal_replication_url):
        return
    from sidecar.physical.server import replication_problems

    try:
        problems = replication_problems(config)
    except SidecarError:
        return  # DATABASE_URL's role replicates and the database refused it: reported above
    report.problems += problems
    if problems:
        return
    who = config.replication().conninfo().get("user") or "the connecting role"
    report.checked.append(f"WAL streaming: {who} may open replication connections ({'WAL_REPLICATION_URL' if config.wal_replication_url else 'DATABASE_URL'})")
    try:
        with connect(config) as conn:
            row = conn.execute("SELECT active, wal_status FROM pg_replication_slots WHERE slot_name = %s", (config.wal_slot_name,)).fetchone()
    except (SidecarError, psycopg.Error):
        return  # a dedicated role's setup may keep DATABASE_URL's role from reading it; the receiver checks the slot itself
    if row is None:
        report.notes.append(f"replication slot {config.wal_slot_name} does not exist yet: the daemon (wal-receive) makes it when it starts")
    elif row[1] == "lost":
        report.problems.append(f"replication slot {config.wal_slot_name} has lost WAL (wal_status 'lost'): the archive has a gap; the "
                               "daemon makes the slot again when it starts; take a base backup then (pg-backup-sidecar base-backup)")
    else:
        report.checked.append(f"replication slot {config.wal_slot_name}: {'streaming' if row[0] else 'not streaming now'} (wal_status {row[1]})")
    try:
        with connect(config) as conn:
            _check_synchronous(conn, config.wal_slot_name, report)
    except (SidecarError, psycopg.Error):
        return


def synchronous_names(setting: str) -> tuple[int, list[str]]:
    """How many standbys synchronous_standby_names waits for, and the names it lists (as PostgreSQL reads them: `FIRST n
    (a, b)`, `ANY n (a, b)`, `n (a, b)` or `a, b` - then 1 -, names double-quoted or not, `*` any standby); (0, []) when
    empty: commits wait for no standby."""
    text = setting.strip()
    if not text:
        return 0, []
    wanted = 1
    match = re.fullmatch(r"(?is)(?:(?:first|any)\s+)?(\d+)\s*\((.*)\)", text)
    if match:
        wanted, text = int(match.group(1)), match.group(2)
    names = [name.strip().strip('"').replace('""', '"') for name in re.findall(r'\s*("(?:[^"]|"")*"|[^,]+)\s*(?:,|$)', text)]
    return wanted, [name for name in names if name]


def _check_synchronous(conn: psycopg.Connection[Any], app: str, report: CheckReport) -> None:
    """RPO 0 is the receiver (application_name = the slot's name) named in synchronous_standby_names: say whether it is
    (and connected), and whether commits wait for a receiver that is not there or for standbys that are not this archive."""
    (setting,) = _one(conn, "SHOW synchronous_standby_names")
    wanted, names = synchronous_names(setting)
    if not names:
        return  # asynchronous: the loss window is what the receiver had not flushed (docs/pitr.md)
    ours = [name for name in names if name.casefold() in (app.casefold(), "*")]
    if not ours:
        report.notes.append(f"synchronous_standby_names ('{setting}') does not name the WAL receiver ({app}): commits wait for "
                            "those standbys, not for this archive, which can lag behind a commit; for RPO 0 name it: "
                            f"ALTER SYSTEM SET synchronous_standby_names = '{app}'; SELECT pg_reload_conf()")
        return
    rows = conn.execute("SELECT application_name, state, sync_state FROM pg_stat_replication").fetchall()
    if any(name is None or state is None for name, state, _ in rows):  # a walsender's details need pg_read_all_stats
        report.checked.append(f"synchronous_standby_names names the WAL receiver ({app}): RPO 0 while it is connected (this role "
                              "cannot read pg_stat_replication's details: grant it pg_read_all_stats to check)")
        return
    streaming = {name.casefold(): sync for name, state, sync in rows if state == "streaming"}
    if app.casefold() in streaming:
        report.checked.append(f"RPO 0: the WAL receiver ({app}) is a synchronous standby ({streaming[app.casefold()]}): a commit "
                              "returns once it has flushed the commit's WAL")
        return
    others = sum(1 for name in names if name.casefold() in streaming and name.casefold() != app.casefold())
    if "*" in names:
        others = len(streaming)
    if others < wanted:
        report.problems.append(f"synchronous_standby_names ('{setting}') names the WAL receiver ({app}), which is not connected: "
                               "commits wait until it is; start the daemon (WAL_ARCHIVING=true), or stop waiting: "
                               "ALTER SYSTEM SET synchronous_standby_names = ''; SELECT pg_reload_conf()")
    else:
        report.notes.append(f"synchronous_standby_names ('{setting}') names the WAL receiver ({app}), which is not connected: "
                            "commits wait for the other standbys named, and this archive can lag behind them")


INCREMENTAL_MAJOR = 17  # pg_basebackup --incremental and pg_combinebackup (sidecar.physical.base)


def _check_incremental(conn: psycopg.Connection[Any], config: Config, report: CheckReport, major: int) -> None:
    """BASE_BACKUP_FULL_EVERY > 1 asks for incremental base backups: they need PostgreSQL 17+ and summarize_wal on; without
    them every base backup is taken full (a note: nothing fails, but the chains asked for do not happen)."""
    every = config.base_full_every
    if every <= 1:
        return
    if major < INCREMENTAL_MAJOR:
        report.notes.append(f"BASE_BACKUP_FULL_EVERY={every}: incremental base backups need PostgreSQL {INCREMENTAL_MAJOR}+ (this is {major}), "
                            "so every base backup is taken full; set BASE_BACKUP_FULL_EVERY=1 to say so")
        return
    (value,) = _one(conn, "SHOW summarize_wal")
    if value == "on":
        report.checked.append(f"summarize_wal is on: base backups are incremental, a full one every {every} (BASE_BACKUP_FULL_EVERY)")
    else:
        report.notes.append(f"BASE_BACKUP_FULL_EVERY={every} asks for incremental base backups, but summarize_wal is off, so every base "
                            "backup is taken full; turn it on: ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf()")


def _one(conn: psycopg.Connection[Any], query: str) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None
    return tuple(row)


# what pg_dump reads: table and sequence data, in schemas it can use; members of extensions are not dumped
READ_CHECK = """
SELECT format('%I.%I', n.nspname, c.relname),
       has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'),
       c.relrowsecurity AND NOT pg_has_role(c.relowner, 'MEMBER')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
"""


def _check_reading(conn: psycopg.Connection[Any], report: CheckReport, role: str, bypass: bool, major: int) -> None:
    rows = conn.execute(READ_CHECK).fetchall()
    unreadable = [name for name, readable, _ in rows if not readable]
    policed = [name for name, readable, rls in rows if readable and rls and not bypass]
    if unreadable:
        report.problems.append(f"role {role} cannot read {len(unreadable)} of {len(rows)} tables and sequences, so pg_dump "
                               f"will fail: {_names(unreadable)}; GRANT SELECT on them (and USAGE on their schemas), "
                               f"or GRANT pg_read_all_data TO {role}")
    if policed:
        report.problems.append(f"{len(policed)} table{'s have' if len(policed) > 1 else ' has'} row-level security and {role} "
                               "neither owns it nor has BYPASSRLS, "
                               f"so pg_dump will refuse them: {_names(policed)}; ALTER ROLE {role} BYPASSRLS")
    if not unreadable and not policed:
        report.checked.append(f"{role} can read all {len(rows)} tables and sequences")
    if major >= 17:  # has_largeobject_privilege is new in 17
        (blobs,) = _one(conn, "SELECT count(*) FROM pg_largeobject_metadata WHERE NOT has_largeobject_privilege(oid, 'SELECT')")
        if blobs:
            report.problems.append(f"role {role} cannot read {blobs} large objects, so pg_dump will fail; GRANT SELECT ON "
                                   f"LARGE OBJECT ... TO {role}, or GRANT pg_read_all_data TO {role}")


def _check_tools(config: Config, report: CheckReport, server_major: int | None) -> None:
    try:
        pg_dump = find_tool("pg_dump", config.pg_bin_dir)
        for tool in ("pg_restore", "psql", "pg_dumpall"):
            find_tool(tool, config.pg_bin_dir)
        if server_major is None:
            report.checked.append(f"pg_dump {tool_version(pg_dump)[1]} found (server version unknown)")
        else:
            report.checked.append(f"pg_dump {check_dump_version(pg_dump, server_major)} can dump PostgreSQL {server_major}")
    except SidecarError as exc:
        report.problems.append(str(exc))


def _check_volume(config: Config, report: CheckReport) -> None:
    if not config.volume:
        _check_state_dir(config, report)
        return
    directory = config.backup_dir
    existing = next((p for p in (directory, *directory.absolute().parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        report.problems.append(f"backup directory {directory}: {existing} is not a directory; set BACKUP_DIR to a directory")
        return
    try:
        # what a backup does: write a file, fsync it, remove it (a read-only mount or a full disk fails here)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".check-", suffix=".tmp") as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
        stat = os.statvfs(existing)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            report.problems.append(f"backup directory {directory} is full ({exc.strerror}): no backup can be written; grow the "
                                   "volume or lower the retention")
        else:
            report.problems.append(f"backup directory {directory} is not writable ({exc.strerror}); mount the backup volume "
                                   "read-write and give this user write access, or set BACKUP_DIR")
        return
    free = stat.f_bavail * stat.f_frsize
    where = f"backup directory {directory}" + ("" if existing == directory else f" (does not exist yet; {existing} is writable)")
    newest = newest_good(Repository(directory).entries(), datetime.now(UTC)) if existing == directory else None
    size = sum(item["size"] for item in newest.metadata["files"].values()) if newest and newest.metadata else 0
    if size > free:
        report.problems.append(f"{where}: {free} bytes free, less than the newest backup's {size} bytes: the next backup "
                               "will probably not fit; grow the volume or lower the retention")
    else:
        report.checked.append(f"{where} is writable, {free} bytes free" + (f" (newest backup: {size} bytes)" if size else ""))


def _check_state_dir(config: Config, report: CheckReport) -> None:
    """No backup volume (BACKUP_VOLUME=false): backups stream to the remote; the directory only holds the lock and the
    daemon's records, so it must be writable, and its free space does not matter."""
    directory = config.backup_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".check-", suffix=".tmp") as probe:
            probe.write(b"\0")
            probe.flush()
    except OSError as exc:
        report.problems.append(f"state directory {directory} is not writable ({exc.strerror}): it holds the backup lock and "
                               "the daemon's records; give this user write access or set SIDECAR_STATE_DIR")
        return
    report.checked.append(f"no backup volume: backups stream straight to the remote; state directory {directory} is writable")


def _check_encryption(config: Config, report: CheckReport) -> None:
    if not config.identity_file:
        if config.encryption:
            report.notes.append("no BACKUP_ENCRYPTION_IDENTITY_FILE: backups are encrypted, but restores and drills cannot "
                                "decrypt them here (keep the secret key safe elsewhere)")
        else:
            report.checked.append("encryption off")
        return
    try:
        mine = _public_keys(config.identity_file)
    except (OSError, ValueError, SidecarError) as exc:
        report.problems.append(f"BACKUP_ENCRYPTION_IDENTITY_FILE {config.identity_file}: {getattr(exc, 'strerror', None) or exc}")
        return
    if not config.recipients:
        report.checked.append(f"identity file {config.identity_file} holds {len(mine)} age keys (encryption off; used to restore older backups)")
        return
    matching = [r for r in config.recipients if r in mine]
    if matching:
        report.checked.append(f"identity file {config.identity_file} holds the secret key of recipient {matching[0]}")
    else:
        report.problems.append(f"identity file {config.identity_file} holds no secret key of any BACKUP_ENCRYPTION_RECIPIENTS "
                               f"(it is the key of {_names(sorted(mine))}): new backups could not be restored with it; "
                               "fix the recipients or the identity file")


def _public_keys(path: Path) -> set[str]:
    """The age public keys (age1...) of the identities in `path`."""
    from sidecar import age

    keys = set()
    for identity in age.parse_identities(path):
        keys.add(str(identity.to_public()))
    return keys


PROBE_PREFIX = ".check/"  # never listed as a backup (remote listings skip names with '/' or a leading '.')


def _check_remote(config: Config, report: CheckReport) -> None:
    """The remote store: one line per problem, naming which (bad URL, missing bucket, credentials, access, unreachable);
    the store's own messages name the URL and endpoint, never a key."""
    if config.remote is None:
        return
    from sidecar.storage.base import StorageError
    from sidecar.storage.objectstore import ObjectStore
    from sidecar.storage.offsite import pending

    try:
        store = ObjectStore(config.remote, attempts=1)  # obstore's own retries are enough for a yes/no
        store.check(attempts=1)
        names = [info.name for info in store.list("backup_")]
    except StorageError as exc:
        report.problems.append(str(exc))
        return
    backups = sum(1 for name in names if name.endswith(METADATA_SUFFIX))
    if not config.volume:  # nothing is ever waiting: every backup is written to the remote
        report.checked.append(f"remote {store.description}: reachable, bucket found, credentials accepted, listable; "
                              f"{backups} backup{'' if backups == 1 else 's'} there")
        _probe_remote(store, report)
        return
    try:
        waiting = len(pending(Repository(config.backup_dir), config.remote)) if config.backup_dir.is_dir() else 0
    except OSError:
        waiting = 0  # the volume's own check above says why
    report.checked.append(f"remote {store.description}: reachable, bucket found, credentials accepted, listable; "
                          f"{backups} backup{'' if backups == 1 else 's'} there, {waiting} waiting to be copied")
    _probe_remote(store, report)


def _probe_remote(store: ObjectStore, report: CheckReport) -> None:
    """Write a small create-only object under `.check/` and delete it, as a backup's copy and the remote retention do."""
    import uuid

    from sidecar.storage.base import Deleted, StorageError

    name = f"{PROBE_PREFIX}probe-{uuid.uuid4().hex}"
    try:
        store.put_probe(name)
    except StorageError as exc:
        report.problems.append(f"{exc}: no backup can be copied off-site")
        return
    try:
        outcome = store.delete_probe(name)
    except StorageError as exc:
        report.problems.append(f"{exc}: the remote retention cannot delete old backups (allow delete, or use Object Lock)")
        return
    if outcome is Deleted.KEPT_BY_LOCK:
        report.notes.append(f"remote {store.description}: the probe object {name} was written but its delete was refused by the "
                            "bucket's lock or retention policy: fine (Object Lock keeps backups immutable); it expires with the lock")
        return
    report.checked.append(f"remote {store.description}: a probe object was written (create-only) and deleted")
