"""The loss window (RPO): what a restore gets of the WAL the receiver had flushed but not archived (a completed segment
still in the spool, the newest `.partial`), and RPO 0 with the receiver as a synchronous standby."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

from sidecar.streams import file_sha256
from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for
from tests.physical.test_pitr import clean_env


def _start_with_a_good_base_backup(cluster: WalCluster, env: dict[str, str], log: Path) -> tuple[Receiver, int]:
    """A receiver streaming, a good base backup; the receiver and its pg_receivewal child's pid."""
    receiver = Receiver(env, log)
    wait_for(lambda: "receiving WAL" in log.read_text(), "the receiver to start")
    cli(env, "base-backup")
    wait_for(lambda: json.loads(cli(env, "list", "--base", "--json").stdout)[0]["status"] == "ok" or (switch(cluster) and False),
             "the base backup's WAL")
    [streamer] = subprocess.run(["pgrep", "-P", str(receiver.proc.pid)], capture_output=True, text=True).stdout.split()
    return receiver, int(streamer)


def _flushed(cluster: WalCluster) -> bool:
    """Whether the receiver has flushed everything the server has inserted (pg_stat_replication.flush_lsn)."""
    return cluster.psql("SELECT bool_and(flush_lsn >= pg_current_wal_insert_lsn()) FROM pg_stat_replication") == "t"


def _restored_ids(env: dict[str, str], port: int, *options: str, bin_dir: Path | None = None) -> set[int]:
    restored = WalCluster(port=port, bin_dir=bin_dir)
    try:
        cli(env, "restore", "--to-latest", *options, "--into-data-dir", str(restored.data))
        restored.start_existing()
        restored.wait_promoted()
        return {int(x) for x in restored.psql("SELECT id FROM t").split()}
    finally:
        restored.destroy()


