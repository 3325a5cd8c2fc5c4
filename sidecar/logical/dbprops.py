"""What lives on a database rather than inside it, and so is not in a dump without --create: owner,
privileges (GRANT/REVOKE ... ON DATABASE), settings (ALTER DATABASE ... SET, ALTER ROLE ... IN DATABASE
... SET), comment and connection limit. Read at backup time into the metadata; given to the restored
database before it is swapped in, so a restore never opens a database to a role that had no access."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from sidecar import age
from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

READ = """
SELECT pg_get_userbyid(d.datdba), d.datconnlimit, shobj_description(d.oid, 'pg_database'), d.datacl IS NULL,
       ARRAY(SELECT jsonb_build_object('grantee', CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                                       'privilege', a.privilege_type, 'grantable', a.is_grantable)
               FROM aclexplode(d.datacl) a ORDER BY 1),
       ARRAY(SELECT jsonb_build_object('role', CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END,
                                       'settings', to_jsonb(s.setconfig))
               FROM pg_db_role_setting s WHERE s.setdatabase = d.oid ORDER BY 1)
  FROM pg_database d WHERE d.datname = %s
"""

# settings whose value is a list of separately quoted items (pg_dump's variable_is_guc_list_quote)
LIST_SETTINGS = {"local_preload_libraries", "search_path", "session_preload_libraries", "shared_preload_libraries", "temp_tablespaces",
                 "unix_socket_directories"}


def read(conn: psycopg.Connection[Any], dbname: str) -> dict[str, Any]:
    """The properties of database `dbname` (any connection to the same server)."""
    row = conn.execute(READ, (dbname,)).fetchone()
    if row is None:
        raise LookupError(dbname)
    owner, limit, comment, default_acl, acl, settings = row
    return {"owner": owner, "connectionLimit": limit, "comment": comment, "acl": None if default_acl else list(acl), "settings": list(settings)}


# what may hold a secret (a setting's value: a password in an extension's setting, a key; a comment): in an encrypted
# backup these travel age-encrypted to the backup's recipients inside the metadata, as the dump itself does
SEALED = ("comment", "settings")


def seal(props: dict[str, Any], recipients: Sequence[str]) -> dict[str, Any]:
    """The properties as the metadata of a backup encrypted to `recipients` holds them (unchanged without recipients)."""
    if not recipients:
        return props
    secret = io.BytesIO()
    age.encrypt(io.BytesIO(json.dumps({k: props.get(k) for k in SEALED}).encode()), secret, recipients)
    return {**{k: v for k, v in props.items() if k not in SEALED}, "sealed": base64.b64encode(secret.getvalue()).decode()}


def unseal(props: dict[str, Any] | None, identities: age.Identities | None) -> dict[str, Any] | None:
    """The properties as read at backup time, decrypting what `seal` encrypted."""
    if not props or "sealed" not in props:
        return props
    if identities is None:
        raise SidecarError("the backup's database settings are encrypted and no identity was given: set BACKUP_ENCRYPTION_IDENTITY_FILE")
    plain = io.BytesIO()
    try:
        age.decrypt(io.BytesIO(base64.b64decode(props["sealed"], validate=True)), plain, identities)
        opened = json.loads(plain.getvalue())
    except (ValueError, age.AgeError) as exc:
        raise SidecarError(f"the backup's encrypted database settings cannot be read ({exc}): the metadata is damaged or the "
                           "identity is not one of the backup's recipients") from None
    return {**{k: v for k, v in props.items() if k != "sealed"}, **{k: opened.get(k) for k in SEALED}}


def split_list(value: str) -> list[str]:
    """A list setting as stored (`"$user", public`) into its items (PostgreSQL's SplitGUCList)."""
    items, current, quoted, i = [], "", False, 0
    while i < len(value):
        char = value[i]
        if quoted:
            if char == '"' and value[i + 1:i + 2] == '"':
                current += '"'
                i += 1
            elif char == '"':
                quoted = False
            else:
                current += char
        elif char == '"':
            quoted = True
        elif char == ",":
            items.append(current.strip())
            current = ""
        else:
            current += char
        i += 1
    if current.strip() or items:
        items.append(current.strip())
    return items


def _set(name: str, value: str) -> sql.Composed:
    values = [sql.Literal(v) for v in split_list(value)] if name.lower() in LIST_SETTINGS else [sql.Literal(value)]
    return sql.SQL("SET {} TO {}").format(sql.Identifier(name), sql.SQL(", ").join(values) if values else sql.Literal(""))


def _role_exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def statements(conn: psycopg.Connection[Any], dbname: str, props: dict[str, Any]) -> tuple[list[sql.Composed], list[str]]:
    """(SQL that gives database `dbname` these properties, what had to be left out and why)."""
    db = sql.Identifier(dbname)
    out: list[sql.Composed] = []
    skipped: list[str] = []
    owner = props.get("owner")
    if owner and _role_exists(conn, owner):
        out.append(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, sql.Identifier(owner)))
    elif owner:
        skipped.append(f"owner {owner} (no such role here)")
    if props.get("connectionLimit") is not None:
        out.append(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(db, sql.Literal(int(props["connectionLimit"]))))
    out.append(sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(props.get("comment"))))
    if props.get("acl") is not None:
        # from nothing: the owner's and PUBLIC's default privileges go, then exactly the recorded ones come back
        revoke_from = [sql.SQL("PUBLIC")] + ([sql.Identifier(owner)] if owner and _role_exists(conn, owner) else [])
        out.append(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(db, sql.SQL(", ").join(revoke_from)))
        for item in props["acl"]:
            grantee = item["grantee"]
            if grantee != "PUBLIC" and not _role_exists(conn, grantee):
                skipped.append(f"{item['privilege']} for {grantee} (no such role here: the database stays closed to it)")
                continue
            out.append(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(item["privilege"]), db, sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee),
                sql.SQL(" WITH GRANT OPTION" if item.get("grantable") else "")))
    for entry in props.get("settings") or []:
        role = entry.get("role")
        if role is not None and not _role_exists(conn, role):
            skipped.append(f"settings of role {role} in this database (no such role here)")
            continue
        target = (sql.SQL("ALTER ROLE {} IN DATABASE {} ").format(sql.Identifier(role), db) if role
                  else sql.SQL("ALTER DATABASE {} ").format(db))
        for setting in entry.get("settings") or []:
            name, _, value = setting.partition("=")
            out.append(target + _set(name, value))
    return out, skipped


