"""PITR drills (issue 16) against real servers: a restore point with the exact row counts at it, restored from the base
backup and the archived WAL into a scratch server and compared; with writes going on, on a damaged archive, in the
metrics, and on the daemon's schedule."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry

from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, wait_for


class Writer(threading.Thread):
    """Commits as fast as it can until stopped: single inserts, and transactions that insert into one table and delete
    from the other (a restore point in the middle of one must see both changes or neither)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.commits, self.error = url, threading.Event(), 0, None  # type: ignore[var-annotated]

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                while not self.stop.is_set():
                    conn.execute("INSERT INTO a (note) VALUES ('single')")
                    with conn.transaction():
                        conn.execute("INSERT INTO a (note) SELECT 'pair' FROM generate_series(1, 3)")
                        conn.execute("DELETE FROM b WHERE id = (SELECT min(id) FROM b)")
                    self.commits += 2
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _drill(env: dict[str, str], check: bool = True) -> tuple[int, dict[str, Any], str]:
    result = cli(env, "drill", "--pitr", "--json", check=check)
    return result.returncode, json.loads(result.stdout), result.stderr


def _metrics(backups: Path) -> Any:
    from sidecar.daemon.metrics import Metrics
    from sidecar.repository import Repository

    return Metrics(Repository(backups), CollectorRegistry()).registry


def test_a_pitr_drill_passes_with_writes_going_on_and_fails_naming_a_corrupted_segment(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE a (id bigserial PRIMARY KEY, note text); CREATE TABLE b (id int PRIMARY KEY);"
                     "CREATE SCHEMA \"Odd schema\"; CREATE TABLE \"Odd schema\".\"c.d\" AS SELECT g FROM generate_series(1, 77) g;"
                     "CREATE UNLOGGED TABLE scratch AS SELECT 1 AS x; INSERT INTO b SELECT generate_series(1, 100000)")
    code, early, _ = _drill(pitr_env, check=False)  # nothing to restore from yet: fails at once, before any restore point
    assert code == 1 and "no good base backup" in early["error"] and early["restore_point_lsn"] is None, early
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    writer = Writer(wal_cluster.url("postgres"))
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(pitr_env, "base-backup")
        wait_for(lambda: json.loads(cli(pitr_env, "list", "--base", "--json").stdout)[0]["status"] == "ok", "the base backup's WAL")
        finished = datetime.fromisoformat(json.loads(cli(pitr_env, "list", "--base", "--json").stdout)[0]["finishedAt"].replace("Z", "+00:00"))
        writer.start()
        # writes going on, and over a second since the base backup ended: room for the drill's random moment
        wait_for(lambda: writer.commits > 100 and datetime.now(UTC) - finished > timedelta(seconds=1.5), "the writer to commit")
        before = writer.commits
        code, report, stderr = _drill(pitr_env)
        during = writer.commits - before
        assert code == 0 and report["ok"] and not report["mismatches"], (report, stderr)
        assert report["tables"] == 3 and report["restore_point"].startswith("pg_backup_sidecar_drill_"), report  # the unlogged one is left out
        assert 0 < report["writers_held_seconds"] < 1, report  # writers waited for the locks at most this long
        moment = report["random_moment"]  # recovery paused there first, every database readable, nothing replayed past it
        assert moment and moment["databases"] == ["postgres"] and moment["target"] < report["restore_point_time"], report
        assert (moment["replayedTo"] or "") <= moment["target"], report  # None: the moment came before the writer's first commit
        assert during > 50 and writer.error is None, (during, writer.error)  # the counts matched exactly although writes went on
        writer.stop.set()
        writer.join()
        assert wal_cluster.psql("SELECT count(*) FROM pg_database") == "3"  # postgres, template0, template1: nothing left behind
        registry = _metrics(backups)
        assert registry.get_sample_value("pg_backup_pitr_drill_last_success_timestamp_seconds") > 0
        assert registry.get_sample_value("pg_backup_pitr_drill_failures_total") == 1 and registry.get_sample_value("pg_backup_pitr_drill_last_ok") == 1
        assert registry.get_sample_value("pg_backup_pitr_drill_last_duration_seconds") == report["duration_seconds"]

        # a damaged archived segment (one the restore needs): the drill fails, names it, and changes nothing on the live server
        victim = report["segment"]
        [stored] = [p for p in backups.glob(f"wal/*/{victim[:8]}/{victim}.*") if not p.name.endswith(".json")]
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        live = wal_cluster.psql("SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b), (SELECT count(*) FROM pg_database)")
        code, failed, stderr = _drill(pitr_env, check=False)
        assert code == 1 and not failed["ok"] and victim in failed["error"] and "damaged" in failed["error"], (failed, stderr)
        text = cli(pitr_env, "drill", "--pitr", check=False)
        assert text.returncode == 1 and "PITR drill FAILED" in text.stdout and victim in text.stdout, text.stdout + text.stderr
        assert wal_cluster.psql("SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b), (SELECT count(*) FROM pg_database)") == live
    finally:
        writer.stop.set()
        assert receiver.stop() == 0
    registry = _metrics(backups)
    assert registry.get_sample_value("pg_backup_pitr_drill_failures_total") == 3
    assert registry.get_sample_value("pg_backup_pitr_drill_last_failure_timestamp_seconds") > registry.get_sample_value(
        "pg_backup_pitr_drill_last_success_timestamp_seconds") > 0
    assert registry.get_sample_value("pg_backup_pitr_drill_last_ok") == 0


