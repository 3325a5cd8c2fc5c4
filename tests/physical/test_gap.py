"""A slot that loses WAL while the daemon runs (max_slot_wal_keep_size while the receiver is held up): the gap is noted,
the slot made again, the stranded `.partial` archived, streaming goes on, and a base backup answers the gap; the archive
after it restores. (tests/physical/test_lifecycle.py covers the schedule and the once-an-hour limit between restarts.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.physical.conftest import WalCluster, archived, list_wal, switch


def _pids(parent: int, pattern: str) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(parent), "-f", pattern], capture_output=True, text=True).stdout.split()]


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_a_slot_that_loses_wal_while_the_daemon_runs_is_made_again_and_streaming_and_base_backups_go_on(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                       tmp_path: Path) -> None:
    from tests.test_daemon import Running

    backups = Path(pitr_env["BACKUP_DIR"])
    env = {**pitr_env, "WAL_ARCHIVING": "true", "BACKUP_SCHEDULE": "0 0 1 1 *", "BASE_BACKUP_SCHEDULE": "0 0 1 1 *"}
    wal_cluster.psql("CREATE TABLE t (id int)")
    running = Running(env, tmp_path / "daemon.log")

    def bases() -> list[dict[str, object]]:
        return json.loads(cli(env, "list", "--base", "--json").stdout)  # type: ignore[no-any-return]

    try:
        # no base backup yet: one is taken at start-up (catch-up), and is good once its WAL is archived
        running.wait_for(lambda: [b["status"] for b in bases()] == ["ok"], "the start-up base backup to be good", timeout=90)
        first = bases()[0]["id"]
        assert "base backup started (catch-up" in running.log.read_text()

        # the slot may keep 2 MB; the receiver is stopped (frozen, its pg_receivewal gone) while 6 MB are written and
        # checkpointed: the slot loses WAL the archive does not have
        wal_cluster.psql("ALTER SYSTEM SET max_slot_wal_keep_size = '2MB'; SELECT pg_reload_conf()")
        [wal_receive] = _pids(running.proc.pid, "wal-receive")
        [pg_receivewal] = _pids(wal_receive, "pg_receivewal")
        os.kill(wal_receive, signal.SIGSTOP)
        try:
            os.kill(pg_receivewal, signal.SIGKILL)
            running.wait_for(lambda: wal_cluster.psql("SELECT count(*) FROM pg_stat_replication") == "0", "the walsender to end")
            for i in range(6):
                wal_cluster.psql(f"INSERT INTO t VALUES ({i})")
                switch(wal_cluster)
            wal_cluster.psql("CHECKPOINT")
            running.wait_for(lambda: wal_cluster.psql("SELECT wal_status FROM pg_replication_slots") == "lost", "the slot to lose WAL")
        finally:
            os.kill(wal_receive, signal.SIGCONT)

        # the gap is recorded, the slot made again, streaming goes on, and a base backup answers the gap
        running.wait_for(lambda: len(bases()) == 2 and all(b["status"] == "ok" for b in bases()), "a base backup after the gap", timeout=120)
        log = running.log.read_text()
        assert "has lost WAL (wal_status 'lost')" in log and "base backup started (gap" in log, log[-3000:]
        assert log.count("base backup started") == 2  # one per gap, not one per log line about it
        wal_cluster.psql("INSERT INTO t VALUES (100)")
        last = switch(wal_cluster)
        running.wait_for(lambda: archived(backups, last), f"segment {last} to be archived after the gap")
    finally:
        assert running.stop() == 0
    [timeline] = list_wal(env)
    assert timeline["gaps"], timeline  # shown, not hidden
    assert wal_cluster.psql("SELECT wal_status <> 'lost' FROM pg_replication_slots") == "t"
    # the base backup after the gap restores everything written after it
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
        assert first not in result.stdout
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t") == "0,1,2,3,4,5,100"
    finally:
        restored.destroy()
