"""Point-in-time recovery against real servers: base backup, WAL streamed by `wal-receive`, restore to a time."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.physical.wal import parse_lsn
from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, list_wal, switch, wait_for


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
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
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(pitr_env, "restore", "--to-time", target.isoformat().replace("+00:00", "Z"), "--into-data-dir", str(restored.data))
        assert base_id in result.stdout and "start it with" in result.stdout, result.stdout
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql("SELECT count(*), min(id), max(id), count(DISTINCT note) FROM t") == "100|1|100|1"
    finally:
        restored.destroy()


def clean_env() -> dict[str, str]:
    """What a server's restore_command would see: no BACKUP_* or PYTHONPATH of ours (the command carries what it needs)."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}


def _archive_some(wal_cluster: WalCluster, env: dict[str, str], log: Path, switches: int = 3) -> list[str]:
    """Run the receiver through a base backup and `switches` completed segments; the segments' names."""
    backups = Path(env["BACKUP_DIR"])
    receiver = Receiver(env, log)
    try:
        wait_for(lambda: "receiving WAL" in log.read_text(), "the receiver to start")
        cli(env, "base-backup")
        names = []
        for i in range(switches):
            wal_cluster.psql(f"CREATE TABLE IF NOT EXISTS t (id int); INSERT INTO t VALUES ({i})")
            names.append(switch(wal_cluster))
        wait_for(lambda: archived(backups, names[-1]), f"segment {names[-1]} to be archived")
    finally:
        assert receiver.stop() == 0
    return names


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_a_corrupted_archived_segment_stops_the_restore_with_one_line_naming_it(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                tmp_path: Path) -> None:
    names = _archive_some(wal_cluster, pitr_env, tmp_path / "receiver.log")
    victim = names[1]
    [stored] = [p for p in Path(pitr_env["BACKUP_DIR"]).glob(f"wal/*/{victim[:8]}/{victim}.*") if not p.name.endswith(".json")]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    into = tmp_path / "restored"
    result = cli(pitr_env, "restore", "--to-latest", "--into-data-dir", str(into), check=False)
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and victim in result.stderr and "damaged" in result.stderr, result.stderr
    assert not into.exists()  # nothing half-written is left to start a server on
    fetched = cli(pitr_env, "wal-fetch", victim, str(tmp_path / "seg"), check=False)
    assert fetched.returncode == 126 and victim in fetched.stderr and not (tmp_path / "seg").exists(), fetched.stderr


