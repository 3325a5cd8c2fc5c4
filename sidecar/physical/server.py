"""What the physical side needs of the live server: replication rights and settings (each missing one named in one
line with the SQL or setting that fixes it), its identity, and the replication slot."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.postgres import connect, describe

SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


def _replication_connection(config: Config) -> psycopg.Connection[Any]:
    params = config.conninfo()
    params.update(replication="true", connect_timeout=params.get("connect_timeout", "10"), application_name="pg-backup-sidecar")
    return psycopg.connect(make_conninfo(**params), autocommit=True)


def _where(config: Config) -> str:
    host = config.conninfo().get("host", "")
    return "the Unix socket ('local replication ...')" if not host or host.startswith("/") else f"host {host} ('host replication ... <address>/32 scram-sha-256')"


def replication_problems(config: Config) -> list[str]:
    """Everything that stops WAL streaming and base backups, one line each with what to do; [] when all is set."""
    problems = []
    with connect(config) as conn:
        row = conn.execute("SELECT current_user, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'max_wal_senders', 'max_replication_slots')").fetchall())
    assert row is not None
    user, can_replicate = row
    if not can_replicate:
        problems.append(f"role {user} lacks REPLICATION: ALTER ROLE {user} REPLICATION")
    if settings.get("wal_level") == "minimal":
        problems.append("wal_level is minimal: ALTER SYSTEM SET wal_level = replica, then restart the server")
    if settings.get("max_wal_senders") == "0":
        problems.append("max_wal_senders is 0: ALTER SYSTEM SET max_wal_senders = 10, then restart the server")
    if settings.get("max_replication_slots") == "0":
        problems.append("max_replication_slots is 0: ALTER SYSTEM SET max_replication_slots = 10, then restart the server")
    if not problems:
        try:
            _replication_connection(config).close()
        except psycopg.OperationalError as exc:
            text = describe(exc)
            if "pg_hba.conf" in text:
                problems.append(f"no pg_hba.conf line allows replication connections for role {user} from here: add one for {_where(config)}"
                                f" naming database 'replication' and role {user}, then SELECT pg_reload_conf()")
            else:
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


def recreate_slot(config: Config, slot: str) -> None:
    """Drop a slot that lost its WAL and create it again, reserving WAL from now on."""
    with connect(config) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))


def ensure_slot(config: Config, slot: str) -> str:
    """Create the physical slot if missing (reserving WAL now); its wal_status ('lost' means WAL is gone: a gap)."""
    with connect(config) as conn:
        row = conn.execute("SELECT slot_type, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if row is None:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            return "reserved"
        if row[0] != "physical":
            raise SidecarError(f"replication slot {slot} is a {row[0]} slot; set WAL_SLOT_NAME to another name or drop it")
        return str(row[1])