def apply(conn: psycopg.Connection[Any], dbname: str, props: dict[str, Any] | None) -> list[str]:
    """Give database `dbname` the recorded properties in one transaction, then read them back: returns the
    differences that remain (empty when it matches), after logging what had to be left out."""
    if not props:
        return []
    with conn.transaction():
        commands, skipped = statements(conn, dbname, props)
        for command in commands:
            conn.execute(command)
    for line in skipped:
        log.warning("database %s: left out %s", dbname, line)
    return differences(props, read(conn, dbname), skipped)


def differences(expected: dict[str, Any], actual: dict[str, Any], skipped: list[str]) -> list[str]:
    """What the restored database's properties lack or have beyond the recorded ones (what was left out excepted)."""
    out = []
    for key in ("owner", "connectionLimit", "comment", "acl", "settings"):
        if skipped and key in ("owner", "acl", "settings"):
            continue
        want, got = expected.get(key), actual.get(key)
        if isinstance(want, list) and isinstance(got, list):
            want_set, got_set = ({json.dumps(item, sort_keys=True) for item in items} for items in (want, got))
            if want_set != got_set:
                out.append(f"database {key}: missing {sorted(want_set - got_set)}, not in the backup {sorted(got_set - want_set)}")
        elif want != got:
            out.append(f"database {key}: {got!r}, the backup had {want!r}")
    return out