def test_the_daemon_runs_pitr_drills_on_pitr_drill_schedule_and_shows_them_in_runs_and_metrics(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                               tmp_path: Path) -> None:
    from tests.test_daemon import Running, request, sample

    wal_cluster.psql("CREATE TABLE t AS SELECT generate_series(1, 1234) AS id")
    # the schedule's next time is hours away: with no drill recorded, the daemon catches up once its base backup is good
    running = Running({**pitr_env, "WAL_ARCHIVING": "true", "PITR_DRILL_SCHEDULE": "0 4 * * *", "DRILL_AFTER_BACKUP": "false"},
                      tmp_path / "daemon.log")
    try:
        run = running.wait_for(lambda: next((r for r in request(running.base, "/v1/runs")[1] if r.get("operation") == "pitr-drill"
                                             and r["state"] != "running"), None), "the daemon's PITR drill", timeout=120)
        assert run["state"] == "succeeded" and run["reason"].startswith("catch-up") and run["result"]["tables"] == 1, run
        assert run["result"]["rows"] == 1234 and run["result"]["mismatches"] == [], run
        import jsonschema
        import yaml

        spec = yaml.safe_load((Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text())
        jsonschema.validate(run, {**spec["components"]["schemas"]["Run"], "components": spec["components"]},
                            cls=jsonschema.Draft202012Validator)  # as docs/openapi.yaml says
        metrics = request(running.base, "/metrics")[1]
        assert sample(metrics, "pg_backup_pitr_drill_last_success_timestamp_seconds") > 0 and sample(metrics, "pg_backup_pitr_drill_failures_total") == 0
        assert 'pg_backup_in_progress{operation="pitr_drill"} 0.0' in metrics and "next PITR drill at" in running.log.read_text()
        # one by hand beside the daemon, on a quiet server (no commit between the random moment and the restore point but
        # the drill's own): it passes through its random moment, and the daemon's metrics count it
        code, report, stderr = _drill(pitr_env)
        assert code == 0 and report["random_moment"] and report["random_moment"]["target"] < report["anchor_time"], (report, stderr)
        assert sample(request(running.base, "/metrics")[1], "pg_backup_pitr_drill_passes_total") == 2
    finally:
        assert running.stop() == 0


def test_the_charts_drill_pitr_schedule_reaches_the_sidecar_and_needs_wal_enabled(tmp_path: Path) -> None:
    import pytest
    import yaml

    from sidecar.config import load_config
    from tests.test_helm import render

    docs = render({"drill": {"pitrSchedule": "30 4 * * *"}, "wal": {"enabled": True}})
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"])
    loaded = load_config(tmp_path / "config.yaml", {"DATABASE_URL": "postgresql://u@h/db"})
    assert loaded.pitr_drill_cron == "30 4 * * *" and loaded.wal_archiving
    assert "pitr_cron" not in yaml.safe_load([d for d in render({}) if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]][0]["data"]["config.yaml"])["drill"]
    with pytest.raises(Exception, match="drill.pitrSchedule restores from the WAL archive"):
        render({"drill": {"pitrSchedule": "30 4 * * *"}})


def test_pitr_drill_schedule_without_wal_archiving_is_one_config_error_and_drill_pitr_takes_no_backup_id() -> None:
    import os

    env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://u@h/db", "PITR_DRILL_SCHEDULE": "30 4 * * *"}
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2 and result.stderr.count("config error:") == 1 and "WAL_ARCHIVING=true" in result.stderr, result.stderr
    result = cli({**env, "PITR_DRILL_SCHEDULE": ""}, "drill", "--pitr", "backup_2026-01-01T00-00-00-000Z", check=False)
    assert result.returncode == 2 and "leave out the backup id" in result.stderr and "Traceback" not in result.stderr, result.stderr
