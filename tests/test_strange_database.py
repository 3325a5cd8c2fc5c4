"""Issue 10 point 1: a large, heterogeneous database with findings it already had at backup time restores,
drills and validates without false findings; only a finding the round trip adds fails a restore."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sidecar.embedded import Cluster
from sidecar.logical.validation import Finding, split_known
from sidecar.postgres import find_tool
from tests.conftest import backup_id, cli, fingerprint

STRANGE = (Path(__file__).parent / "data" / "strange.sql").read_text()
KNOWN = {
    ("foreign_keys", "sales.discounts.discounts_customer_fkey"),
    ("check_constraints", "sales.discounts.discounts_code_present"),
    ("check_constraints", "sales.discounts.pct"),
    ("invalid_indexes", "sales.orders_customer_idx"),
}


@pytest.fixture
def strange(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    cluster.psql(STRANGE, db)
    config = tmp_path / "config.yaml"
    # a user check holding a literal % (LIKE) must run, not fail as "could not verify"
    config.write_text("validation:\n  amcheck: true\n  checks:\n    no_placeholder_notes: SELECT id FROM sales.orders WHERE note LIKE '%zzz%'\n")
    return {**env, "SIDECAR_CONFIG": str(config)}


def test_only_the_real_findings_of_a_strange_database_are_reported_with_the_right_advice(strange: dict[str, str]) -> None:
    out = cli(strange, "validate", "--json", check=False)
    data = json.loads(out.stdout)
    assert out.returncode == 1
    # no old serial sequence behind its identity column, no sequence on a column without a unique index,
    # no "could not verify" for partitioned B-tree indexes (amcheck on) or for a user check with a %
    assert {(f["check"], f["object"]) for f in data["findings"]} == KNOWN
    index = next(f for f in data["findings"] if f["check"] == "invalid_indexes")
    assert "ATTACH PARTITION" in index["message"] and "REINDEX" not in index["message"]
    assert index["sample"] == ["sales.orders_2026_01", "sales.orders_2026_02"]


def test_a_restore_and_a_drill_of_a_database_with_findings_it_already_had_succeed_and_report_them(
        cluster: Cluster, db: str, strange: dict[str, str]) -> None:
    # what the stock tools give: `pg_dump -Fc | pg_restore` into another database (it, too, puts the columns of
    # an inheritance child in its parent's order: PostgreSQL's pg_dump does, and so do we)
    stock = f"{db}_stock"
    cluster.psql(f'CREATE DATABASE "{stock}"')
    dump = subprocess.run([find_tool("pg_dump"), "-Fc", "-d", cluster.url(db)], capture_output=True, check=True).stdout
    subprocess.run([find_tool("pg_restore"), "--exit-on-error", "-d", cluster.url(stock)], input=dump, capture_output=True, check=True)
    before = fingerprint(cluster, stock)
    bid = backup_id(strange)
    drill = cli(strange, "drill", bid, "--json", check=False)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    report = json.loads(drill.stdout)
    assert report["ok"] and report["findings"] == [] and len(report["preexisting_findings"]) == len(KNOWN)
    cluster.psql("DELETE FROM sales.customers WHERE id BETWEEN 10 AND 19", db)  # the rule copies them to audit.deleted_customers
    out = cli(strange, "restore", bid, "--json", check=False)
    assert out.returncode == 0, out.stderr
    restored = json.loads(out.stdout)
    assert restored["mode"] == "swap" and restored["new_findings"] == [] and len(restored["preexisting_findings"]) == len(KNOWN)
    assert fingerprint(cluster, db) == before
    human = cli(strange, "drill", bid)
    assert "PASSED" in human.stdout and "already present when the backup was taken" in human.stdout
    listed = json.loads(cli(strange, "list", "--json").stdout)[0]
    assert listed["id"] == bid


def test_a_finding_the_backup_did_not_record_fails_the_restore_and_the_drill(cluster: Cluster, db: str, strange: dict[str, str]) -> None:
    bid = backup_id(strange)
    path = Path(strange["BACKUP_DIR"]) / f"{bid}.metadata.json"
    metadata = json.loads(path.read_text())
    # as if the round trip had added the orphan: the backup's own validation did not see it
    metadata["validation"]["findings"] = [f for f in metadata["validation"]["findings"] if f["check"] != "foreign_keys"]
    path.write_text(json.dumps(metadata))
    out = cli(strange, "restore", bid, check=False)
    assert out.returncode == 3 and "failed validation (foreign_keys: 1 rows of sales.discounts" in out.stderr
    assert "check_constraints" not in out.stderr.splitlines()[-1]
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_%'") == "0"
    drill = json.loads(cli(strange, "drill", bid, "--json", check=False).stdout)
    assert not drill["ok"] and [line.split(":")[0] for line in drill["findings"]] == ["foreign_keys"]


def test_an_encrypted_backup_keeps_no_row_values_in_its_plaintext_metadata(cluster: Cluster, db: str, strange: dict[str, str]) -> None:
    key = Path(strange["BACKUP_DIR"]).parent / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    plain = json.loads(cli(strange, "backup", "--json").stdout)
    assert any(f["sample"] for f in plain["validation"]["findings"])  # (99999), the orphan's key
    sealed = json.loads(cli({**strange, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public}, "backup", "--json").stdout)
    assert len(sealed["validation"]["findings"]) == len(KNOWN) and all(f["sample"] == [] for f in sealed["validation"]["findings"])
    assert "99999" not in (Path(strange["BACKUP_DIR"]) / f"{sealed['id']}.metadata.json").read_text()


def finding(check: str, obj: str, count: int | None, kind: str = "violation") -> Finding:
    return Finding(check, obj, count, "m", kind=kind)


def test_findings_are_known_only_with_the_same_check_object_and_kind_and_no_more_rows() -> None:
    recorded = {"findings": [{"check": "foreign_keys", "object": "a.b.fk", "count": 2, "kind": "violation"},
                             {"check": "sequences", "object": "a.s", "count": 1}]}
    found = [finding("foreign_keys", "a.b.fk", 2), finding("foreign_keys", "a.b.fk2", 1), finding("foreign_keys", "a.b.fk", 3),
             finding("sequences", "a.s", 1), finding("sequences", "a.s", None, "could_not_verify")]
    new, known = split_known(found, recorded)
    assert [(f.object, f.count) for f in known] == [("a.b.fk", 2), ("a.s", 1)]
    assert [(f.object, f.count, f.kind) for f in new] == [("a.b.fk2", 1, "violation"), ("a.b.fk", 3, "violation"), ("a.s", None, "could_not_verify")]
    assert split_known(found, None) == (found, [])
    assert split_known(found, {"findings": [{"bad": 1}, "junk"]}) == (found, [])
