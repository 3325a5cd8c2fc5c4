"""Incremental base backups (PostgreSQL 17+, pg_basebackup --incremental, pg_combinebackup at restore) on the
PostgreSQL 18 test server: a chain restores to the same rows as the server has, a broken chain is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for

CHECKSUM = "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM t"


@pytest.mark.parametrize("wal_cluster", ["18"], indirect=True)
def test_an_incremental_chain_restores_the_same_rows_and_a_broken_chain_is_refused(wal_cluster: WalCluster, pitr_env: dict[str, str],
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

    name = listed[first]["files"]["base"]["name"]
    (backups / "base" / name).rename(tmp_path / name)  # a link of the chain goes missing
    into = tmp_path / "refused"
    broken = cli(env, "restore", "--to-latest", "--into-data-dir", str(into), check=False)
    assert broken.returncode == 2 and first in broken.stderr and len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    assert not into.exists() or not any(into.iterdir())


def test_an_incremental_base_backup_on_postgresql_15_says_it_needs_17(wal_cluster: WalCluster, pitr_env: dict[str, str]) -> None:
    result = cli(pitr_env, "base-backup", "--incremental", check=False)
    assert result.returncode == 2 and "needs PostgreSQL 17+" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(Path(pitr_env["BACKUP_DIR"], "base").glob("backup_*"))
