"""Consistency checks against real PostgreSQL: clean databases pass, each injected defect is found."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from sidecar import api
from sidecar.config import load_config
from sidecar.embedded import Cluster
from sidecar.logical.validation import Runner, check_constraints
from tests.conftest import backup_id, cli, load_dataset

SCHEMA = """
CREATE SCHEMA other;
CREATE TABLE other.parents (a int, b int, PRIMARY KEY (a, b));
CREATE TABLE children (id serial PRIMARY KEY, pa int, pb int, boss int REFERENCES children,
                       FOREIGN KEY (pa, pb) REFERENCES other.parents);
INSERT INTO other.parents VALUES (1, 1), (1, 2);
INSERT INTO children (pa, pb) VALUES (1, 1), (1, 2), (NULL, 5);
UPDATE children SET boss = 1 WHERE id > 1;
"""


def result_for(env: dict[str, str]) -> tuple[int, dict[str, object]]:
    out = cli(env, "validate", "--json", check=False)
    return out.returncode, json.loads(out.stdout) if out.stdout else {}


def findings(env: dict[str, str]) -> list[tuple[str, str, object]]:
    code, data = result_for(env)
    assert code in (0, 1), data
    return [(f["check"], f["object"], f["count"]) for f in data["findings"]]  # type: ignore[attr-defined, index]


def test_a_clean_database_validates_with_exit_0(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql(SCHEMA, db)
    code, data = result_for(env)
    assert code == 0 and data["ok"] is True and set(data["checkSeconds"]) >= {"foreign_keys", "sequences"}  # type: ignore[operator]


@pytest.mark.parametrize("dataset", ["chinook.sql", "pagila-schema.sql"])
def test_the_sample_datasets_validate_clean(cluster: Cluster, db: str, env: dict[str, str], dataset: str) -> None:
    load_dataset(cluster, db, dataset)
    assert findings(env) == []


def test_orphans_loaded_with_triggers_bypassed_are_found_multi_column_across_schemas_and_self_references(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql(SCHEMA, db)
    cluster.psql("SET session_replication_role = replica; INSERT INTO children (pa, pb, boss) VALUES (7, 7, 99), (7, 8, NULL)", db)
    found = findings(env)
    assert ("foreign_keys", "public.children.children_pa_pb_fkey", 2) in found
    assert ("foreign_keys", "public.children.children_boss_fkey", 1) in found
    data = json.loads(cli(env, "validate", "--json", check=False).stdout)
    sample = next(f["sample"] for f in data["findings"] if f["object"] == "public.children.children_pa_pb_fkey")
    assert sorted(sample) == ["(7,7)", "(7,8)"]


def test_not_valid_check_and_foreign_key_violations_are_found(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql(SCHEMA, db)
    cluster.psql("CREATE DOMAIN small AS int; CREATE TABLE prices (id int, amount int, size small);"
                 "INSERT INTO prices VALUES (1, -5, 50), (2, 10, 500), (3, NULL, 1);"
                 "ALTER TABLE prices ADD CONSTRAINT positive CHECK (amount > 0) NOT VALID;"
                 "ALTER DOMAIN small ADD CONSTRAINT below_100 CHECK (VALUE < 100) NOT VALID;"
                 "CREATE TABLE refs (pid int); INSERT INTO refs VALUES (42);"
                 "ALTER TABLE refs ADD CONSTRAINT refs_fk FOREIGN KEY (pid) REFERENCES children NOT VALID", db)
    found = findings(env)
    assert ("check_constraints", "public.prices.positive", 1) in found
    assert ("check_constraints", "public.prices.size", 1) in found
    assert ("foreign_keys", "public.refs.refs_fk", 1) in found


def test_an_invalid_index_from_a_failed_concurrent_build_is_found(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1), (1)", db)
    with pytest.raises(RuntimeError, match="could not create unique index"):
        cluster.psql("CREATE UNIQUE INDEX CONCURRENTLY t_v ON t (v)", db)
    assert findings(env) == [("invalid_indexes", "public.t_v", 1)]


def test_a_sequence_behind_its_column_is_found_with_the_fix(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (id serial PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY); INSERT INTO t (id) VALUES (1), (2), (50);"
                 "SELECT setval('t_id_seq', 10)", db)
    code, data = result_for(env)
    assert code == 1
    [finding] = data["findings"]  # type: ignore[misc]
    assert finding["object"] == "public.t_id_seq" and "already holds 50" in finding["message"] and "setval" in finding["message"]


def test_user_checks_from_config_yaml_report_the_first_rows(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE orders (id int); CREATE TABLE lines (order_id int); INSERT INTO orders VALUES (1), (2), (3); INSERT INTO lines VALUES (1)", db)
    config = tmp_path / "config.yaml"
    config.write_text("validation:\n  checks:\n    orders_have_lines: SELECT id FROM orders o WHERE NOT EXISTS (SELECT 1 FROM lines l WHERE l.order_id = o.id);\n")
    out = cli({**env, "SIDECAR_CONFIG": str(config)}, "validate", check=False)
    assert out.returncode == 1
    assert "user check orders_have_lines returned 2 rows" in out.stdout and "(2)" in out.stdout


def test_a_check_that_times_out_is_a_could_not_verify_finding(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("validation:\n  statement_timeout_seconds: 1\n  checks:\n    slow: SELECT 1 FROM pg_sleep(3)\n")
    code, data = result_for({**env, "SIDECAR_CONFIG": str(config)})
    assert code == 1
    assert [(f["kind"], f["object"]) for f in data["findings"]] == [("could_not_verify", "slow")]  # type: ignore[attr-defined]


def test_validate_exits_3_when_it_cannot_run(env: dict[str, str], tmp_path: Path) -> None:
    out = cli({**env, "DATABASE_URL": f"postgresql://postgres@/x?host={tmp_path}&port=1"}, "validate", check=False)
    assert out.returncode == 3 and "cannot connect" in out.stderr


def test_backups_carry_their_validation_result_and_can_be_refused(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql(SCHEMA + "SET session_replication_role = replica; INSERT INTO children (pa, pb) VALUES (9, 9);", db)
    meta = json.loads(cli(env, "backup", "--json").stdout)
    assert meta["validation"]["ok"] is False and meta["validation"]["findings"][0]["check"] == "foreign_keys"
    refused = cli({**env, "VALIDATION_BLOCK_BACKUP_ON_FAILURE": "true"}, "backup", check=False)
    assert refused.returncode == 3 and "backup refused" in refused.stderr
    assert len(json.loads(cli(env, "list", "--json").stdout)) == 1


def test_a_restore_that_fails_validation_does_not_replace_the_live_database(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql(SCHEMA, db)
    bid = backup_id(env)
    cluster.psql("INSERT INTO other.parents VALUES (5, 5)", db)
    config = tmp_path / "config.yaml"
    config.write_text("validation:\n  checks:\n    has_parent_5: SELECT 1 FROM other.parents WHERE a = 5 HAVING count(*) = 0\n")
    failing = {**env, "SIDECAR_CONFIG": str(config)}
    out = cli(failing, "restore", bid, check=False)
    assert out.returncode == 3 and "failed validation" in out.stderr and "live database was not touched" in out.stderr
    assert cluster.psql("SELECT count(*) FROM other.parents", db) == "3"
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}__restore%'") == "0"
    cli(failing, "restore", bid, "--force")
    assert cluster.psql("SELECT count(*) FROM other.parents", db) == "2"


def test_the_python_api_returns_is_valid_and_errors(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (id serial PRIMARY KEY); INSERT INTO t (id) VALUES (5)", db)
    result = api.validate_data_consistency(load_config(None, env))
    assert not result.is_valid and result.errors[0].startswith("sequences:")
    assert result.counts_by_check() == {"sequences": 1}


def test_not_valid_checks_of_one_table_are_counted_in_one_scan_with_the_same_findings(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE DOMAIN small AS int; CREATE TABLE lines (id int, qty int, price int, size small);"
                 "INSERT INTO lines SELECT g, g % 5, g % 7 - 1, g % 150 FROM generate_series(1, 1000) g;"
                 "ALTER TABLE lines ADD CONSTRAINT qty_positive CHECK (qty > 0) NOT VALID;"
                 "ALTER TABLE lines ADD CONSTRAINT price_positive CHECK (price >= 0) NOT VALID;"
                 "ALTER TABLE lines ADD CONSTRAINT id_positive CHECK (id > 0) NOT VALID;"
                 "ALTER DOMAIN small ADD CONSTRAINT below_100 CHECK (VALUE < 100) NOT VALID;"
                 # one expression raises an error on some rows: it cannot be verified, its neighbour still can
                 "CREATE TABLE odd (n int); INSERT INTO odd VALUES (1), (0), (-1);"
                 "ALTER TABLE odd ADD CONSTRAINT inverse CHECK (1 / n > -5) NOT VALID;"
                 "ALTER TABLE odd ADD CONSTRAINT non_negative CHECK (n >= 0) NOT VALID", db)
    config = load_config(None, env)
    with psycopg.connect(cluster.url(db), autocommit=True) as conn:
        def scans() -> int:
            conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's counters are flushed before it answers the next query
            return int(conn.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'lines'").fetchone()[0])  # type: ignore[index]

        before = scans()
        found = check_constraints(Runner(conn, 60), config)
        assert scans() - before == 1  # one scan of lines for its four NOT VALID constraints (four scans before)
    assert [(f.object, f.count, f.kind) for f in found] == [
        ("public.lines.price_positive", 142, "violation"), ("public.lines.qty_positive", 200, "violation"),
        ("public.odd.inverse", None, "could_not_verify"), ("public.odd.non_negative", 1, "violation"),
        ("public.lines.size", 301, "violation")]
    assert found[0].message == "142 rows of public.lines violate CHECK price_positive (NOT VALID)"
    assert "division by zero" in found[2].message
    assert found[4].message == "301 rows of public.lines.size violate domain public.small constraint below_100 (NOT VALID)"
