"""The archive's lifecycle: retention of base backups and of the WAL they need (pure rules, then a real prune), base
backups on a schedule and after a gap (the real daemon)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecar.physical.wal import parse_lsn
from sidecar.retention import BaseFacts, classify_base, wal_cutoffs, wal_to_delete
from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, list_wal, switch, wait_for

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def base(day: int, status: str = "ok", start: int = 0, system: str = "7", keep: bool = False) -> BaseFacts:
    """A base backup finished `day` days before NOW (ids sort by time, like the real ones)."""
    at = NOW - timedelta(days=day)
    return BaseFacts(f"backup_{at:%Y-%m-%dT%H-%M-%S}-000Z", status, at, system, start, keep)


def actions(backups: list[BaseFacts], days: int) -> dict[str, str]:
    return {d.id: d.action for d in classify_base(backups, days, NOW)}


# --- the rules (pure) -------------------------------------------------------------------------------------------------

def test_base_backups_older_than_the_retention_go_but_never_the_newest_good_one_nor_a_pinned_one() -> None:
    old, pinned, recent = base(40, start=10), base(30, start=20, keep=True), base(2, start=30)
    assert actions([old, pinned, recent], 7) == {old.id: "delete", pinned.id: "keep", recent.id: "keep"}
    only_old = base(100, start=5)
    assert actions([only_old], 7) == {only_old.id: "keep"}  # the newest good one, however old
    assert actions([old, recent], 0) == {old.id: "keep", recent.id: "keep"}  # 0: retention off


def test_the_newest_good_base_backup_from_before_the_window_stays_so_every_moment_of_the_window_is_recoverable() -> None:
    older, reaching, inside = base(30, start=10), base(9, start=20), base(3, start=30)
    decisions = classify_base([older, reaching, inside], 7, NOW)
    assert {d.id: d.action for d in decisions} == {older.id: "delete", reaching.id: "keep", inside.id: "keep"}
    assert "from before the 7-day window" in next(d.reason for d in decisions if d.id == reaching.id)
    assert wal_cutoffs([older, reaching, inside], decisions) == {"7": 20}  # its WAL stays: 9 days back, not only 3
    other_system = base(9, start=20, system="9")  # another server's: not what this server's window needs
    assert actions([other_system, inside], 7)[other_system.id] == "delete"


def test_a_base_backup_waiting_for_wal_is_not_the_newest_good_one() -> None:
    good, waiting = base(20, start=10), base(10, status="waiting-for-wal", start=20)
    decided = actions([good, waiting], 7)
    assert decided == {good.id: "keep", waiting.id: "keep"}  # the waiting one may still become good; the older good one stays
    older_waiting, newer_good = base(30, status="waiting-for-wal", start=5), base(20, start=10)
    assert actions([older_waiting, newer_good], 7) == {older_waiting.id: "delete", newer_good.id: "keep"}
    unreadable = BaseFacts("backup_2026-01-01T00-00-00-000Z", "unreadable-metadata")
    assert actions([unreadable, newer_good], 7)[unreadable.id] == "report"


def test_wal_below_the_oldest_kept_base_backup_goes_per_system_on_every_timeline_and_the_newest_chain_stays() -> None:
    old, pinned, kept = base(40, start=10), base(35, start=20, keep=True), base(2, start=30)
    decisions = classify_base([old, pinned, kept], 7, NOW)
    cutoffs = wal_cutoffs([old, pinned, kept], decisions)
    assert cutoffs == {"7": 20}  # the pinned one's chain stays too
    segments = {("7", 1): list(range(5, 40)), ("7", 2): [18, 19, 20, 21], ("8", 1): [1, 2]}
    doomed = wal_to_delete(segments, cutoffs)
    assert doomed == {("7", 1): list(range(5, 20)), ("7", 2): [18, 19]}
    assert ("8", 1) not in doomed  # WAL streamed before any base backup of its system: kept


def test_a_system_whose_base_backups_all_go_loses_its_wal_too() -> None:
    gone, newest = base(60, start=3, system="9"), base(1, start=30)  # a server replaced by one with a new system identifier
    decisions = classify_base([gone, newest], 7, NOW)
    assert {d.id: d.action for d in decisions} == {gone.id: "delete", newest.id: "keep"}
    assert wal_to_delete({("9", 1): [1, 2, 3, 4], ("7", 1): [29, 30]}, wal_cutoffs([gone, newest], decisions)) == {("9", 1): [1, 2, 3, 4],
                                                                                                                 ("7", 1): [29]}


def test_with_a_remote_nothing_leaves_the_volume_before_it_is_off_site() -> None:
    from sidecar.retention import copied_only

    old, reaching, recent = base(40, start=10), base(10, start=20), base(2, start=30)
    held = classify_base([old, reaching, recent], 7, NOW, hold={old.id: "not off-site yet"})
    assert {d.id: (d.action, d.reason) for d in held}[old.id] == ("keep", "not off-site yet")
    doomed = {("7", 1): [10, 11, 12, 13], ("7", 2): [12]}
    assert copied_only(doomed, {("7", 1): 11}) == {("7", 1): [10, 11]}  # timeline 2 not copied at all: nothing of it goes


# --- a real prune -----------------------------------------------------------------------------------------------------

@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` read-only for everyone, root too (a read-only bind mount: unlink gets EROFS from the kernel)."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _age(backups: Path, base_id: str, days: int) -> None:
    """What a base backup taken `days` days ago looks like: its finishedAt moved back."""
    path = backups / "base" / f"{base_id}.metadata.json"
    meta = json.loads(path.read_text())
    meta["finishedAt"] = (datetime.now(UTC) - timedelta(days=days)).isoformat().replace("+00:00", "Z")
    path.write_text(json.dumps(meta))


def test_prune_deletes_old_base_backups_and_the_wal_only_they_needed_and_the_newest_still_restores(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    env = {**pitr_env, "BASE_BACKUP_RETENTION_DAYS": "7"}
    backups = Path(env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")
    receiver = Receiver(env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        old_id = cli(env, "base-backup").stdout.strip()
        for i in range(3):
            wal_cluster.psql(f"INSERT INTO t VALUES ({i})")
            switch(wal_cluster)
        new_id = cli(env, "base-backup").stdout.strip()
        wal_cluster.psql("INSERT INTO t SELECT g FROM generate_series(10, 99) g")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
        wait_for(lambda: all(b["status"] == "ok" for b in json.loads(cli(env, "list", "--base", "--json").stdout)), "both base backups good")
    finally:
        assert receiver.stop() == 0
    _age(backups, old_id, 30)
    _age(backups, new_id, 8)  # both before the 7-day window: the newer one reaches every moment of it, the older one goes
    bases = {b["id"]: b for b in json.loads(cli(env, "list", "--base", "--json").stdout)}
    [before] = list_wal(env)

    dry = cli(env, "prune", "--dry-run")
    assert f"would delete: base {old_id}: older than 7 days" in dry.stdout and f"keep: base {new_id}: newest good base backup" in dry.stdout, dry.stdout
    assert list_wal(env) == [before] and len(json.loads(cli(env, "list", "--base", "--json").stdout)) == 2
    # a pinned base backup stays (and the WAL from its start), whatever its age, until it is unpinned
    assert cli(env, "pin", old_id).stdout.strip() == f"base backup {old_id} pinned"
    assert f"{old_id}" in cli(env, "list", "--base").stdout and "ok (pinned)" in cli(env, "list", "--base").stdout
    dry = cli(env, "prune", "--dry-run")
    assert f"keep: base {old_id}: pinned (unpin to release)" in dry.stdout and "would delete: base" not in dry.stdout, dry.stdout
    assert cli(env, "unpin", "--base", old_id).stdout.strip() == f"base backup {old_id} unpinned"
    assert "would delete: base " + old_id in cli(env, "prune", "--dry-run").stdout

    # a point-in-time restore reading the archive (another process: the lock is the volume's) keeps prune's hands off it
    reader = subprocess.Popen([sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom sidecar.physical.hold import reading\n"
                               f"with reading(Path({str(backups)!r})):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "held"
        busy = cli(env, "prune")
        assert "base backups and WAL: not pruned this time (a point-in-time restore is reading the archive)" in busy.stdout, busy.stdout
        assert len(json.loads(cli(env, "list", "--base", "--json").stdout)) == 2 and list_wal(env) == [before]
    finally:
        reader.communicate("")

    timeline_dir = next((backups / "wal").glob(f"*/{last[:8]}"))
    with read_only(timeline_dir):  # files that cannot be removed are reported, not fatal
        locked = cli(env, "prune")
    assert "not removed:" in locked.stderr and "Read-only file system" in locked.stderr and "Traceback" not in locked.stderr, locked.stderr
    assert [b["id"] for b in json.loads(cli(env, "list", "--base", "--json").stdout)] == [new_id]
    assert list_wal(env)[0]["first"] == before["first"]

    pruned = cli(env, "prune")
    assert "WAL: deleted" in pruned.stdout and "not removed" not in pruned.stderr, (pruned.stdout, pruned.stderr)
    [after] = list_wal(env)
    assert after["first"] == bases[new_id]["startWal"] and after["last"] == before["last"] and after["gaps"] == []
    assert before["first"] < bases[new_id]["startWal"]
    assert not list((backups / "base").glob(old_id + "*"))

    restored = WalCluster(port=54332)
    try:
        cli(env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql("SELECT count(*) FROM t") == "93"
    finally:
        restored.destroy()


# --- base backups on a schedule and after a gap -------------------------------------------------------------------------

def test_a_gap_is_answered_by_a_base_backup_unless_one_started_after_it_and_at_most_one_per_hour() -> None:
    from sidecar.daemon.scheduler import base_backup_for_gap

    gap = NOW - timedelta(minutes=5)
    assert base_backup_for_gap(None, None, None, NOW) == (False, "no gap")
    assert base_backup_for_gap(gap, NOW - timedelta(days=3), None, NOW)[0] is True
    assert base_backup_for_gap(gap, None, None, NOW)[0] is True  # no base backup at all
    assert base_backup_for_gap(gap, NOW - timedelta(minutes=1), None, NOW)[0] is False  # one started after the gap covers it
    deferred = base_backup_for_gap(gap, NOW - timedelta(minutes=20), NOW - timedelta(minutes=20), NOW)
    assert deferred[0] is False and "at most one per 1 h" in deferred[1]  # the gap persists: no loop
    assert base_backup_for_gap(gap, NOW - timedelta(minutes=61), NOW - timedelta(minutes=61), NOW)[0] is True


def _lose_the_slot_and_the_spool(cluster: WalCluster, backups: Path) -> None:
    """What a slot dropped by someone (and a spool lost with the pod) does: the next receiver starts where the server
    is now, and the WAL written meanwhile is a gap."""
    wait_for(lambda: cluster.psql("SELECT count(*) FROM pg_replication_slots WHERE active") == "0", "the slot to be released")
    cluster.psql("SELECT pg_drop_replication_slot('pg_backup_sidecar')")
    for partial in (backups / "wal" / "spool").glob("*.partial"):
        partial.unlink()
    for _ in range(3):
        switch(cluster)
    cluster.psql("CHECKPOINT")  # a new slot reserves WAL from the last checkpoint's redo: after the segments written meanwhile


def test_the_daemon_takes_a_base_backup_at_start_and_after_a_gap_but_not_again_for_the_next_gap_within_the_hour(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_daemon import Running

    env = {**pitr_env, "WAL_ARCHIVING": "true", "DRILL_AFTER_BACKUP": "false", "VALIDATION_ENABLED": "false", "BACKUP_SCHEDULE": "0 2 1 1 *",
           "BASE_BACKUP_SCHEDULE": "0 3 1 1 *"}
    backups = Path(env["BACKUP_DIR"])

    def bases() -> list[dict[str, object]]:
        return json.loads(cli(env, "list", "--base", "--json").stdout)  # type: ignore[no-any-return]

    running = Running(env, tmp_path / "daemon1.log")
    try:  # no base backup yet: one at once (the catch-up), good once its WAL is archived
        running.wait_for(lambda: len(bases()) == 1 and bases()[0]["status"] == "ok" or (switch(wal_cluster) and False), "the first base backup")
    finally:
        assert running.stop() == 0
    assert "base backup started (catch-up" in running.log.read_text()

    _lose_the_slot_and_the_spool(wal_cluster, backups)
    running = Running(env, tmp_path / "daemon2.log")
    try:
        running.wait_for(lambda: switch(wal_cluster) and len(bases()) == 2, "a base backup for the gap", timeout=90)
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    assert "gap in the WAL archive" in log and "base backup started (gap: segments" in log, log[-3000:]
    [timeline] = list_wal(env)
    assert timeline["gaps"], timeline  # the gap stays visible; the new base backup starts after it

    _lose_the_slot_and_the_spool(wal_cluster, backups)  # the slot is lost again within the hour
    running = Running(env, tmp_path / "daemon3.log")
    try:
        running.wait_for(lambda: switch(wal_cluster) and "not answered with a base backup now" in running.log.read_text(), "the deferral", timeout=90)
    finally:
        assert running.stop() == 0
    assert len(bases()) == 2 and "at most one per 1 h" in running.log.read_text()


# --- faults: a full volume while streaming, the sidecar killed with SIGKILL ---------------------------------------------

def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; the filler file."""
    import errno

    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 4096):  # then the last small blocks
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_a_full_volume_while_streaming_fails_visibly_damages_nothing_and_the_daemon_recovers_when_space_is_back(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import tmpfs
    from tests.test_daemon import Running

    with tmpfs(tmp_path / "volume", "size=48m") as volume:
        env = {**pitr_env, "BACKUP_DIR": str(volume / "backups"), "WAL_ARCHIVING": "true", "DRILL_AFTER_BACKUP": "false",
               "VALIDATION_ENABLED": "false", "BACKUP_SCHEDULE": "0 2 1 1 *", "BASE_BACKUP_SCHEDULE": "0 3 1 1 *"}
        backups = Path(env["BACKUP_DIR"])
        wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, pad text)")
        running = Running(env, tmp_path / "daemon.log")
        try:
            running.wait_for(lambda: json.loads(cli(env, "list", "--base", "--json").stdout)[:1] and
                             json.loads(cli(env, "list", "--base", "--json").stdout)[0]["status"] == "ok" or (switch(wal_cluster) and False),
                             "the first base backup")
            filler = _fill(volume)
            wal_cluster.psql("INSERT INTO t SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 3000) g")
            for _ in range(3):
                switch(wal_cluster)
            running.wait_for(lambda: "No space left on device" in running.log.read_text(), "the receiver to fail on the full volume")
            time.sleep(2)  # it keeps failing (and retrying) while the volume is full
            filler.unlink()
            wal_cluster.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(3001, 3010) g")
            last = switch(wal_cluster)
            running.wait_for(lambda: archived(backups, last), f"segment {last} archived once space is back", timeout=120)
        finally:
            assert running.stop() == 0
        log = running.log.read_text()
        full = [line for line in log.splitlines() if "No space left on device" in line]
        assert full and "Traceback" not in log, log[-3000:]
        print(f"{len(full)} log lines about the full volume, e.g. {full[0][:300]}")
        [timeline] = list_wal(env)
        assert timeline["gaps"] == [], timeline
        assert not list(backups.glob("wal/*/*/.*.tmp"))  # no half-written file left in the archive
        restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
        try:  # every archived segment reads back and replays
            cli(env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
            restored.start_existing()
            restored.wait_promoted()
            assert restored.psql("SELECT count(*) FROM t") == "3010"
        finally:
            restored.destroy()


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_restore_to_latest_after_the_sidecar_is_killed_mid_write_has_every_row_committed_a_second_before(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    import os
    import signal

    import psycopg

    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    committed: dict[int, float] = {}
    after_commit: dict[int, int] = {}
    flushed = 0
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(pitr_env, "base-backup")
        wait_for(lambda: json.loads(cli(pitr_env, "list", "--base", "--json").stdout)[0]["status"] == "ok" or (switch(wal_cluster) and False),
                 "the base backup's WAL")
        [streamer] = subprocess.run(["pgrep", "-P", str(receiver.proc.pid)], capture_output=True, text=True).stdout.split()
        with psycopg.connect(wal_cluster.url("postgres"), autocommit=True) as conn:
            started = time.monotonic()
            i = 0
            killed = None
            while time.monotonic() - started < 2.5:  # segments switch now and then: the kill may come mid-archive too
                i += 1
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
                committed[i] = time.monotonic()
                if killed is None:  # the WAL position after the commit, to compare with what the receiver had flushed
                    after_commit[i] = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))  # type: ignore[index]
                if i % 150 == 0:
                    conn.execute("SELECT pg_switch_wal()")
                if killed is None and time.monotonic() - started > 2:
                    flushed = parse_lsn(str(conn.execute("SELECT flush_lsn FROM pg_stat_replication WHERE application_name = %s",
                                                         ("pg_backup_sidecar",)).fetchone()[0]))  # type: ignore[index]
                    os.kill(int(streamer), signal.SIGKILL)  # the whole sidecar at once, as the kernel's OOM killer or a node loss would
                    os.kill(receiver.proc.pid, signal.SIGKILL)
                    killed = time.monotonic()
                time.sleep(0.002)
        receiver.proc.wait()
    finally:
        if receiver.proc.poll() is None:
            receiver.kill()
    assert killed is not None
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        cli(pitr_env, "restore", "--to-latest", "--into-data-dir", str(restored.data))  # every archived segment's sha256 checked first
        restored.start_existing()
        restored.wait_promoted()
        present = {int(x) for x in restored.psql("SELECT id FROM t").split()}
    finally:
        restored.destroy()
    before_kill = {k for k, at in committed.items() if at <= killed}
    missing = sorted(before_kill - present)
    oldest_missing_age = killed - committed[missing[0]] if missing else 0.0
    was_flushed = {k for k, lsn in after_commit.items() if lsn <= flushed}  # on the receiver's disk (spool) when it died
    print(f"sidecar SIGKILL: rows committed before the kill {len(before_kill)}, missing after restore --to-latest {len(missing)}, "
          f"oldest missing committed {oldest_missing_age:.3f}s before the kill; flushed by the receiver {len(was_flushed)}, of them missing "
          f"{len(was_flushed - present)}")
    assert not was_flushed - present, sorted(was_flushed - present)[:10]  # every row the receiver had flushed is restored
    assert oldest_missing_age < 1.0, (len(missing), oldest_missing_age)
