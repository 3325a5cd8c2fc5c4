"""Recovery targets other than a time: a restore point, a transaction (inclusive or just before it), and the timeline
to recover along (two timelines after a promote; from the volume and from the bucket). Real servers; the pure parts
without I/O."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.config import load_config
from sidecar.errors import UsageError
from sidecar.physical.offsite import copy_base, copy_wal
from sidecar.physical.pitr import Target, on_path, parse_history, parse_target, parse_waldump, recovery_settings
from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for
from tests.storage.seaweed import SeaweedServer

# --- pure ------------------------------------------------------------------------------------------


def test_a_target_can_be_a_restore_point_or_a_transaction_and_exclusive_stops_just_before() -> None:
    assert parse_target(None, None, False, "before_migration") == Target("name", name="before_migration")
    assert parse_target(None, None, False, None, "1234", exclusive=True) == Target("xid", xid=1234, inclusive=False)
    assert recovery_settings(parse_target(None, None, False, None, "1234", exclusive=True)) == [
        "recovery_target_xid = '1234'", "recovery_target_inclusive = off"]
    assert recovery_settings(parse_target(None, None, False, "it's")) == ["recovery_target_name = 'it''s'"]
    assert parse_target(None, None, True, timeline="current").timeline == "current"
    assert parse_target(None, None, True, timeline="2").describe() == "the latest archived WAL on timeline 2"
    for args, words in [((None, None, False, "x" * 64), "at most 63 bytes"), ((None, None, False, None, "abc"), "not a transaction id"),
                        ((None, None, True, None, None, True), "no 'before'"), ((None, None, False, "a", "5"), "exactly one")]:
        with pytest.raises(UsageError, match=words):
            parse_target(*args)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="give latest, current or a number"):
        parse_target(None, None, True, timeline="newest")


def test_a_timeline_history_gives_the_path_and_which_base_backups_lie_on_it() -> None:
    path = parse_history("1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n", 3)
    assert path == [(1, 0x3000060), (2, 0x5000000), (3, None)]
    assert on_path({"timeline": 1, "endLsn": "0/2000100"}, path)
    assert not on_path({"timeline": 1, "endLsn": "0/4000000"}, path)  # taken on the old primary after the fork
    assert on_path({"timeline": 3, "endLsn": "0/9000000"}, path) and not on_path({"timeline": 4, "endLsn": "0/1"}, path)


def test_pg_waldump_lines_give_restore_points_ended_transactions_and_the_last_commit_time() -> None:
    lines = ["rmgr: Transaction len (rec/tot):     34/    34, tx:        725, lsn: 0/006167C0, prev 0/00616780, desc: COMMIT "
             "2026-11-26 18:35:21.913676 UTC",
             "rmgr: XLOG        len (rec/tot):     98/    98, tx:          0, lsn: 0/006167E8, prev 0/006167C0, desc: RESTORE_POINT rp 1",
             "rmgr: Transaction len (rec/tot):     34/    34, tx:        726, lsn: 0/00616900, prev 0/006167E8, desc: ABORT "
             "2026-11-26 18:35:22.5 UTC",
             "rmgr: Transaction len (rec/tot):     34/    34, tx:          0, lsn: 0/00616A00, prev 0/00616900, desc: COMMIT_PREPARED 727: "
             "2026-11-26 18:35:23 UTC; inval msgs: catcache 21",
             "rmgr: XLOG        len (rec/tot):     24/    24, tx:          0, lsn: 0/00616850, prev 0/006167E8, desc: SWITCH "]
    scan = parse_waldump(lines)
    assert scan.restore_points == {"rp 1": 0x6167E8}
    assert scan.xids == {725: 0x6167C0, 726: 0x616900, 727: 0x616A00}
    assert scan.last_commit == datetime(2026, 11, 26, 18, 35, 23, tzinfo=UTC)


# --- real servers ----------------------------------------------------------------------------------


def _start_restored(port: int, bin_dir: Path | None, env: dict[str, str], *args: str) -> WalCluster:
    restored = WalCluster(port=port, bin_dir=bin_dir)
    try:
        cli(env, "restore", *args, "--into-data-dir", str(restored.data))
        restored.start_existing()
        restored.wait_promoted()
    except BaseException:
        restored.destroy()
        raise
    return restored


def _rows(cluster: WalCluster, env: dict[str, str], *args: str) -> str:
    restored = _start_restored(54333, cluster.bin_dir, env, *args)
    try:
        return restored.psql("SELECT count(*) || ' ' || string_agg(DISTINCT note, ',' ORDER BY note) FROM t")
    finally:
        restored.destroy()


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)  # pg_waldump's output, the scratch server of 18
def test_a_restore_to_a_restore_point_or_a_transaction_stops_there_and_an_unknown_one_is_named(wal_cluster: WalCluster,
                                                                                                 pitr_env: dict[str, str], tmp_path: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(pitr_env, "base-backup")
        wal_cluster.psql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
        wal_cluster.psql("SELECT pg_create_restore_point('before b')")
        xid = wal_cluster.psql("WITH b AS (INSERT INTO t SELECT g, 'b' FROM generate_series(11, 20) g RETURNING 1) "
                               "SELECT txid_current() % 4294967296 FROM (SELECT count(*) FROM b) n")  # one transaction
        wal_cluster.psql("INSERT INTO t SELECT g, 'c' FROM generate_series(21, 30) g")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    scratch = Path(tempfile.mkdtemp(prefix="pgsc-targets-"))  # TMPDIR of its own: other workers' tests use /tmp at the same time
    scratch.chmod(0o755)  # the scratch server's user (postgres) must reach its directory
    env = {**pitr_env, "TMPDIR": str(scratch)}
    try:
        assert _rows(wal_cluster, env, "--to-restore-point", "before b") == "10 a"
        assert _rows(wal_cluster, env, "--to-xid", xid) == "20 a,b"
        assert _rows(wal_cluster, env, "--to-xid", xid, "--exclusive") == "10 a"
        into = tmp_path / "nowhere"
        missing = cli(env, "restore", "--to-restore-point", "never made", "--into-data-dir", str(into), check=False)
        assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
        assert "restore point 'never made' is not in the archived WAL" in missing.stderr and not into.exists(), missing.stderr
        unknown = cli(env, "restore", "--to-xid", str(int(xid) + 1000), "--target-db", "never", check=False)
        assert unknown.returncode == 2 and f"transaction {int(xid) + 1000} is not in the archived WAL" in unknown.stderr, unknown.stderr
        assert wal_cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'never'") == "0"
        # into a database of the live server, through the scratch server
        result = cli(env, "restore", "--to-restore-point", "before b", "--target-db", "at_before_b")
        assert "as of restore point before b into at_before_b" in result.stdout, result.stdout
        assert wal_cluster.psql("SELECT count(*) || ' ' || string_agg(DISTINCT note, ',') FROM t", "at_before_b") == "10 a"
        assert not list(scratch.iterdir())  # the scratch servers' directories and pg_waldump's scratch files are gone
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_after_a_promote_a_restore_follows_the_new_timeline_or_the_old_one_when_asked(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                      tmp_path: Path, seaweed: SeaweedServer) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(pitr_env, "base-backup")
        wal_cluster.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 10) g")
        switch(wal_cluster)
        time.sleep(0.3)
        fork = datetime.now(UTC)
        time.sleep(0.3)
        wal_cluster.psql("INSERT INTO t SELECT g, 'old' FROM generate_series(11, 20) g")  # the old primary goes on after the fork
        time.sleep(0.3)
        on_old = datetime.now(UTC)
        time.sleep(0.3)
        wal_cluster.psql("INSERT INTO t SELECT g, 'old-late' FROM generate_series(21, 30) g")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    # the fork: a server restored to `fork` promotes to timeline 2 (same system), and its WAL is streamed into the same archive
    new = _start_restored(54334, wal_cluster.bin_dir, pitr_env, "--to-time", fork.isoformat())
    try:
        assert new.psql("SELECT timeline_id FROM pg_control_checkpoint()") in ("1", "2")
        new.psql("CHECKPOINT")
        new.psql("INSERT INTO t SELECT g, 'new' FROM generate_series(11, 20) g")
        new_env = {**pitr_env, "DATABASE_URL": new.url("postgres"), "WAL_SPOOL_DIR": str(tmp_path / "spool2")}
        receiver = Receiver(new_env, tmp_path / "receiver2.log")
        try:
            wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver on the new primary to start")
            time.sleep(0.3)
            on_new = datetime.now(UTC)
            time.sleep(0.3)
            new.psql("INSERT INTO t SELECT g, 'new-late' FROM generate_series(21, 30) g")
            last = switch(new)
            assert last.startswith("00000002"), last
            wait_for(lambda: archived(backups, last), f"segment {last} of timeline 2 to be archived")
        finally:
            assert receiver.stop() == 0
    finally:
        new.destroy()
    shown = {t["timeline"] for t in json.loads(cli(pitr_env, "list", "--wal", "--json").stdout)}
    assert shown == {1, 2}, shown
    assert _rows(wal_cluster, pitr_env, "--to-time", on_new.isoformat()) == "20 before,new"  # latest: the new timeline
    assert _rows(wal_cluster, pitr_env, "--to-time", on_old.isoformat(), "--timeline", "1") == "20 before,old"
    assert _rows(wal_cluster, pitr_env, "--to-time", fork.isoformat(), "--timeline", "current") == "10 before"
    wrong = cli(pitr_env, "restore", "--to-latest", "--timeline", "7", "--into-data-dir", str(tmp_path / "x"), check=False)
    assert wrong.returncode == 2 and "timeline 7 is not in the WAL archive" in wrong.stderr and not (tmp_path / "x").exists(), wrong.stderr

    # from the bucket alone the same: its history file there gives the path
    prefix = "t-" + uuid.uuid4().hex[:12]
    remote = {**pitr_env, **seaweed.environment(prefix)}
    config, store = load_config(environ=remote), seaweed.store(prefix)
    assert copy_base(config, store).ok and copy_wal(config, store).ok
    assert _rows(wal_cluster, remote, "--from-remote", "--to-time", on_new.isoformat()) == "20 before,new"  # not the old timeline's
