"""The Python API, as an application would call it, against a real server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from sidecar import api
from sidecar.config import load_config
from sidecar.embedded import Cluster


def test_backups_are_listed_newest_first_and_pruned_by_age_keeping_pinned_and_newest(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    config = load_config(None, env)
    first = api.create_backup(config, keep=True)
    second = api.create_backup(config)
    third = api.create_backup(config, label="newest")
    assert [b.id for b in api.list_backups(config)] == [third.id, second.id, first.id]
    assert third.label == "newest" and all(b.status == "ok" for b in api.list_backups(config))

    later = datetime.now(timezone.utc) + timedelta(days=config.retention_days + 1)
    dry = api.prune_backups(config, dry_run=True, now=later)
    assert dry.deleted == [second.id] and len(api.list_backups(config)) == 3
    api.prune_backups(config, now=later)
    assert [b.id for b in api.list_backups(config)] == [third.id, first.id]

    api.set_pinned(first.id, False, config)
    api.prune_backups(config, now=later)
    assert [b.id for b in api.list_backups(config)] == [third.id]
    assert sorted(p.name for p in Path(env["BACKUP_DIR"]).iterdir() if not p.name.startswith(".")) == sorted(
        [third.metadata["files"]["dump"]["name"], third.metadata["files"]["globals"]["name"], f"{third.id}.metadata.json"])


def test_verify_and_restore_return_typed_reports(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10) g", db)
    config = load_config(None, env)
    backup = api.create_backup(config)
    report = api.verify_backup("latest", config)
    assert report.ok and report.backup_id == backup.id
    restored = api.restore_backup(backup.id, config)
    assert restored.mode == "swap" and restored.previous_database and restored.mismatches == []
    assert restored.tables_checked == 1


def test_a_restore_drill_records_its_outcome_and_leaves_no_scratch_database(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10) g", db)
    config = load_config(None, env)
    backup = api.create_backup(config)
    drilled = api.drill_backup("latest", config)
    assert drilled.ok and drilled.backup_id == backup.id
    assert api.get_backup(backup.id, config).metadata["verified"]["ok"] is True
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_drill%'") == "0"


def test_the_embedded_demo_starts_its_own_postgresql_and_takes_a_verified_backup(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "BACKUP_", "PG"))}
    result = subprocess.run([sys.executable, "-m", "sidecar.embedded"], env={**env, "BACKUP_DIR": str(tmp_path / "b")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ": OK" in result.stdout and len(list((tmp_path / "b").glob("*.metadata.json"))) == 1
