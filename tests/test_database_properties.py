"""Issue 11: a restore carries what lives on the database itself (privileges, settings, comment,
connection limit, owner) into the restored database before the swap, and onto a brand-new server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sidecar import age
from sidecar.embedded import Cluster
from sidecar.logical.dbprops import split_list
from sidecar.postgres import find_tool
from tests.conftest import backup_id, cli

PROPERTIES = """
SELECT pg_get_userbyid(datdba), datconnlimit, shobj_description(oid, 'pg_database'),
       ARRAY(SELECT format('%s:%s:%s', CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable)
               FROM aclexplode(datacl) a ORDER BY 1),
       ARRAY(SELECT coalesce(pg_get_userbyid(NULLIF(s.setrole, 0)), '-') || ':' || array_to_string(s.setconfig, ';')
               FROM pg_db_role_setting s WHERE s.setdatabase = d.oid ORDER BY 1)
  FROM pg_database d WHERE datname = '{db}'
"""


def properties(cluster: Cluster, db: str) -> str:
    return cluster.psql(PROPERTIES.format(db=db))


def secure(cluster: Cluster, db: str) -> None:
    for role in ("db_owner", "appuser", "outsider"):
        if cluster.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'") == "0":
            cluster.psql(f"CREATE ROLE {role} LOGIN")
    cluster.psql(f'ALTER DATABASE "{db}" OWNER TO db_owner; REVOKE CONNECT ON DATABASE "{db}" FROM PUBLIC;'
                 f'GRANT CONNECT ON DATABASE "{db}" TO appuser; GRANT CREATE ON DATABASE "{db}" TO appuser WITH GRANT OPTION;'
                 f"ALTER DATABASE \"{db}\" SET work_mem = '7MB'; ALTER DATABASE \"{db}\" SET search_path = \"$user\", public, \"Odd, Schema\";"
                 f"ALTER ROLE appuser IN DATABASE \"{db}\" SET statement_timeout = '5s';"
                 f"COMMENT ON DATABASE \"{db}\" IS 'orders; don''t drop'; ALTER DATABASE \"{db}\" CONNECTION LIMIT 42")
    cluster.psql("CREATE TABLE secret (v text); INSERT INTO secret VALUES ('payroll'); GRANT SELECT ON secret TO appuser, outsider", db)


def can_connect(cluster: Cluster, db: str, role: str) -> bool:
    out = subprocess.run([find_tool("psql"), "-X", "-At", "-d", cluster.url(db, user=role), "-c", "SELECT v FROM secret"],
                         capture_output=True, text=True, check=False)
    return out.returncode == 0 and out.stdout.strip() == "payroll"


def test_a_swap_keeps_the_databases_privileges_settings_comment_and_connection_limit(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    secure(cluster, db)
    before = properties(cluster, db)
    assert not can_connect(cluster, db, "outsider") and can_connect(cluster, db, "appuser")
    bid = backup_id(env)
    recorded = json.loads(cli(env, "list", "--json").stdout)[0]
    assert recorded["id"] == bid
    out = json.loads(cli(env, "restore", "latest", "--json").stdout)
    assert out["mode"] == "swap"
    assert properties(cluster, db) == before
    assert not can_connect(cluster, db, "outsider"), "the restored database let in a role without CONNECT"
    assert can_connect(cluster, db, "appuser")
    cli(env, "restore", "latest", "--target-db", f"{db}_copy")
    assert properties(cluster, f"{db}_copy") == before.replace(db, f"{db}_copy")


def test_a_brand_new_server_gets_the_database_with_its_privileges_and_settings(cluster: Cluster, fresh_cluster: Cluster, db: str,
                                                                               env: dict[str, str], tmp_path: Path) -> None:
    """Encrypted: the settings and the comment (where a secret may live) are not readable in the metadata either."""
    secure(cluster, db)
    cluster.psql(f"ALTER DATABASE \"{db}\" SET application_name = 'hunter2-api-key'")
    before = properties(cluster, db)
    secret, public = age.generate_identity()
    (tmp_path / "key.txt").write_text(secret + "\n")
    env = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(tmp_path / "key.txt")}
    bid = backup_id(env)
    for path in Path(env["BACKUP_DIR"]).rglob("*.json"):
        text = path.read_text()
        assert "hunter2" not in text and "7MB" not in text and "t drop" not in text, f"{path.name} holds a database setting in plain text"
    out = json.loads(cli({**env, "DATABASE_URL": fresh_cluster.url(db)}, "restore", bid, "--json").stdout)
    assert out["mode"] == "new-database"
    assert properties(fresh_cluster, db) == before
    assert not can_connect(fresh_cluster, db, "outsider") and can_connect(fresh_cluster, db, "appuser")


@pytest.mark.parametrize(("stored", "items"), [
    ('"$user", public', ["$user", "public"]),
    ('"Odd, Schema", x', ["Odd, Schema", "x"]),
    ('a""b', ["ab"]),
    ('"a""b"', ['a"b']),
    ("", []),
])
def test_list_settings_split_like_postgresql(stored: str, items: list[str]) -> None:
    assert split_list(stored) == items