@pytest.mark.parametrize("wal_cluster", ["15", "18"], indirect=True)
def test_a_restore_has_the_wal_the_receiver_flushed_but_never_archived_and_wal_fetch_serves_it(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    spool = backups / "wal" / "spool"
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")
    receiver, streamer = _start_with_a_good_base_backup(wal_cluster, pitr_env, tmp_path / "receiver.log")
    try:
        os.kill(receiver.proc.pid, signal.SIGSTOP)  # the sidecar stops archiving; pg_receivewal goes on writing the spool
        wal_cluster.psql("INSERT INTO t SELECT generate_series(1, 50)")
        completed = switch(wal_cluster)  # pg_receivewal completes it in the spool; nobody archives it
        wal_cluster.psql("INSERT INTO t SELECT generate_series(51, 100)")  # in the next segment's .partial only
        wait_for(lambda: _flushed(wal_cluster), "the receiver to flush every row")
        os.kill(streamer, signal.SIGKILL)  # then the whole sidecar dies, as on a node loss
        os.kill(receiver.proc.pid, signal.SIGKILL)
        receiver.proc.wait()
    finally:
        if receiver.proc.poll() is None:
            receiver.kill()
    partial = [p for p in spool.glob("*.partial")]
    assert (spool / completed).is_file() and not archived(backups, completed) and len(partial) == 1, sorted(os.listdir(spool))
    # a restore from the volume stages the completed segment and the .partial after the archived WAL
    assert _restored_ids(pitr_env, 54332, bin_dir=wal_cluster.bin_dir) == set(range(1, 101))
    # wal-fetch (restore_command) serves them too: the archive has neither
    cli(pitr_env, "wal-fetch", completed, str(tmp_path / "completed"))
    assert file_sha256(tmp_path / "completed") == file_sha256(spool / completed)
    into = tmp_path / "by-wal-fetch"
    cli(pitr_env, "restore", "--to-latest", "--no-stage-wal", "--into-data-dir", str(into))
    [line] = [x for x in (into / "postgresql.auto.conf").read_text().splitlines() if x.startswith("restore_command")]
    command = line.split("=", 1)[1].strip()[1:-1].replace("''", "'")
    name = partial[0].name.removesuffix(".partial")
    run = subprocess.run(["sh", "-c", command.replace("%f", name).replace("%p", str(tmp_path / "partial"))], env=clean_env(),
                         capture_output=True, text=True)
    assert run.returncode == 0 and "spool" in run.stderr and "no sha256" in run.stderr, run.stderr  # PostgreSQL's log says so
    assert file_sha256(tmp_path / "partial") == file_sha256(partial[0])
    # a file in the spool under another segment's name is not served: its page header gives it away
    wrong = f"{name[:16]}{int(name[16:], 16) + 1:08X}"
    (spool / f"{wrong}.partial").write_bytes(partial[0].read_bytes())
    refused = cli(pitr_env, "wal-fetch", wrong, str(tmp_path / "wrong"), check=False)
    assert refused.returncode == 1 and not (tmp_path / "wrong").exists(), refused.stderr


def test_with_the_receiver_a_synchronous_standby_every_commit_that_returned_survives_kill_9_of_postgresql_and_the_sidecar(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY)")
    receiver, streamer = _start_with_a_good_base_backup(wal_cluster, pitr_env, tmp_path / "receiver.log")
    postmaster = int((wal_cluster.data / "postmaster.pid").read_text().split()[0])
    committed: list[int] = []
    try:
        # what docs/pitr.md tells the operator: the receiver (application_name = WAL_SLOT_NAME) as the synchronous standby
        wal_cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'pg_backup_sidecar'")
        wal_cluster.psql("SELECT pg_reload_conf()")
        wait_for(lambda: wal_cluster.psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'pg_backup_sidecar'") == "sync",
                 "the receiver to be the synchronous standby", timeout=10)
        checked = cli({**pitr_env, "WAL_ARCHIVING": "true"}, "check", check=False).stdout.splitlines()
        assert "ok: RPO 0: the WAL receiver (pg_backup_sidecar) is a synchronous standby (sync): a commit returns once it has " \
               "flushed the commit's WAL" in checked, checked
        wal_cluster.psql("SET synchronous_commit = local; CREATE ROLE watcher LOGIN")  # sees walsenders but not their details
        unprivileged = cli({**pitr_env, "WAL_ARCHIVING": "true", "DATABASE_URL": wal_cluster.url("postgres", user="watcher"),
                                                  "WAL_REPLICATION_URL": wal_cluster.url("postgres")}, "check", check=False)
        assert [line for line in unprivileged.stdout.splitlines() if line.startswith("ok: synchronous_standby_names names the WAL receiver "
                                                                                      "(pg_backup_sidecar): RPO 0 while it is connected")], unprivileged.stdout

        def write() -> None:
            # synchronous_commit = on (the test clusters default to off): a commit returns once the receiver has flushed it
            with psycopg.connect(wal_cluster.url("postgres"), autocommit=True, options="-c synchronous_commit=on") as conn:
                i = 0
                while True:
                    i += 1
                    try:
                        conn.execute("INSERT INTO t VALUES (%s)", (i,))
                    except psycopg.Error:
                        return
                    committed.append(i)

        writer = threading.Thread(target=write)
        writer.start()
        wait_for(lambda: len(committed) > 200, "rows to be committed")
        for pid in (postmaster, streamer, receiver.proc.pid):  # PostgreSQL and the whole sidecar at once
            os.kill(pid, signal.SIGKILL)
        writer.join(timeout=30)
        receiver.proc.wait()
    finally:
        if receiver.proc.poll() is None:
            receiver.kill()
        (wal_cluster.data / "postmaster.pid").unlink(missing_ok=True)  # its orphaned backends exit by themselves
    assert not writer.is_alive()
    present = _restored_ids(pitr_env, 54332)
    missing = sorted(set(committed) - present)
    print(f"synchronous standby, kill -9 of PostgreSQL and the sidecar: {len(committed)} commits returned, {len(missing)} missing after "
          f"restore --to-latest, {len(present - set(committed))} more rows than commits returned")
    assert not missing, missing[:10]


def test_a_dedicated_replication_role_streams_and_takes_base_backups_and_what_it_lacks_is_named(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path) -> None:
    backups = Path(pitr_env["BACKUP_DIR"])
    wal_cluster.psql("CREATE ROLE app LOGIN; CREATE ROLE replicator LOGIN")  # app: the application's role, no REPLICATION
    env = {**pitr_env, "DATABASE_URL": wal_cluster.url("postgres", user="app"), "WAL_REPLICATION_URL": wal_cluster.url("postgres", user="replicator")}
    hba = wal_cluster.data / "pg_hba.conf"
    hba.write_text(hba.read_text().replace(wal_cluster.replication_hba, "local replication postgres trust\n"))
    wal_cluster.psql("SELECT pg_reload_conf()")
    both = cli(env, "wal-receive", check=False)  # what start-up says: every missing piece, in one line
    assert both.returncode == 3 and len(both.stderr.strip().splitlines()) == 1, both.stderr
    assert "role replicator (WAL_REPLICATION_URL) lacks REPLICATION: ALTER ROLE replicator REPLICATION" in both.stderr, both.stderr
    assert "no pg_hba.conf line allows replication connections for role replicator" in both.stderr, both.stderr
    base = cli(env, "base-backup", check=False)
    assert base.returncode == 3 and "ALTER ROLE replicator REPLICATION" in base.stderr, base.stderr
    checked = cli(env, "check", check=False)  # `check` names the same, beside its other findings
    assert checked.returncode != 0 and "problem: role replicator (WAL_REPLICATION_URL) lacks REPLICATION: ALTER ROLE replicator REPLICATION" \
        in checked.stdout.splitlines(), checked.stdout
    gone = cli({**env, "WAL_REPLICATION_URL": wal_cluster.url("postgres", user="nobody")}, "wal-receive", check=False)
    assert gone.returncode == 3 and "role nobody (WAL_REPLICATION_URL) does not exist: CREATE ROLE nobody LOGIN REPLICATION" in gone.stderr, gone.stderr
    wal_cluster.psql("ALTER ROLE replicator REPLICATION PASSWORD 'right-s3cret'")
    hba.write_text(hba.read_text() + "local replication replicator scram-sha-256\n")
    wal_cluster.psql("SELECT pg_reload_conf()")
    password = tmp_path / "replication-password"
    password.write_text("wrong\n")
    env["WAL_REPLICATION_PASSWORD_FILE"] = str(password)
    wrong = cli(env, "wal-receive", check=False)
    assert wrong.returncode == 3 and "password authentication failed for role replicator (WAL_REPLICATION_URL)" in wrong.stderr, wrong.stderr
    assert "wrong" not in wrong.stderr
    password.write_text("right-s3cret\n")
    # the application's role never gets REPLICATION: the replicator makes the slot, streams and takes the base backup
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    receiver, _streamer = _start_with_a_good_base_backup(wal_cluster, env, tmp_path / "receiver.log")
    try:
        assert wal_cluster.psql("SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_replication") == "replicator"
        assert wal_cluster.psql("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'pg_backup_sidecar'") == "physical"
        lines = cli(env, "check", check=False).stdout.splitlines()
        assert "ok: WAL streaming: replicator may open replication connections (WAL_REPLICATION_URL)" in lines, lines
        assert not [line for line in lines if "replicat" in line and line.startswith("problem:")], lines
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    printed = cli(env, "validate-config", "--print").stdout
    assert "wal.replication_url" in printed and "replicator" in printed and "right-s3cret" not in printed


def test_check_says_when_commits_wait_for_a_receiver_that_is_not_there_or_for_standbys_that_are_not_the_archive(
        wal_cluster: WalCluster, pitr_env: dict[str, str]) -> None:
    env = {**pitr_env, "WAL_ARCHIVING": "true"}

    def check_with(names: str) -> list[str]:
        wal_cluster.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        wal_cluster.psql("SELECT pg_reload_conf()")
        wait_for(lambda: wal_cluster.psql("SHOW synchronous_standby_names") == names.replace("''", "'"), "the setting to be reloaded")
        return cli(env, "check", check=False).stdout.splitlines()

    try:
        assert not [line for line in check_with("") if "synchronous_standby_names" in line]  # asynchronous: nothing to say
        other = check_with("other_standby")
        assert [line for line in other if line.startswith("note: synchronous_standby_names ('other_standby') does not name the WAL "
                                                          "receiver (pg_backup_sidecar): commits wait for those standbys")], other
        for names in ("pg_backup_sidecar", 'ANY 1 ("PG_Backup_Sidecar", other_standby)'):  # nobody connected: every commit hangs
            hung = check_with(names)
            assert [line for line in hung if line.startswith(f"problem: synchronous_standby_names ('{names}') names the WAL receiver "
                                                             "(pg_backup_sidecar), which is not connected: commits wait until it is")], hung
    finally:
        wal_cluster.psql("ALTER SYSTEM RESET synchronous_standby_names")
        wal_cluster.psql("SELECT pg_reload_conf()")