def test_wal_fetch_restores_an_archived_segment_exactly_and_says_not_found_with_exit_1(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    from sidecar.age import generate_identity

    secret, public = generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(secret + "\n")
    env = {**pitr_env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public}
    names = _archive_some(wal_cluster, env, tmp_path / "receiver.log", switches=1)
    [record_path] = Path(env["BACKUP_DIR"]).glob(f"wal/*/{names[0][:8]}/{names[0]}.json")
    record = json.loads(record_path.read_text())
    assert record["encrypted"] and record["file"].endswith(".zst.age") and oct(record_path.stat().st_mode)[-3:] == "600"
    no_key = cli(env, "wal-fetch", names[0], str(tmp_path / "x"), check=False)
    assert no_key.returncode == 128 and "identity" in no_key.stderr.lower(), no_key.stderr  # never taken for 'not found'
    cli({**env, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key)}, "wal-fetch", names[0], str(tmp_path / "seg"))
    from sidecar.streams import file_sha256

    assert file_sha256(tmp_path / "seg") == (record["rawSha256"], 1 << 20)
    missing = cli(env, "wal-fetch", "0000000100000000000000FF", str(tmp_path / "none"), check=False)
    assert missing.returncode == 1 and not (tmp_path / "none").exists()
    history = cli(env, "wal-fetch", "00000002.history", str(tmp_path / "none"), check=False)
    assert history.returncode == 1
    # a restore that does not stage WAL points restore_command at wal-fetch, with the system and the key
    keyed = {**env, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key)}
    into = tmp_path / "restored"
    cli(keyed, "restore", "--to-latest", "--no-stage-wal", "--into-data-dir", str(into))
    assert not list((into / "pg_wal").glob("0*"))
    [line] = [x for x in (into / "postgresql.auto.conf").read_text().splitlines() if x.startswith("restore_command")]
    command = line.split("=", 1)[1].strip()[1:-1].replace("''", "'")
    assert "wal-fetch" in command and str(key) in command and "PGPASSWORD" not in command
    run = subprocess.run(["sh", "-c", command.replace("%f", names[0]).replace("%p", str(tmp_path / "by-restore-command"))], env=clean_env())
    assert run.returncode == 0 and file_sha256(tmp_path / "by-restore-command")[0] == record["rawSha256"]
    run = subprocess.run(["sh", "-c", command.replace("%f", "0000000100000000000000FF").replace("%p", str(tmp_path / "x"))], env=clean_env())
    assert run.returncode == 1


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_wal_receive_killed_and_restarted_continues_without_a_gap(wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    log = tmp_path / "receiver.log"
    wal_cluster.psql("CREATE TABLE t (id int)")
    for trial in range(2):
        receiver = Receiver(pitr_env, log)
        wait_for(lambda r=receiver: "receiving WAL" in log.read_text() and r.proc.poll() is None, "the receiver to start")
        wal_cluster.psql(f"INSERT INTO t VALUES ({trial})")
        done = switch(wal_cluster)
        wait_for(lambda d=done: archived(backups, d), f"segment {done} to be archived")
        receiver.kill()
        # written while no receiver runs: the slot keeps it for the next one
        wal_cluster.psql(f"INSERT INTO t VALUES ({trial + 100})")
        switch(wal_cluster)
        wait_for(lambda: wal_cluster.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pg_backup_sidecar'") == "f",
                 "the orphaned pg_receivewal to exit with its parent")
        log.write_text(log.read_text().replace("receiving WAL", "(restart)"))
    receiver = Receiver(pitr_env, log)
    try:
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    [timeline] = list_wal(pitr_env)
    assert timeline["gaps"] == [] and timeline["last"] == last, timeline
    assert "gap" not in log.read_text()


def test_a_missing_segment_is_reported_as_a_gap_and_holds_back_the_base_backup(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                               tmp_path: Path) -> None:
    names = _archive_some(wal_cluster, pitr_env, tmp_path / "receiver.log", switches=3)
    [base] = json.loads(cli(pitr_env, "list", "--base", "--json").stdout)
    assert base["status"] == "ok" and base["endWal"] < names[1]

    def lose(segment: str) -> None:
        for path in Path(pitr_env["BACKUP_DIR"]).glob(f"wal/*/{segment[:8]}/{segment}.*"):
            path.unlink()

    lose(names[1])  # after the base backup's end: a restore stops before it, and says so
    shown = cli(pitr_env, "list", "--wal").stdout
    assert f"GAP: {names[1]} missing" in shown, shown
    result = cli(pitr_env, "restore", "--to-latest", "--into-data-dir", str(tmp_path / "restored"))
    assert f"segment {names[1]} is missing from the WAL archive (a gap)" in result.stderr and names[2] in result.stderr, result.stderr
    lose(base["endWal"])  # inside the base backup: it is not good any more
    [base] = json.loads(cli(pitr_env, "list", "--base", "--json").stdout)
    assert base["status"] == "waiting-for-wal" and base["endWal"] in base["problem"]
    result = cli(pitr_env, "restore", "--to-latest", "--into-data-dir", str(tmp_path / "again"), check=False)
    assert result.returncode == 2 and "no good base backup" in result.stderr and base["endWal"] in result.stderr, result.stderr


def test_wal_receive_names_the_missing_replication_right_and_pg_hba_line(wal_cluster: WalCluster, pitr_env: dict[str, str]) -> None:
    wal_cluster.psql("CREATE ROLE app LOGIN")
    app_env = {**pitr_env, "DATABASE_URL": wal_cluster.url("postgres", user="app")}
    result = cli(app_env, "wal-receive", check=False)
    assert result.returncode == 3 and result.stderr.strip() == "error: role app lacks REPLICATION: ALTER ROLE app REPLICATION", result.stderr
    base = cli(app_env, "base-backup", check=False)
    assert base.returncode == 3 and "ALTER ROLE app REPLICATION" in base.stderr
    wal_cluster.psql("ALTER ROLE app REPLICATION")
    (wal_cluster.data / "pg_hba.conf").write_text((wal_cluster.data / "pg_hba.conf").read_text().replace(wal_cluster.replication_hba, ""))
    wal_cluster.psql("SELECT pg_reload_conf()")
    result = cli(app_env, "wal-receive", check=False)
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no pg_hba.conf line allows replication connections for role app" in result.stderr, result.stderr
    assert not list(Path(pitr_env["BACKUP_DIR"]).glob("base/*.tar*"))


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_verify_checks_a_base_backup_against_its_manifest(wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    env = {**pitr_env, "BACKUP_COMPRESSION": "false"}
    wal_cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    base_id = cli(env, "base-backup").stdout.strip()
    good = cli(env, "verify", base_id)
    assert "files checked against backup_manifest" in good.stdout and "waiting for WAL" in good.stdout, good.stdout
    directory = Path(env["BACKUP_DIR"]) / "base"
    stored = directory / f"{base_id}.tar"
    data = bytearray(stored.read_bytes())
    at = data.index(b"PG_VERSION\0") + 512  # the content of the first member named PG_VERSION: a digit of its version changes
    data[at + 1] ^= 0x07
    stored.write_bytes(bytes(data))
    bad = cli(env, "verify", base_id, check=False)
    assert bad.returncode == 1 and "sha256" in bad.stdout, bad.stdout
    from sidecar.streams import file_sha256

    meta_path = directory / f"{base_id}.metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["base"]["checksum"] = file_sha256(stored)[0]  # the file and its metadata changed together: the manifest still knows
    meta_path.write_text(json.dumps(meta))
    bad = cli(env, "verify", base_id, check=False)
    assert bad.returncode == 1 and "PG_VERSION: sha256 differs from the manifest" in bad.stdout, bad.stdout


def test_the_daemon_with_wal_archiving_streams_wal_and_restarts_a_killed_receiver(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                   tmp_path: Path) -> None:
    from tests.test_daemon import Running

    backups = Path(pitr_env["BACKUP_DIR"])
    running = Running({**pitr_env, "WAL_ARCHIVING": "true"}, tmp_path / "daemon.log")
    try:
        first = switch(wal_cluster)
        running.wait_for(lambda: archived(backups, first), f"segment {first} to be archived by the daemon's receiver")
        [receiver_pid] = subprocess.run(["pgrep", "-P", str(running.proc.pid), "-f", "wal-receive"], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-9", receiver_pid], check=True)
        second = switch(wal_cluster)
        # archived (the daemon's start-up base backup may prune it right after: it is older than that base backup)
        running.wait_for(lambda: archived(backups, second) or f"archived WAL {second}" in running.log.read_text(),
                         f"segment {second} to be archived after the receiver was restarted")
    finally:
        assert running.stop() == 0
    assert "the WAL receiver exited" in running.log.read_text()
    [timeline] = list_wal(pitr_env)
    assert timeline["gaps"] == []
    assert wal_cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'") == "0"  # nothing left streaming


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_a_restore_to_a_time_into_a_database_brings_that_database_back_as_it_was(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                  tmp_path: Path, scratch_tmp: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE DATABASE app")
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)", "app")
    env = {**pitr_env, "DATABASE_URL": wal_cluster.url("app"), "TMPDIR": str(scratch_tmp)}
    receiver = Receiver(env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(env, "base-backup")
        wal_cluster.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g", "app")
        switch(wal_cluster)
        time.sleep(0.3)
        target = datetime.now(UTC)
        time.sleep(0.3)
        wal_cluster.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(101, 150) g; DELETE FROM t WHERE id <= 10", "app")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    result = cli(env, "restore", "--to-time", target.isoformat(), "--target-db", "app_as_it_was")
    assert "into app_as_it_was (new-database" in result.stdout, result.stdout
    assert wal_cluster.psql("SELECT count(*), min(id), max(id), count(DISTINCT note) FROM t", "app_as_it_was") == "100|1|100|1"
    assert wal_cluster.psql("SELECT count(*) FROM t", "app") == "140"  # the live database is untouched
    assert not list(scratch_tmp.iterdir())  # the scratch server and its directory are gone


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_restore_to_latest_after_postgresql_is_killed_has_every_row_committed_a_second_before(wal_cluster: WalCluster, pitr_env: dict[str, str],
                                                                                               tmp_path: Path) -> None:
    import psycopg

    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")
    receiver = Receiver(pitr_env, tmp_path / "receiver.log")
    committed: dict[int, float] = {}
    after_commit: dict[int, int] = {}  # the WAL position after each commit, to compare with what the receiver had flushed
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        cli(pitr_env, "base-backup")
        wait_for(lambda: json.loads(cli(pitr_env, "list", "--base", "--json").stdout)[0]["status"] == "ok", "the base backup's WAL")
        with psycopg.connect(wal_cluster.url("postgres"), autocommit=True) as conn:
            started = time.monotonic()
            i = 0
            while time.monotonic() - started < 2:  # no segment switch: the newest rows live only in the receiver's .partial
                i += 1
                conn.execute("INSERT INTO t VALUES (%s)", (i,))
                committed[i] = time.monotonic()
                after_commit[i] = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]))  # type: ignore[index]
                time.sleep(0.002)
            flushed = parse_lsn(str(conn.execute("SELECT flush_lsn FROM pg_stat_replication WHERE application_name = %s",
                                                 ("pg_backup_sidecar",)).fetchone()[0]))  # type: ignore[index]
            wal_cluster.stop("immediate")  # kill: no shutdown checkpoint, nothing more is sent
            killed = time.monotonic()
        time.sleep(1)
    finally:
        assert receiver.stop() == 0
    assert list((backups / "wal" / "spool").glob("*.partial"))
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        cli(pitr_env, "restore", "--to-latest", "--into-data-dir", str(restored.data))
        restored.start_existing()
        restored.wait_promoted()
        present = {int(x) for x in restored.psql("SELECT id FROM t").split()}
    finally:
        restored.destroy()
    missing = sorted(set(committed) - present)
    oldest_missing_age = killed - committed[missing[0]] if missing else 0.0
    was_flushed = {k for k, lsn in after_commit.items() if lsn <= flushed}
    print(f"rows committed {len(committed)}, missing after restore --to-latest {len(missing)}, oldest missing committed {oldest_missing_age:.3f}s "
          f"before the kill; flushed by the receiver {len(was_flushed)}, of them missing {len(was_flushed - present)}")
    assert not was_flushed - present, sorted(was_flushed - present)[:10]  # every row the receiver had flushed is restored
    assert oldest_missing_age < 1.0, (len(missing), oldest_missing_age)
    assert present <= set(committed)
