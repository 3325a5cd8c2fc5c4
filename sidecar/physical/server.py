"""What the physical side needs of the live server: replication rights and settings (each missing one named in one
line with the SQL or setting that fixes it), its identity, and the replication slot."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.postgres import connect, describe

SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


def _replication_connection(config: Config) -> psycopg.Connection[Any]:
    """A physical replication connection as the replication role (WAL_REPLICATION_URL's, else DATABASE_URL's)."""
    params = config.replication().conninfo()
    params.update(replication="true", connect_timeout=params.get("connect_timeout", "10"), application_name="pg-backup-sidecar")
    return psycopg.connect(make_conninfo(**params), autocommit=True)


def _where(config: Config) -> str:
    host = config.replication().conninfo().get("host", "")
    return "the Unix socket ('local replication ...')" if not host or host.startswith("/") else f"host {host} ('host replication ... <address>/32 scram-sha-256')"


def _replication_user(config: Config) -> str:
    """The role WAL_REPLICATION_URL names (libpq's default when it names none: PGUSER, else this process's user)."""
    import getpass

    return config.replication().conninfo().get("user") or os.environ.get("PGUSER") or getpass.getuser()


def _facts(config: Config) -> tuple[str, bool | None, dict[str, str]] | None:
    """(the replication role, whether it may replicate (None: no such role), the server's WAL settings), read over an
    ordinary connection as DATABASE_URL's role. With a dedicated role (WAL_REPLICATION_URL) that connection may be refused
    (a base backup runs as that role alone): None then, and the replication connection's own error says what is wrong."""
    dedicated = bool(config.wal_replication_url)
    try:
        with connect(config) as conn:
            if dedicated:
                user = _replication_user(config)
                found = conn.execute("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
                can: bool | None = bool(found[0]) if found else None
            else:
                row = conn.execute("SELECT current_user, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
                assert row is not None
                user, can = str(row[0]), bool(row[1])
            settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'max_wal_senders', "
                                         "'max_replication_slots')").fetchall())
    except SidecarError:
        if not dedicated:
            raise
        return None
    return user, can, settings


def replication_problems(config: Config) -> list[str]:
    """Everything that stops WAL streaming and base backups, one line each with what to do; [] when all is set. The role
    is WAL_REPLICATION_URL's when set (a dedicated replication role), else DATABASE_URL's."""
    problems = []
    facts = _facts(config)
    user = facts[0] if facts else _replication_user(config)
    named = f"role {user} (WAL_REPLICATION_URL)" if config.wal_replication_url else f"role {user}"
    if facts:
        _user, can_replicate, settings = facts
        if can_replicate is None:
            problems.append(f"{named} does not exist: CREATE ROLE {user} LOGIN REPLICATION PASSWORD '...' (and put its password in "
                            "WAL_REPLICATION_URL)")
        elif not can_replicate:
            problems.append(f"{named} lacks REPLICATION: ALTER ROLE {user} REPLICATION")
        if settings.get("wal_level") == "minimal":
            problems.append("wal_level is minimal: ALTER SYSTEM SET wal_level = replica, then restart the server")
        if settings.get("max_wal_senders") == "0":
            problems.append("max_wal_senders is 0: ALTER SYSTEM SET max_wal_senders = 10, then restart the server")
        if settings.get("max_replication_slots") == "0":
            problems.append("max_replication_slots is 0: ALTER SYSTEM SET max_replication_slots = 10, then restart the server")
    try:
        _replication_connection(config).close()
        return problems
    except psycopg.OperationalError as exc:
        text = describe(exc)
    if "pg_hba.conf" in text:
        problems.append(f"no pg_hba.conf line allows replication connections for role {user} from here: add one for {_where(config)}"
                        f" naming database 'replication' and role {user}, then SELECT pg_reload_conf()")
    elif "replication role" in text or "WAL sender" in text:  # PostgreSQL 15: "must be superuser or replication role"; 16+: "permission denied to start WAL sender"
        if not [p for p in problems if "REPLICATION" in p]:
            problems.append(f"{named} lacks REPLICATION: ALTER ROLE {user} REPLICATION")
    elif "does not exist" in text and f'"{user}"' in text:
        if not [p for p in problems if "does not exist" in p]:
            problems.append(f"{named} does not exist: CREATE ROLE {user} LOGIN REPLICATION PASSWORD '...'")
    elif "password authentication failed" in text:
        problems.append(f"password authentication failed for {named}: check the password in "
                        f"{'WAL_REPLICATION_URL (or WAL_REPLICATION_PASSWORD_FILE)' if config.wal_replication_url else 'DATABASE_URL (or DATABASE_PASSWORD_FILE)'}")
    elif not problems:
        problems.append(f"a replication connection fails: {text}")
    return problems


def require_replication(config: Config) -> None:
    problems = replication_problems(config)
    if problems:
        raise SidecarError("; ".join(problems))


def identify(config: Config) -> dict[str, Any]:
    """systemIdentifier, timeline, xlogpos (IDENTIFY_SYSTEM on a replication connection), segmentSize, major, version."""
    try:
        conn = _replication_connection(config)
    except psycopg.OperationalError as exc:
        raise SidecarError(f"cannot open a replication connection: {describe(exc)}; run 'pg-backup-sidecar check'") from None
    try:
        result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        if result.ntuples != 1:
            raise SidecarError(f"IDENTIFY_SYSTEM failed: {(result.error_message or b'').decode(errors='replace').strip()}")
        sysid, timeline = (result.get_value(0, 0) or b"").decode(), int(result.get_value(0, 1) or b"0")
        size_text = conn.pgconn.exec_(b"SHOW wal_segment_size").get_value(0, 0) or b""
        version = conn.pgconn.parameter_status(b"server_version") or b""
    finally:
        conn.close()
    return {"systemIdentifier": sysid, "timeline": timeline, "segmentSize": _size(size_text.decode()),
            "version": version.decode(), "major": int(version.decode().split(".")[0].split()[0])}


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(B|kB|MB|GB)?", text.strip())
    if not match:
        raise SidecarError(f"cannot read wal_segment_size '{text}'")
    return int(match.group(1)) * {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, None: 1}[match.group(2)]


def _slot_command(config: Config, command: str, tolerated: str = "") -> None:
    """A replication command (CREATE_REPLICATION_SLOT, DROP_REPLICATION_SLOT) as the replication role: creating or dropping
    a slot needs REPLICATION, which DATABASE_URL's role need not have when WAL_REPLICATION_URL names another."""
    try:
        conn = _replication_connection(config)
    except psycopg.OperationalError as exc:
        raise SidecarError(f"cannot open a replication connection: {describe(exc)}; run 'pg-backup-sidecar check'") from None
    try:
        result = conn.pgconn.exec_(command.encode())
        if result.status not in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK):
            message = (result.error_message or b"").decode(errors="replace").strip()
            if not tolerated or tolerated not in message:
                raise SidecarError(f"{command.split()[0]} failed: {message}")
    finally:
        conn.close()


def _create_slot(config: Config, slot: str) -> None:
    """A physical slot reserving WAL from now (as pg_create_physical_replication_slot(slot, true)); one made meanwhile is fine."""
    _slot_command(config, f'CREATE_REPLICATION_SLOT "{slot}" PHYSICAL RESERVE_WAL', tolerated="already exists")


def recreate_slot(config: Config, slot: str) -> None:
    """Drop a slot that lost its WAL and create it again, reserving WAL from now on."""
    _slot_command(config, f'DROP_REPLICATION_SLOT "{slot}"', tolerated="does not exist")
    _create_slot(config, slot)


def ensure_slot(config: Config, slot: str) -> str:
    """Create the physical slot if missing (reserving WAL now); its wal_status ('lost' means WAL is gone: a gap)."""
    with connect(config) as conn:
        row = conn.execute("SELECT slot_type, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    if row is None:
        _create_slot(config, slot)
        return "reserved"
    if row[0] != "physical":
        raise SidecarError(f"replication slot {slot} is a {row[0]} slot; set WAL_SLOT_NAME to another name or drop it")
    return str(row[1])
