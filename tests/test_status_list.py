"""Status that tells the truth: list, latest and retention see failed restore drills (real drills, real CLI)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sidecar import api
from sidecar.config import load_config
from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli

SCHEMA = """
CREATE TABLE customers (id int PRIMARY KEY, name text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers);
INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 50) g;
INSERT INTO orders SELECT g, 1 + g % 50 FROM generate_series(1, 200) g;
"""

# an order whose customer is gone, slipped past the foreign key (as a replication or a bulk load with
# session_replication_role = replica can): the dump holds it, and restoring the dump fails on the key
ORPHAN = "SET session_replication_role = replica; INSERT INTO orders VALUES (1000, 999);"


def two_backups_the_newer_failing_its_drill(cluster: Cluster, db: str, env: dict[str, str]) -> tuple[str, str]:
    cluster.psql(SCHEMA, db)
    good = backup_id(env)
    assert cli(env, "drill", good).returncode == 0
    cluster.psql(ORPHAN, db)
    bad = backup_id(env)
    drilled = cli(env, "drill", bad, check=False)
    assert drilled.returncode == 1, drilled.stdout + drilled.stderr
    return good, bad


def test_list_shows_which_backups_failed_their_drill_and_which_had_validation_findings(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    good, bad = two_backups_the_newer_failing_its_drill(cluster, db, env)
    table = cli(env, "list").stdout.splitlines()
    header = table[0].split()
    assert header[5:8] == ["DRILL", "VALIDATION", "STATUS"], table[0]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "  failed  " in rows[bad] and "  1 finding  " in rows[bad]
    assert "  passed  " in rows[good] and "  clean  " in rows[good]
    listed = {b["id"]: b for b in json.loads(cli(env, "list", "--json").stdout)}
    assert (listed[bad]["drillStatus"], listed[bad]["validationStatus"], listed[bad]["status"]) == ("failed", "1 finding", "ok")
    assert (listed[good]["drillStatus"], listed[good]["validationStatus"]) == ("passed", "clean")
    assert listed[bad]["verified"]["ok"] is False and listed[bad]["verified"]["findings"]
    backups = {b.id: b for b in api.list_backups(load_config(None, env))}
    assert (backups[bad].drill, backups[bad].validation, backups[good].drill) == ("failed", "1 finding", "passed")


def test_restore_latest_skips_a_backup_whose_drill_failed_and_says_which_it_chose(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    good, bad = two_backups_the_newer_failing_its_drill(cluster, db, env)
    restored = cli(env, "restore", "latest", "--target-db", f"{db}_copy", check=False)
    assert restored.returncode == 0, restored.stderr  # the newer backup cannot be restored at all
    assert f"restored {good} into {db}_copy" in restored.stdout
    assert f"latest: {good} (newest good backup that has not failed a restore drill, drill passed); skipped {bad} whose drill failed on " in restored.stderr
    assert cluster.psql("SELECT count(*) FROM orders", f"{db}_copy") == "200"
    verified = cli(env, "verify", "latest")
    assert verified.stdout.startswith(f"{good}: OK") and f"latest: {good} " in verified.stderr


def test_retention_keeps_the_newest_backup_whose_drill_passed(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    good, bad = two_backups_the_newer_failing_its_drill(cluster, db, env)
    # forty days on, with 30 days' retention: the failed one is the newest, the good one would have gone
    later = datetime.now(timezone.utc) + timedelta(days=40)
    pruned = api.prune_backups(load_config(None, env), dry_run=True, now=later)
    assert pruned.deleted == []
    assert {d["id"]: d["reason"] for d in pruned.decisions} == {bad: "newest good backup", good: "newest backup whose restore drill passed"}
    dry = cli({**env, "BACKUP_RETENTION_DAYS": "0", "BACKUP_KEEP_LAST": "1"}, "prune", "--dry-run")
    assert dry.stdout.splitlines() == ["would delete 0, kept 2",
                                       f"  keep: {bad}: newest good backup; one of the last 1 good backups",
                                       f"  keep: {good}: newest backup whose restore drill passed"]


def test_prune_dry_run_names_the_rule_behind_every_decision(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql(SCHEMA, db)
    ids = [backup_id(env) for _ in range(3)]
    tiers = {**env, "BACKUP_RETENTION_DAYS": "0", "BACKUP_KEEP_LAST": "2", "DRILL_AFTER_BACKUP": "false"}
    today = ids[2][len("backup_"):][:10]  # the newest backup's day (UTC)
    dry = cli({**tiers, "BACKUP_KEEP_DAILY": "1"}, "prune", "--dry-run").stdout.splitlines()
    assert dry == ["would delete 1, kept 2",
                   f"  keep: {ids[2]}: newest good backup; one of the last 2 good backups; daily ({today})",
                   f"  keep: {ids[1]}: one of the last 2 good backups",
                   f"  would delete: {ids[0]}: not one of the last 2 good backups, not the daily backup kept for its period"]
    assert len(json.loads(cli(env, "list", "--json").stdout)) == 3  # a dry run deletes nothing
    done = cli(tiers, "prune").stdout.splitlines()
    assert done == ["deleted 1, kept 2", f"  deleted: {ids[0]}: not one of the last 2 good backups"]
    assert cli(tiers, "prune").stdout.splitlines() == ["deleted 0, kept 2"]  # pruning again deletes nothing more


def test_when_every_backup_failed_its_drill_latest_is_still_the_newest_with_a_warning(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql(SCHEMA + ORPHAN, db)
    only = backup_id(env)
    assert cli(env, "drill", only, check=False).returncode == 1
    verified = cli(env, "verify", "latest")
    assert verified.stdout.startswith(f"{only}: OK")  # the files are fine; it is the restore that fails
    [line] = [x for x in verified.stderr.splitlines() if "latest:" in x]
    assert " WARNING " in line and f"latest: {only} (newest good backup) although its restore drill failed on " in line
    assert "every good backup failed its drill" in line
