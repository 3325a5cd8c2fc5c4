"""The recovery window (earliest and latest recoverable moment per system and timeline) and the WAL metrics: the pure
computation, and `list --wal`, /v1/recovery-window and /metrics of a real daemon streaming a real server's WAL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sidecar.physical.wal import Timeline
from sidecar.physical.window import SegmentTimes, windows
from tests.conftest import cli
from tests.physical.conftest import WalCluster, archived, switch
from tests.test_helm import WAL_METRICS

MiB = 1 << 20
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _base(backup_id: str, start_segno: int, finished_minutes: int, timeline: int = 1) -> dict[str, Any]:
    return {"id": backup_id, "systemIdentifier": "7", "timeline": timeline, "walSegmentSize": MiB, "startLsn": f"0/{start_segno * MiB:X}",
            "finishedAt": (T0 + timedelta(minutes=finished_minutes)).isoformat()}


def _lookup(commits: dict[int, int | None], readable: bool = True) -> Any:
    def lookup(system: str, name: str) -> SegmentTimes:
        minutes = commits.get(int(name[16:], 16))
        return SegmentTimes(T0 + timedelta(minutes=minutes) if minutes is not None else None, readable, T0 + timedelta(hours=5))
    return lookup


def test_the_window_runs_from_the_oldest_base_backups_end_to_the_last_commit_a_base_backup_reaches_without_a_gap() -> None:
    line = Timeline("7", 1, MiB, [2, 3, 4, 5, 7, 8, 9])  # 6 is missing
    [w] = windows([line], [_base("old", 2, 1)], _lookup({5: 40, 9: 90}))
    assert (w.earliest, w.earliest_backup) == (T0 + timedelta(minutes=1), "old")
    assert (w.latest, w.latest_basis, w.latest_segment, w.gaps) == (T0 + timedelta(minutes=40), "last-commit", "000000010000000000000005",
                                                                    ["000000010000000000000006"])
    # a base backup taken after the gap reaches the end again; the newest segments without a commit are looked through
    [w] = windows([line], [_base("new", 7, 70), _base("old", 2, 1)], _lookup({5: 40, 8: 85, 9: None}))
    assert (w.earliest_backup, w.latest, w.latest_segment) == ("old", T0 + timedelta(minutes=85), "000000010000000000000009")
    # WAL this pg_waldump cannot read: the newest segment's archive time stands in, and says so
    [w] = windows([line], [_base("new", 7, 70)], _lookup({}, readable=False))
    assert (w.latest, w.latest_basis) == (T0 + timedelta(hours=5), "archived-at")
    # no good base backup: no window; a later timeline is reached from its parent's base backup
    assert windows([line], [], _lookup({}))[0].earliest is None
    [_, w2] = windows([line, Timeline("7", 2, MiB, [9, 10])], [_base("old", 2, 1)], _lookup({10: 100}))
    assert (w2.earliest_backup, w2.latest) == ("old", T0 + timedelta(minutes=100))


def sample(metrics: str, name: str) -> float:
    for text in metrics.splitlines():
        if text.split(" ")[0] == name:
            return float(text.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def test_list_wal_the_http_api_and_the_metrics_show_the_recovery_window_and_archiving_state(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                            tmp_path: Path) -> None:
    from tests.test_daemon import Running, request

    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")
    running = Running({**pitr_env, "WAL_ARCHIVING": "true"}, tmp_path / "daemon.log")
    try:
        first = switch(wal_cluster)
        running.wait_for(lambda: archived(backups, first), "the daemon's receiver to archive a segment")
        # no good base backup yet: the daemon takes one at start-up (its catch-up), the window's earliest moment
        base = running.wait_for(lambda: min((b for b in json.loads(cli(pitr_env, "list", "--base", "--json").stdout) if b["status"] == "ok"),
                                            key=lambda b: b["id"], default=None), "the daemon's start-up base backup", timeout=90)
        before = datetime.now(UTC)
        wal_cluster.psql("INSERT INTO t SELECT generate_series(1, 100)")
        after = datetime.now(UTC)
        last = switch(wal_cluster)
        running.wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
        [line] = json.loads(cli(pitr_env, "list", "--wal", "--json").stdout)
        window = line["recoveryWindow"]
        assert window["earliest"] == base["finishedAt"] and window["earliestBaseBackup"] == base["id"], window
        latest = datetime.fromisoformat(window["latest"].replace("Z", "+00:00"))
        assert window["latestBasis"] == "last-commit" and before - timedelta(seconds=1) <= latest <= after + timedelta(seconds=1), (window, before, after)
        shown = cli(pitr_env, "list", "--wal").stdout
        assert f"recoverable from {base['finishedAt']} (end of base backup {base['id']}) to {window['latest']} (the last commit archived" in shown, shown
        assert request(running.base, "/v1/recovery-window", token=None)[0] == 401
        status, body = request(running.base, "/v1/recovery-window")
        assert status == 200 and body["timelines"][0]["latest"] == window["latest"], body
        import jsonschema
        import yaml

        spec = yaml.safe_load((Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text())
        schema = spec["paths"]["/v1/recovery-window"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)  # as docs/openapi.yaml says
        running.wait_for(lambda: sample(request(running.base, "/metrics")[1], "pg_backup_wal_receiver_up") == 1, "the receiver to show as up", timeout=15)
        metrics = request(running.base, "/metrics")[1]
        assert abs(sample(metrics, "pg_backup_recovery_window_last_timestamp_seconds") - latest.timestamp()) < 1e-5
        assert sample(metrics, "pg_backup_recovery_window_first_timestamp_seconds") == datetime.fromisoformat(base["finishedAt"]).timestamp()
        assert 'pg_backup_wal_slot_status{status="reserved"} 1.0' in metrics, metrics
        assert 0 <= sample(metrics, "pg_backup_wal_slot_retained_bytes") < 4 * MiB
        assert sample(metrics, "pg_backup_wal_slot_keep_limit_bytes") == float("inf")  # the test clusters keep max_slot_wal_keep_size = -1
        spool = sum(p.stat().st_size for p in (backups / "wal" / "spool").iterdir() if not p.name.startswith("."))
        assert sample(metrics, "pg_backup_wal_spool_bytes") == spool  # a partial segment once WAL after the switch arrives
        assert sample(metrics, "pg_backup_wal_unarchived_segments") == 0 and sample(metrics, "pg_backup_wal_gaps") == 0
        assert 0 <= sample(metrics, "pg_backup_wal_archive_age_seconds") < 60 and 0 <= sample(metrics, "pg_backup_base_backup_age_seconds") < 120
        promtool = shutil.which("promtool")
        assert promtool, "promtool (Debian package prometheus) is required"
        check = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # every WAL series the chart's alerts and dashboard use is exported (tests/test_helm.py checks the others)
        chart = Path(__file__).parents[2] / "helm" / "pg-backup-sidecar" / "files"
        used = set(re.findall(r"\bpg_backup_[a-z_]+", (chart / "alerts.yaml").read_text() + (chart / "dashboard.json").read_text()))
        wal = {m for m in used if m.startswith(WAL_METRICS)}
        assert len(wal) >= 6 and wal <= set(re.findall(r"^(pg_backup_[a-z_]+)", metrics, flags=re.M)), wal
        # the window's latest moment is the last commit archived: --to-latest has it
        restored = WalCluster(port=54335)
        try:
            cli(pitr_env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
            restored.start_existing()
            restored.wait_promoted()
            assert restored.psql("SELECT count(*) FROM t") == "100"
        finally:
            restored.destroy()
        # a segment lost after the base backup began is a gap until the next base backup
        for path in backups.glob(f"wal/*/{first[:8]}/{last}.*"):
            path.unlink()
        middle = switch(wal_cluster)
        running.wait_for(lambda: archived(backups, middle), f"segment {middle} to be archived")
        assert sample(request(running.base, "/metrics")[1], "pg_backup_wal_gaps") == 1
        # the daemon answers a hole as it answers a gap the receiver noted: a base backup, after which the metric is 0 again
        running.wait_for(lambda: (json.loads(cli(pitr_env, "list", "--base", "--json").stdout)[0]["id"] > base["id"]) or (switch(wal_cluster) and False),
                         "a base backup answering the hole", timeout=90)
        running.wait_for(lambda: sample(request(running.base, "/metrics")[1], "pg_backup_wal_gaps") == 0 or (switch(wal_cluster) and False),
                         "the new base backup to be good and the gap gone", timeout=90)
        assert f"segment {last} is missing from the archive" in running.log.read_text()
    finally:
        assert running.stop() == 0
