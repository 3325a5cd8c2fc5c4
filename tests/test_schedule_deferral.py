"""A scheduled backup that falls due while a base backup (or a restore, a drill) runs waits for it to end: it was
skipped before, so a weekly base backup of a large database cost that night's dump."""

from __future__ import annotations

import json
import logging
import time

import pytest

from sidecar.config import load_config
from sidecar.daemon.metrics import Metrics
from sidecar.daemon.scheduler import Daemon
from sidecar.embedded import Cluster
from sidecar.repository import Repository
from tests.conftest import cli


def test_a_backup_due_during_a_base_backup_runs_when_it_ends_and_one_due_during_a_backup_is_that_backup(
        cluster: Cluster, db: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for key, value in env.items():  # the daemon's children read the environment, as in the container
        monkeypatch.setenv(key, value)
    cluster.psql("CREATE TABLE t AS SELECT 1 AS one", db)
    config = load_config(None, env)
    daemon = Daemon(config, Metrics(Repository(config.backup_dir)))
    base_backup = daemon.metrics.in_progress.labels(operation="base_backup")

    # a base backup holds the daemon's one operation slot (what start_base_backup does) when the schedule fires
    assert daemon._run_lock.acquire(blocking=False)
    base_backup.set(1)
    daemon._backup_wanted = "schedule"
    with caplog.at_level(logging.INFO, logger="sidecar.daemon.scheduler"):
        for _ in range(3):  # the loop asks every second
            daemon.start_wanted_backup()
    assert daemon.runs == {}
    said = [r.getMessage() for r in caplog.records if "is due" in r.getMessage()]
    assert said == ["backup (schedule) is due; it starts when the running base backup has finished"]
    base_backup.set(0)
    daemon._run_lock.release()

    daemon.start_wanted_backup()
    [run] = daemon.runs.values()
    assert run["reason"] == "schedule, deferred" and daemon._backup_wanted is None
    deadline = time.monotonic() + 120
    while run["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run["state"] == "succeeded", run
    assert len(json.loads(cli(env, "list", "--json").stdout)) == 1

    # due while a backup runs: that backup is the one the schedule asked for, not a second one right after
    assert daemon._run_lock.acquire(timeout=30)
    daemon.metrics.in_progress.labels(operation="backup").set(1)
    daemon._backup_wanted = "schedule"
    daemon.start_wanted_backup()
    assert daemon._backup_wanted is None and len(daemon.runs) == 1
    daemon.metrics.in_progress.labels(operation="backup").set(0)
    daemon._run_lock.release()
