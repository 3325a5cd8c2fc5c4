"""Incremental base backups (PostgreSQL 17+, pg_basebackup --incremental, pg_combinebackup at restore) on the
PostgreSQL 18 test server: a chain restores to the same rows as the server has; a broken chain gives way to the newest
older one that is whole and whose WAL reaches as far, and is refused (one line) when there is none."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from sidecar.physical.base import BaseBackup
from sidecar.physical.offsite import base_object, remote_base_backups, wal_object
from sidecar.physical.wal import segment_name
from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for
from tests.storage.seaweed import SeaweedServer

CHECKSUM = "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM t"


@pytest.mark.parametrize("wal_cluster", ["18"], indirect=True)
def test_an_incremental_chain_restores_the_same_rows_and_a_damaged_link_gives_way_to_an_older_whole_chain(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                    tmp_path: Path) -> None:
    env = pitr_env
    backups = Path(env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")
    receiver = Receiver(env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        full = cli(env, "base-backup").stdout.strip()
        off = cli(env, "base-backup", "--incremental", check=False)
        assert off.returncode != 0 and "summarize_wal is off" in off.stderr and len(off.stderr.strip().splitlines()) == 1, off.stderr
        wal_cluster.psql("ALTER SYSTEM SET summarize_wal = on")
        wal_cluster.psql("SELECT pg_reload_conf()")
        full = cli(env, "base-backup").stdout.strip()  # the summaries cover WAL from here on
        wal_cluster.psql("INSERT INTO t SELECT g, 'one' FROM generate_series(1, 20000) g")
        first = cli(env, "base-backup", "--incremental").stdout.strip()
        wal_cluster.psql("UPDATE t SET note = 'two' WHERE id % 7 = 0; DELETE FROM t WHERE id > 19000")
        second = cli({**env, "BASE_BACKUP_FULL_EVERY": "3"}, "base-backup").stdout.strip()  # a chain of 2 < 3: incremental
        wal_cluster.psql("INSERT INTO t SELECT g, 'three' FROM generate_series(30001, 30100) g")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    listed = {b["id"]: b for b in json.loads(cli(env, "list", "--base", "--json").stdout)}
    assert listed[second]["parent"] == first and listed[second]["chain"] == [full, first, second]
    assert listed[second]["size"] < listed[full]["size"] / 2, "an incremental holds only the changed blocks"
    for backup_id in (full, first, second):  # verify checks each backup of the chain
        assert cli(env, "verify", "--base", backup_id).returncode == 0
    expected = wal_cluster.psql(CHECKSUM)

    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
        assert second in result.stdout, result.stdout
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql(CHECKSUM) == expected
    finally:
        restored.destroy()

    # a link's file damaged on the volume (same size: its sha256 tells): the newest older chain that is whole, with more WAL
    name = listed[first]["files"]["base"]["name"]
    flip_file(backups / "base" / name)
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
        assert f"from base backup {full} " in result.stdout, result.stdout
        assert f"base backup {first} (of the chain of {second}) is damaged" in result.stderr, result.stderr
        assert f"base backup {second} is skipped, trying an older one" in result.stderr, result.stderr
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql(CHECKSUM) == expected
    finally:
        restored.destroy()

    # and the WAL just after the full one's end is lost: no older chain reaches the end; refused, one line, nothing left written
    gap = segment_name(1, int(listed[full]["endWal"][16:], 16) + 1, 1 << 20)
    assert gap < listed[first]["startWal"], (gap, listed[first])
    for path in backups.glob(f"wal/*/00000001/{gap}.*"):
        path.unlink()
    into = tmp_path / "refused"
    into.mkdir()
    damaged = cli(env, "restore", "--to-latest", "--into-data-dir", str(into), check=False)
    assert damaged.returncode == 3 and "Traceback" not in damaged.stderr, damaged.stderr
    line = damaged.stderr.strip().splitlines()[-1]
    assert f"base backup {first} (of the chain of {second}) is damaged" in line and "no older base backup whose chain is whole" in line \
        and f"({full}: WAL only up to {segment_name(1, int(gap[16:], 16) - 1, 1 << 20)})" in line and "--from-remote" in line, line
    assert into.is_dir() and not any(into.iterdir())
    (backups / "base" / name).rename(tmp_path / name)  # the link missing instead: refused before anything is read
    into.rmdir()
    missing = cli(env, "restore", "--to-latest", "--into-data-dir", str(into), check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert f"base backup {second} cannot be restored: base backup {first}, which incremental {second} builds on, is missing-file" \
        in missing.stderr and f"no older base backup whose chain is whole and whose WAL reaches the latest archived WAL ({full}: " \
        in missing.stderr, missing.stderr
    assert not into.exists()


def flip_file(path: Path) -> None:
    """Damage a stored file in place, its size unchanged (only its sha256 tells)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_an_incremental_base_backup_on_postgresql_15_says_it_needs_17(wal_cluster: WalCluster, pitr_env: dict[str, str]) -> None:
    result = cli(pitr_env, "base-backup", "--incremental", check=False)
    assert result.returncode == 2 and "needs PostgreSQL 17+" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(Path(pitr_env["BACKUP_DIR"], "base").glob("backup_*"))


