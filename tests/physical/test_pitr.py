"""Point-in-time recovery against real servers: base backup, WAL streamed by `wal-receive`, restore to a time."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, list_wal, switch, wait_for


def test_a_restore_to_a_time_has_the_rows_committed_before_it_and_not_those_after(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                  tmp_path: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        base_id = cli(pitr_env, "base-backup").stdout.strip()
        wait_for(lambda: json.loads(cli(pitr_env, "list", "--base", "--json").stdout)[0]["status"] == "ok", "the base backup's WAL to be archived")
        wal_cluster.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g")
        switch(wal_cluster)
        time.sleep(0.3)
        target = datetime.now(UTC)
        time.sleep(0.3)
        wal_cluster.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(101, 150) g")
        wal_cluster.psql("DELETE FROM t WHERE id <= 10")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    assert all(not t["gaps"] for t in list_wal(pitr_env))
    restored = WalCluster(port=54332)
    try:
        result = cli(pitr_env, "restore", "--to-time", target.isoformat().replace("+00:00", "Z"), "--into-data-dir", str(restored.data))
        assert base_id in result.stdout and "start it with" in result.stdout, result.stdout
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql("SELECT count(*), min(id), max(id), count(DISTINCT note) FROM t") == "100|1|100|1"
    finally:
        restored.destroy()
