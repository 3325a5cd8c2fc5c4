"""WAL and base backups off-site (BACKUP_REMOTE_URL, the session's SeaweedFS), pending across a restart, a conflicting
object as an alarm, and a point-in-time restore from the bucket alone once the volume is lost."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    into_db = cli(env, "restore", "--to-time", target.isoformat(), "--from-remote", "--target-db", "as_it_was")  # one database, into the live server
    assert "into as_it_was" in into_db.stdout, into_db.stdout
    assert wal_cluster.psql("SELECT count(*), max(id) FROM t", "as_it_was") == "100|100"
    assert wal_cluster.psql("SELECT count(*) FROM t") == "150"  # the live one untouched

    store.delete(wal_object(system, after + ".json"))  # a damaged record on the remote: one line naming it, nothing written
    store.put_stream(wal_object(system, after + ".json"), [b"{damaged"])
    broken = cli(env, "restore", "--to-latest", "--from-remote", "--into-data-dir", str(tmp_path / "never"), check=False)
    assert broken.returncode == 3 and "Traceback" not in broken.stderr, broken.stderr
    assert f"WAL file {after}: its record" in broken.stderr.strip().splitlines()[-1] and not (tmp_path / "never").exists()


def test_retention_on_the_remote_deletes_old_base_backups_and_the_wal_below_the_oldest_kept_and_keeps_history(tmp_path: Path) -> None:
    from datetime import timedelta

    from sidecar.config import load_config
    from sidecar.physical.offsite import base_object, prune_remote, remote_base_backups
    from sidecar.storage.local import LocalStore

    store = LocalStore(tmp_path / "bucket")  # the same Store interface as the bucket; the rule is what is tested here
    config = load_config(environ={"DATABASE_URL": "postgresql://u@h/db", "BACKUP_DIR": str(tmp_path / "volume"), "BASE_BACKUP_RETENTION_DAYS": "7"})
    now = datetime.now(UTC)
    metas = remote_chain(store, now)
    assert [b.status for b in remote_base_backups(store)] == ["ok", "ok"]

    # pinned on the volume after its copy went off-site (`pin`): the copy there stays too
    pinned = tmp_path / "volume" / "base" / "backup_2026-10-01T00-00-00-000Z.metadata.json"
    pinned.parent.mkdir(parents=True)
    pinned.write_text(json.dumps({**metas["backup_2026-10-01T00-00-00-000Z"], "keep": True}))
    assert prune_remote(config, store, True, now).deleted == []
    pinned.unlink()
    # both before the 7-day window: the newer one reaches every moment of it (and is the newest good), the older one goes
    dry = prune_remote(config, store, True, now)
    assert dry.deleted == ["backup_2026-10-01T00-00-00-000Z"] and dry.wal_deleted == 5 and len(store.list("wal_")) == 18
    done = prune_remote(config, store, False, now)
    assert done.error is None and done.kept == ["backup_2026-11-20T00-00-00-000Z"]
    left = sorted(info.name for info in store.list(""))
    assert left == sorted([base_object("backup_2026-11-20T00-00-00-000Z.metadata.json"), base_object("backup_2026-11-20T00-00-00-000Z.tar.zst")]
                          + [wal_object("7", segment_name(1, s, 1 << 20) + ext) for s in (6, 7, 8) for ext in (".json", ".zst")]
                          + [wal_object("7", "00000002.history" + ext) for ext in (".json", ".zst")])

    # a prune or copy cut short leaves a stored file without its record: gone once a day old, never younger (a copy may
    # be writing it), and never a file whose record is there
    strays = [base_object("backup_2026-09-01T00-00-00-000Z.tar.zst"), wal_object("7", segment_name(1, 3, 1 << 20) + ".zst"),
              wal_object("7", "00000003.history.zst")]
    young = wal_object("7", segment_name(1, 9, 1 << 20) + ".zst")
    for name in strays + [young]:
        store.put_stream(name, [name.encode()])
    for name in strays:
        os.utime(tmp_path / "bucket" / name, ((now - timedelta(days=2)).timestamp(),) * 2)
    again = prune_remote(config, store, False, now)
    assert again.error is None and again.leftovers == sorted(strays) and again.deleted == []
    assert sorted(info.name for info in store.list("")) == sorted(left + [young])


def remote_chain(store: Any, now: datetime) -> dict[str, dict[str, Any]]:
    """On `store`: base backups of 40 and 8 days ago (system 7, 1 MiB segments) and WAL segments 1-8 with a history file;
    {id: metadata}."""
    from datetime import timedelta

    from sidecar.physical.offsite import base_object

    metas = {}
    for backup_id, days, segno in (("backup_2026-10-01T00-00-00-000Z", 40, 2), ("backup_2026-11-20T00-00-00-000Z", 8, 6)):
        data = f"tar of {backup_id}".encode()
        meta = {"id": backup_id, "kind": "base", "files": {"base": {"name": f"{backup_id}.tar.zst", "size": len(data), "checksum": "-"}},
                "walSegmentSize": 1 << 20, "startLsn": f"0/{segno:X}00028", "endWal": segment_name(1, segno, 1 << 20), "timeline": 1,
                "systemIdentifier": "7", "finishedAt": (now - timedelta(days=days)).isoformat()}
        store.put_stream(base_object(f"{backup_id}.tar.zst"), [data])
        store.put_stream(base_object(f"{backup_id}.metadata.json"), [json.dumps(meta).encode()])
        metas[backup_id] = meta
    for name in [segment_name(1, s, 1 << 20) for s in range(1, 9)] + ["00000002.history"]:
        store.put_stream(wal_object("7", name + ".zst"), [name.encode()])
        store.put_stream(wal_object("7", name + ".json"), [json.dumps({"name": name, "file": name + ".zst"}).encode()])
    return metas


def test_prune_fails_with_one_line_when_the_remote_wal_cannot_be_pruned(tmp_path: Path, seaweed: SeaweedServer) -> None:
    prefix = "t-" + uuid.uuid4().hex[:12]
    store = seaweed.store(prefix)
    remote_chain(store, datetime.now(UTC))
    store.delete(wal_object("7", segment_name(1, 1, 1 << 20) + ".json"))
    store.put_stream(wal_object("7", segment_name(1, 1, 1 << 20) + ".json"), [b"{damaged"])
    (tmp_path / "volume" / "wal").mkdir(parents=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "PG", "AWS_"))}, **seaweed.environment(prefix),
           "DATABASE_URL": "postgresql://u@h/db", "BACKUP_DIR": str(tmp_path / "volume"), "BASE_BACKUP_RETENTION_DAYS": "7"}
    out = cli(env, "prune", check=False)
    assert out.returncode == 3, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: base backups and WAL on the remote not pruned: the record") and segment_name(1, 1, 1 << 20) in line
