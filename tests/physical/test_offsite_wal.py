"""WAL and base backups off-site (BACKUP_REMOTE_URL, the session's SeaweedFS), pending across a restart, a conflicting
object as an alarm, and a point-in-time restore from the bucket alone once the volume is lost."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sidecar.physical.offsite import wal_object
from sidecar.physical.wal import parse_segment, segment_name
from tests.conftest import cli
from tests.physical.conftest import WalCluster, archived, switch
from tests.storage.seaweed import SeaweedServer


def test_wal_and_base_backups_go_off_site_and_a_lost_volume_restores_to_a_time_from_the_bucket(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path, seaweed: SeaweedServer) -> None:
    from tests.test_daemon import Running

    prefix = "t-" + uuid.uuid4().hex[:12]
    store = seaweed.store(prefix)
    env = {**pitr_env, **seaweed.environment(prefix), "WAL_ARCHIVING": "true", "DRILL_AFTER_BACKUP": "false", "VALIDATION_ENABLED": "false",
           "BACKUP_SCHEDULE": "0 2 1 1 *", "BASE_BACKUP_SCHEDULE": "0 3 1 1 *", "SIDECAR_LOG_FORMAT": "json"}
    backups = Path(env["BACKUP_DIR"])
    system = wal_cluster.psql("SELECT system_identifier FROM pg_control_system()")
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")

    def bases() -> list[dict[str, object]]:
        return json.loads(cli(env, "list", "--base", "--json").stdout)  # type: ignore[no-any-return]

    # the remote refuses (wrong credentials): everything is archived on the volume and stays pending
    refused = Running({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, tmp_path / "daemon1.log")
    try:
        refused.wait_for(lambda: (len(bases()) == 1 and bases()[0]["status"] == "ok") or (switch(wal_cluster) and False), "the first base backup")
        wal_cluster.psql("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
        before = switch(wal_cluster)
        refused.wait_for(lambda: archived(backups, before), f"{before} archived")
        refused.wait_for(lambda: "off-site copy of WAL or base backups failed" in refused.log.read_text(), "the copy to fail")
    finally:
        assert refused.stop() == 0
    assert store.list("wal_") == [] and store.list("base_") == []

    running = Running(env, tmp_path / "daemon2.log")
    try:  # after the restart, what was pending is copied
        running.wait_for(lambda: store.stat(wal_object(system, before + ".json")) and store.list("base_"), "the pending copies")
        time.sleep(0.3)
        target = datetime.now(UTC)
        time.sleep(0.3)
        wal_cluster.psql("INSERT INTO t SELECT g FROM generate_series(101, 150) g")
        after = switch(wal_cluster)
        running.wait_for(lambda: store.stat(wal_object(system, after + ".json")), f"{after} off-site")
        timeline, segno = parse_segment(after, 1 << 20)
        planted = segment_name(timeline, segno + 1, 1 << 20)  # someone else's object where the next segment goes: an alarm, never overwritten
        store.put_stream(wal_object(system, planted + ".zst"), [b"another server's WAL"])
        done = switch(wal_cluster)
        assert done == planted
        running.wait_for(lambda: "already exists with different content" in running.log.read_text(), "the conflict alarm")
        last = switch(wal_cluster)
        running.wait_for(lambda: store.stat(wal_object(system, last + ".json")), "the copy to go on after the conflict")
    finally:
        assert running.stop() == 0
    assert b"".join(store.open_read(wal_object(system, planted + ".zst"))) == b"another server's WAL"
    assert store.stat(wal_object(system, planted + ".json")) is None  # no record for it: not taken for archived
    counters = json.loads((backups / ".offsite" / "counters.json").read_text())
    assert counters["errors"]["wal-copy"] >= 2 and counters["upload_bytes"]["wal-copy"] > 0, counters  # refused rounds + the conflict

    shutil.rmtree(backups)  # the volume is lost
    restored = WalCluster(port=54332)
    try:
        result = cli(env, "restore", "--to-time", target.isoformat(), "--from-remote", "--into-data-dir", str(restored.data))
        assert "staged in pg_wal" in result.stdout, result.stdout
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql("SELECT count(*), max(id) FROM t") == "100|100"
    finally:
        restored.destroy()
    assert not backups.exists() or not list(backups.glob("wal/*/0*"))  # nothing was read from (or written to) a volume
