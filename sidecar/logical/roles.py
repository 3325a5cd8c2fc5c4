"""The roles a database refers to, as SQL that creates only the missing ones (from pg_dumpall)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import psycopg

IDENT = r'("(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)'
ROLE_LINE = re.compile(r"^(?:CREATE ROLE|ALTER ROLE|COMMENT ON ROLE|SECURITY LABEL FOR \S+ ON ROLE) " + IDENT + r"[ ;]")
GRANT_LINE = re.compile(r"^GRANT " + IDENT + r" TO " + IDENT + r"(.*?)(?: GRANTED BY " + IDENT + r")?;$")

REFERENCED_ROLES = """
WITH RECURSIVE direct AS (
    SELECT s.refobjid AS oid FROM pg_shdepend s
     WHERE s.refclassid = 'pg_authid'::regclass
       AND s.dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
    UNION SELECT datdba FROM pg_database WHERE datname = current_database()
    UNION SELECT setrole FROM pg_db_role_setting
           WHERE setrole <> 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
    UNION SELECT 10::oid
), closure AS (
    SELECT oid FROM direct
    UNION SELECT m.roleid FROM pg_auth_members m JOIN closure c ON m.member = c.oid
), members AS (
    SELECT oid FROM closure
    UNION SELECT m.member FROM pg_auth_members m JOIN members c ON m.roleid = c.oid
)
SELECT r.rolname FROM pg_roles r JOIN members c ON r.oid = c.oid WHERE r.rolname NOT LIKE 'pg\\_%'
"""


def referenced_roles(conn: psycopg.Connection[Any]) -> set[str]:
    """Owners and grantees of this database's objects, the database owner, the roles they belong to, and
    the members of those roles (the login roles that reach the data through a group)."""
    return {row[0] for row in conn.execute(REFERENCED_ROLES)}


def unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def filter_globals(dumpall_sql: str, wanted: set[str]) -> str:
    """Turn `pg_dumpall --roles-only` output into SQL that creates each wanted role only where it is
    missing, and never alters a role that already exists on the target."""
    statements: dict[str, list[str]] = defaultdict(list)
    grants: list[tuple[str, str]] = []
    for line in dumpall_sql.splitlines():
        if match := ROLE_LINE.match(line):
            if unquote(match.group(1)) in wanted:
                statements[unquote(match.group(1))].append(line)
        elif match := GRANT_LINE.match(line):
            role, member = unquote(match.group(1)), unquote(match.group(2))
            if role in wanted and member in wanted:
                grants.append((member, f"GRANT {match.group(1)} TO {match.group(2)}{match.group(3)};"))
    body = "\n".join(sum(statements.values(), []) + [g for _, g in grants])
    tag = "$sidecar$"
    while tag in body:
        tag = tag[:-1] + "_$"
    out = [
        "-- Roles this backup's database refers to. Each is created only if missing;",
        "-- roles that already exist are never altered.",
        "CREATE TEMPORARY TABLE sidecar_created_roles (rolname name);",
    ]
    for role in sorted(statements):
        lines = statements[role]
        if not any(line.startswith("CREATE ROLE") for line in lines):
            continue
        inner = "\n    ".join(lines)
        out.append(
            f"DO {tag} BEGIN\n  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal(role)}) THEN\n    {inner}\n"
            f"    INSERT INTO pg_temp.sidecar_created_roles VALUES ({literal(role)});\n  END IF;\nEND {tag};"
        )
    for member, grant in grants:
        out.append(
            f"DO {tag} BEGIN\n  IF EXISTS (SELECT FROM pg_temp.sidecar_created_roles WHERE rolname = {literal(member)}) THEN\n"
            f"    {grant}\n  END IF;\nEND {tag};"
        )
    return "\n".join(out) + "\n"
