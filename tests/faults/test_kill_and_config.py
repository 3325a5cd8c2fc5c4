"""Faults, part one: the sidecar killed at random points of a backup, and every config key given a
bad value. (The rest of the fault matrix of issue 6 is still to be built.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.config import KEYS
from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli

TRIALS = 20


def test_kill_9_of_the_sidecar_at_random_points_never_leaves_a_listed_backup_that_fails_verify(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 300000) g", db)
    directory = Path(env["BACKUP_DIR"])
    rng = random.Random(20261124)
    started = time.monotonic()
    backup_id(env)
    full = time.monotonic() - started
    outcomes = {"killed": 0, "finished": 0}
    for _ in range(TRIALS):
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full * 1.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            outcomes["killed"] += 1
        else:
            outcomes["finished"] += 1
        proc.wait()
        listed = json.loads(cli(env, "list", "--json").stdout)
        for entry in listed:
            assert entry["status"] == "ok", entry
        for entry in listed[:2]:  # the newest ones are where a kill can have left something
            assert cli(env, "verify", entry["id"], check=False).returncode == 0, entry["id"]
    assert outcomes["killed"] >= TRIALS // 2, outcomes
    backup_id(env)  # the next backup succeeds and cleans the leftovers
    assert not list(directory.glob("*.partial")) and not list(directory.glob(".*.tmp"))
    print(f"kill -9 trials: {outcomes}, full backup {full:.2f}s")


BAD_VALUES = {
    "database.url": "mysql:://nope",
    "backup.dir": "",
    "backup.retention_days": "-1",
    "backup.keep_last": "-1",
    "backup.keep_daily": "seven",
    "backup.keep_weekly": "1.5",
    "backup.keep_monthly": "-2",
    "backup.compression": "lz4",
    "backup.compression_level": "99",
    "encryption.enabled": "maybe",
    "encryption.recipients": "age1bad",
    "encryption.identity_file": "",
    "restore.keep_previous_database": "2",
    "postgres.bin_dir": "",
    "validation.enabled": "sometimes",
    "validation.block_backup_on_failure": "often",
    "validation.statement_timeout_seconds": "0",
    "validation.disabled_checks": "spelling",
    "validation.amcheck": "yes please",
    "schedule.cron": "every day",
    "schedule.timezone": "Mars/Olympus",
    "schedule.run_on_start": "soon",
    "http.listen": "port 80",
    "drill.after_backup": "7",
    "drill.cron": "61 * * * *",
    "schedule.retry_seconds": "forever",
    "database.password_file": "/nonexistent/password",
    "drill.database_url": "postgresql://u:secret@h",
    "restore.keep_previous_count": "many",
    "restore.keep_previous_days": "-3",
    "postgres.data_dir": "",
    "backup.group_readable": "for the group",
    "backup.volume": "no thanks",
    "backup.state_dir": "",
    "remote.url": "ftp://backups/db",
    "remote.endpoint": "s3.example.com",
    "remote.region": "Europe West",
    "remote.retention_days": "-1",
    "remote.sse": "rot13",
    "remote.kms_key_id": "",
    "remote.storage_class": "cold storage",
    "remote.allow_http": "sometimes",
    "remote.access_key_id_file": "/nonexistent/key",
    "remote.secret_access_key_file": "/nonexistent/secret",
    "remote.session_token_file": "/nonexistent/token",
    "drill.from_remote": "from the bucket",
    "wal.enabled": "perhaps",
    "wal.slot_name": "Bad-Slot!",
    "wal.spool_dir": "",
    "wal.replication_url": "replicator:secret@db:5432",
    "wal.replication_password_file": "/nonexistent/password",
    "backup.databases": "app,,billing",
    "backup.parallel": "0",
    "restore.jobs": "0",
    "base_backup.retention_days": "-1",
    "base_backup.schedule": "weekly-ish",
    "drill.pitr_cron": "nightly",
    "base_backup.full_every": "0",
}


def test_every_environment_key_has_a_bad_value_case() -> None:
    assert {key for key, (variable, _) in KEYS.items() if variable} == set(BAD_VALUES) - {"validation.checks"}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_bad_value_for_any_key_is_one_message_naming_it_and_exit_2(key: str, tmp_path: Path) -> None:
    variable = KEYS[key][0]
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://u@h/db", variable: BAD_VALUES[key]}
    if BAD_VALUES[key] == "":
        # an empty environment variable means "not set"; the empty value is tested through config.yaml
        config = tmp_path / "config.yaml"
        section, name = key.split(".")
        config.write_text(f"{section}:\n  {name}: ''\n")
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://u@h/db", "SIDECAR_CONFIG": str(config)}
        variable = key
    result = cli(env, "backup", check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert not (tmp_path / "backups").exists()


def test_kill_9_of_the_daemon_mid_backup_takes_its_backup_with_it_and_a_restart_is_clean(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_daemon import Running, request

    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g", db)
    directory = Path(env["BACKUP_DIR"])
    env = {**env, "BACKUP_ON_START": "true", "DRILL_AFTER_BACKUP": "false", "VALIDATION_ENABLED": "false", "BACKUP_COMPRESSION_LEVEL": "12"}
    for trial in range(3):
        running = Running(env, tmp_path / f"killed-{trial}.log")
        running.wait_for(lambda: any(p.stat().st_size > 0 for p in directory.glob("*.partial")), "the backup to be writing")
        children = subprocess.run(["pgrep", "-P", str(running.proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the backup runs as a child process"
        running.proc.kill()
        running.proc.wait()
        # the orphaned backup is told to stop (parent-death signal) and removes its partial file
        running.wait_for(lambda pids=children: not any(Path(f"/proc/{pid}").exists() for pid in pids), "the orphaned backup to exit", timeout=30)
        assert not list(directory.glob("*.partial")) and json.loads(cli(env, "list", "--json").stdout) == []
    (directory / "backup_2099-01-01T00-00-00-000Z.dump.zst.partial").write_bytes(b"what a killed container leaves")
    restarted = Running(env, tmp_path / "restarted.log")
    try:
        restarted.wait_for(lambda: 'pg_backup_runs_total{result="success"} 1.0' in request(restarted.base, "/metrics")[1], "a backup after the restart", timeout=120)
        [backup] = request(restarted.base, "/v1/backups")[1]
    finally:
        assert restarted.stop() == 0
    first = json.loads(restarted.log.read_text().splitlines()[0])  # cleaned at start-up, before anything else
    assert first["logger"] == "sidecar.daemon.run" and "removed leftovers" in first["message"] and "2099" in first["message"], first
    assert cli(env, "verify", backup["id"], check=False).returncode == 0