@pytest.mark.parametrize("wal_cluster", ["18"], indirect=True)
def test_the_daemon_takes_full_incremental_incremental_full_and_the_bucket_alone_restores_an_incremental_chain(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path, seaweed: SeaweedServer) -> None:
    from tests.test_daemon import Running

    prefix = "t-" + uuid.uuid4().hex[:12]
    store = seaweed.store(prefix)
    env = {**pitr_env, **seaweed.environment(prefix), "WAL_ARCHIVING": "true", "DRILL_AFTER_BACKUP": "false", "VALIDATION_ENABLED": "false",
           "BACKUP_SCHEDULE": "0 2 1 1 *", "BASE_BACKUP_SCHEDULE": "*/2 * * * * *", "BASE_BACKUP_FULL_EVERY": "3"}
    backups = Path(env["BACKUP_DIR"])
    system = wal_cluster.psql("SELECT system_identifier FROM pg_control_system()")
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")
    off = cli(env, "check")  # what check says of BASE_BACKUP_FULL_EVERY before and after summarize_wal is turned on
    assert "note: BASE_BACKUP_FULL_EVERY=3 asks for incremental base backups, but summarize_wal is off, so every base backup is taken full; " \
           "turn it on: ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf()" in off.stdout.splitlines(), off.stdout
    wal_cluster.psql("ALTER SYSTEM SET summarize_wal = on")
    wal_cluster.psql("SELECT pg_reload_conf()")
    on = cli(env, "check")
    assert "ok: summarize_wal is on: base backups are incremental, a full one every 3 (BASE_BACKUP_FULL_EVERY)" in on.stdout.splitlines(), on.stdout

    def listed() -> list[dict[str, Any]]:
        return list(reversed(json.loads(cli(env, "list", "--base", "--json").stdout)))  # oldest first

    rows = iter(range(1, 1000))

    def write() -> bool:  # something changes between base backups
        wal_cluster.psql(f"INSERT INTO t SELECT g, 'n{next(rows)}' FROM generate_series(1, 500) g ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note")
        return False

    running = Running(env, tmp_path / "daemon1.log")  # a base backup every 2 s
    try:
        running.wait_for(lambda: len(listed()) >= 4 or write(), "four base backups on BASE_BACKUP_SCHEDULE", timeout=120)
    finally:
        assert running.stop() == 0
    daemons = listed()
    assert [b.get("parent") for b in daemons[:4]] == [None, daemons[0]["id"], daemons[1]["id"], None], daemons  # full, incr., incr., full
    assert all(b.get("parent") == (None if i % 3 == 0 else daemons[i - 1]["id"]) for i, b in enumerate(daemons))
    write()
    newest = cli(env, "base-backup", "--incremental").stdout.strip()  # the newest is an incremental, whatever the daemon stopped at
    wal_cluster.psql("UPDATE t SET note = 'last' WHERE id % 3 = 0")
    expected = wal_cluster.psql(CHECKSUM)

    running = Running({**env, "BASE_BACKUP_SCHEDULE": "0 3 1 1 *"}, tmp_path / "daemon2.log")  # archives and copies what is left
    try:
        last = switch(wal_cluster)
        running.wait_for(lambda: store.stat(wal_object(system, last + ".json")), f"{last} off-site")
        running.wait_for(lambda: [b.status for b in remote_base_backups(store)] == ["ok"] * (len(daemons) + 1), "every base backup off-site")
    finally:
        assert running.stop() == 0
    chain = json.loads(cli(env, "list", "--base", "--json").stdout)[0]["chain"]
    assert chain[-1] == newest and len(chain) >= 2

    # a database as it was, from the volume's newest base backup: an incremental
    into_db = cli(env, "restore", "--to-latest", "--target-db", "from_chain")
    assert "into from_chain" in into_db.stdout, into_db.stdout
    assert wal_cluster.psql(CHECKSUM, "from_chain") == expected

    shutil.rmtree(backups)  # the volume is lost: the chain comes from the bucket alone
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(env, "restore", "--to-latest", "--from-remote", "--into-data-dir", str(restored.data))
        assert f"from base backup {newest} " in result.stdout, result.stdout
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql(CHECKSUM) == expected
    finally:
        restored.destroy()

    # the full of the newest chain damaged on the bucket (same size): the newest older chain that is whole, with more WAL
    full = remote_base_backups(store)[len(chain) - 1]
    assert full.id == chain[0] and not full.metadata.get("parent")
    name = base_object(full.metadata["files"]["base"]["name"])
    flip(store, name)
    older = daemons[daemons.index(next(b for b in daemons if b["id"] == chain[0])) - 1]["id"]
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(env, "restore", "--to-latest", "--from-remote", "--into-data-dir", str(restored.data))
        assert f"from base backup {older} " in result.stdout, result.stdout
        assert f"base backup {chain[0]} (of the chain of {newest}) is damaged" in result.stderr, result.stderr
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql(CHECKSUM) == expected
    finally:
        restored.destroy()

    # every older chain broken too (their full ones are gone): refused, one line naming the damaged one, nothing written
    for other in daemons:
        if not other.get("parent") and other["id"] != chain[0]:
            store.delete(base_object(other["files"]["base"]["name"]))
    into = tmp_path / "refused"
    damaged = cli(env, "restore", "--to-latest", "--from-remote", "--into-data-dir", str(into), check=False)
    assert damaged.returncode == 3 and "Traceback" not in damaged.stderr, damaged.stderr
    line = damaged.stderr.strip().splitlines()[-1]
    assert f"base backup {chain[0]} (of the chain of {newest}) is damaged" in line and "no older base backup there" in line, line
    assert not into.exists()
    store.delete(name)  # and the full of the newest chain missing: refused before anything is read, naming it
    missing = cli(env, "restore", "--to-latest", "--from-remote", "--into-data-dir", str(into), check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert f"base backup {chain[0]}, which incremental {chain[1]} builds on, is missing-file" in missing.stderr, missing.stderr
    assert not into.exists()


def flip(store: Any, name: str) -> None:
    """Replace an object on the store with as many bytes of something else (a damaged copy: its size still matches)."""
    data = bytearray(b"".join(store.open_read(name)))
    data[len(data) // 2] ^= 0xFF
    store.delete(name)
    store.put_stream(name, [bytes(data)])


def test_check_says_incremental_base_backups_need_postgresql_17_and_are_taken_full(env: dict[str, str]) -> None:
    result = cli({**env, "BASE_BACKUP_FULL_EVERY": "3"}, "check")
    assert "note: BASE_BACKUP_FULL_EVERY=3: incremental base backups need PostgreSQL 17+ (this is 15), so every base backup is taken full; " \
           "set BASE_BACKUP_FULL_EVERY=1 to say so" in result.stdout.splitlines(), result.stdout
    assert "summarize_wal" not in cli(env, "check").stdout  # not asked for: not mentioned


SYSTEM, MIB = "7", 1 << 20


def base(backup_id: str, segno: int, parent: str = "", status: str = "ok") -> BaseBackup:
    """A listed base backup of system 7 (1 MiB segments) that starts and ends in segment `segno` of timeline 1."""
    meta = {"id": backup_id, "systemIdentifier": SYSTEM, "timeline": 1, "walSegmentSize": MIB, "startLsn": f"0/{segno:X}00028",
            "endLsn": f"0/{segno:X}00100", "endWal": segment_name(1, segno, MIB), "finishedAt": "2026-11-20T00:00:00Z",
            "files": {"base": {"name": f"{backup_id}.tar.zst", "size": 1, "checksum": "-"}}} | ({"parent": parent} if parent else {})
    return BaseBackup(backup_id, status, "" if status == "ok" else "base_x is missing or of another size", meta)


def test_a_restore_from_the_bucket_falls_back_from_a_broken_chain_to_the_newest_whole_one_whose_wal_reaches_as_far() -> None:
    from sidecar.errors import NotFound
    from sidecar.physical.offsite import _remote_candidates
    from sidecar.physical.pitr import Target

    f1, i1 = base("backup_2026-11-01T00-00-00-000Z", 2), base("backup_2026-11-02T00-00-00-000Z", 4, "backup_2026-11-01T00-00-00-000Z")
    f2 = base("backup_2026-11-03T00-00-00-000Z", 6, status="missing-file")
    i2 = base("backup_2026-11-04T00-00-00-000Z", 8, "backup_2026-11-03T00-00-00-000Z")
    backups = [i2, f2, i1, f1]  # newest first, as listed
    whole = {segment_name(1, s, MIB): 1 for s in range(2, 10)}
    assert [(b.id, wal[-1]) for b, wal in _remote_candidates(backups, Target("latest"), lambda _: whole)] == \
        [(i1.id, segment_name(1, 9, MIB)), (f1.id, segment_name(1, 9, MIB))]  # i2's full is missing: i1's chain, then f1
    assert [b.id for b, _ in _remote_candidates([i2, base(f2.id, 6), i1, f1], Target("latest"), lambda _: whole)][:2] == [i2.id, f2.id]

    gap = {name: 1 for name in whole if name != segment_name(1, 5, MIB)}  # the older chains' WAL stops before i2's
    with pytest.raises(NotFound) as refused:
        _remote_candidates(backups, Target("latest"), lambda _: gap)
    assert str(refused.value) == (f"base backup {i2.id} on the remote cannot be restored: base backup {f2.id}, which incremental {i2.id} builds on, "
                                  f"is missing-file: base_x is missing or of another size; no older base backup there whose chain is whole and "
                                  f"whose WAL reaches the latest archived WAL ({i1.id}: WAL only up to {segment_name(1, 4, MIB)})")


def test_retention_on_the_remote_keeps_the_full_base_backup_that_restores_when_the_newest_chain_there_is_broken(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from sidecar.config import load_config
    from sidecar.physical.offsite import prune_remote
    from sidecar.storage.local import LocalStore

    store = LocalStore(tmp_path / "bucket")
    config = load_config(environ={"DATABASE_URL": "postgresql://u@h/db", "BACKUP_DIR": str(tmp_path / "volume"), "BASE_BACKUP_RETENTION_DAYS": "7"})
    now = datetime.now(UTC)
    # a full of 40 days ago; a full of 30 days ago whose stored file never made it to the bucket; an incremental on it of 8 days ago
    for listed, days in ((base("backup_2026-10-01T00-00-00-000Z", 2), 40), (base("backup_2026-10-20T00-00-00-000Z", 4), 30),
                         (base("backup_2026-11-10T00-00-00-000Z", 6, "backup_2026-10-20T00-00-00-000Z"), 8)):
        meta = {**listed.metadata, "finishedAt": (now - timedelta(days=days)).isoformat()}
        if days != 30:
            store.put_stream(base_object(meta["files"]["base"]["name"]), [b"t"])
        store.put_stream(base_object(listed.id + ".metadata.json"), [json.dumps(meta).encode()])
    for s in range(1, 9):
        name = segment_name(1, s, MIB)
        store.put_stream(wal_object(SYSTEM, name + ".zst"), [b"w"])
        store.put_stream(wal_object(SYSTEM, name + ".json"), [json.dumps({"name": name, "file": name + ".zst"}).encode()])
    dry = prune_remote(config, store, True, now)
    assert dry.error is None and dry.deleted == [] and "backup_2026-10-01T00-00-00-000Z" in dry.kept, (dry.deleted, dry.kept)
    assert dry.wal_deleted == 1  # segment 1 only: the kept full one replays from segment 2
