"""The off-site metrics as Prometheus sees them, with a real daemon, real backup children and a real S3 server
(SeaweedFS): every upload and every failed copy counted once, whichever process did it."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.daemon.metrics import Metrics
from sidecar.repository import Repository
from sidecar.storage import offsite
from sidecar.storage.remote import RemoteConfig
from tests.conftest import Cluster, backup_id, cli
from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer
from tests.storage.test_offsite import listed, remote_env

REMOTE_METRICS = ("pg_backup_remote_last_copy_timestamp_seconds", "pg_backup_remote_pending_backups", "pg_backup_remote_age_seconds",
                  "pg_backup_remote_last_verify_timestamp_seconds", "pg_backup_remote_upload_bytes_total",
                  "pg_backup_remote_upload_seconds_total", "pg_backup_remote_errors_total")


def scrape(repo: Repository, remote: RemoteConfig) -> CollectorRegistry:
    """The daemon's registry over this volume, as a scrape reads it."""
    metrics = Metrics(repo, CollectorRegistry())
    metrics.watch_remote(remote)
    return metrics.registry


def test_a_backup_the_daemons_child_copied_off_site_is_counted_once_in_upload_bytes(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    from tests.test_daemon import Running, request, sample

    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g", db)
    env = remote_env(env, seaweed, prefix)
    running = Running({**env, "BACKUP_ON_START": "true", "BACKUP_SCHEDULE": "0 0 1 1 *"}, tmp_path / "daemon.log")
    try:
        def copied() -> str | bool:
            m = str(request(running.base, "/metrics")[1])
            return (sample(m, 'pg_backup_runs_total{result="success"}') == 1 and sample(m, "pg_backup_remote_pending_backups") == 0
                    and sample(m, 'pg_backup_in_progress{operation="backup"}') == 0 and m)
        metrics = running.wait_for(copied, "the start-up backup and its off-site copy", timeout=120)
    finally:
        assert running.stop() == 0
    objects = seaweed.store(prefix).list()
    [backup] = listed(env, "--remote")
    assert {o.name for o in objects} == {backup["id"] + ".metadata.json", *(f["name"] for f in backup["files"].values())}
    # the child uploaded it (the daemon never did): every byte in the bucket counted once, the metadata object too
    assert sample(metrics, 'pg_backup_remote_upload_bytes_total{operation="copy"}') == sum(o.size for o in objects)
    assert sample(metrics, 'pg_backup_remote_upload_seconds_total{operation="copy"}') > 0
    assert sample(metrics, 'pg_backup_remote_errors_total{operation="copy"}') == 0
    assert sample(metrics, 'pg_backup_remote_errors_total{operation="wal-copy"}') == 0  # exported before the first failure: increase() sees it
    assert 0 <= sample(metrics, "pg_backup_remote_age_seconds") < 120
    assert sample(metrics, "pg_backup_remote_last_copy_timestamp_seconds") > 0
    assert sample(metrics, "pg_backup_remote_last_verify_timestamp_seconds") == 0  # never verified
    # every off-site metric has its HELP; nothing names the bucket, the endpoint or a key; promtool accepts the exposition
    for name in REMOTE_METRICS:
        assert re.search(rf"^# HELP {name} \S", metrics, flags=re.M), name
    remote_lines = [line for line in metrics.splitlines() if line.startswith("pg_backup_remote_")]
    assert all(set(re.findall(r'(\w+)="', line)) <= {"operation"} for line in remote_lines), remote_lines
    for secret_or_place in (ACCESS_KEY, SECRET_KEY, prefix, seaweed.endpoint, "s3://"):
        assert secret_or_place not in "\n".join(remote_lines)
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is required"
    check = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_copy_that_failed_in_a_backup_outside_the_daemon_is_counted_and_its_retry_adds_each_byte_once(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    from tests.test_daemon import Running, request, sample

    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g", db)
    env = remote_env(env, seaweed, prefix)
    refused = cli({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "backup")  # as a backup child of the daemon runs it
    taken = refused.stdout.strip().splitlines()[-1]
    assert "not copied off-site" in refused.stderr
    repo = Repository(Path(env["BACKUP_DIR"]))
    remote = seaweed.remote(prefix)
    before = scrape(repo, remote)
    assert before.get_sample_value("pg_backup_remote_errors_total", {"operation": "copy"}) == 1
    assert before.get_sample_value("pg_backup_remote_pending_backups") == 1
    assert before.get_sample_value("pg_backup_remote_age_seconds") == math.inf  # local backups, none off-site
    assert before.get_sample_value("pg_backup_remote_upload_bytes_total", {"operation": "copy"}) == 0

    running = Running({**env, "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 0 1 1 *"}, tmp_path / "daemon.log")
    try:  # the daemon copies the pending backup at start-up
        metrics = running.wait_for(lambda: (m := str(request(running.base, "/metrics")[1])) and sample(m, "pg_backup_remote_pending_backups") == 0 and m,
                                   "the pending backup to be copied")
    finally:
        assert running.stop() == 0
    assert sample(metrics, 'pg_backup_remote_errors_total{operation="copy"}') == 1  # the child's failure, seen by the daemon
    objects = seaweed.store(prefix).list()
    assert sample(metrics, 'pg_backup_remote_upload_bytes_total{operation="copy"}') == sum(o.size for o in objects)
    assert cli(env, "copy", taken).stdout.strip() == f"{taken}: already complete off-site"
    again = scrape(repo, remote)  # a copy that finds everything there writes, and counts, nothing
    assert again.get_sample_value("pg_backup_remote_upload_bytes_total", {"operation": "copy"}) == sum(o.size for o in objects)
    assert again.get_sample_value("pg_backup_remote_errors_total", {"operation": "copy"}) == 1


def test_the_last_verified_remote_copy_is_read_from_the_volume_and_never_goes_back(tmp_path: Path, seaweed: SeaweedServer) -> None:
    repo = Repository(tmp_path / "backups")
    repo.ensure()
    remote, other = seaweed.remote("a"), seaweed.remote("b")
    assert scrape(repo, remote).get_sample_value("pg_backup_remote_last_verify_timestamp_seconds") == 0
    at = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    offsite.record_verified(repo, remote, "backup_2026-11-26T02-00-00-000Z", at)
    offsite.record_verified(repo, remote, "backup_2026-11-25T02-00-00-000Z", at - timedelta(days=1))  # an older verify, later
    assert scrape(repo, remote).get_sample_value("pg_backup_remote_last_verify_timestamp_seconds") == at.timestamp()
    assert scrape(repo, remote).get_sample_value("pg_backup_remote_last_copy_timestamp_seconds") == 0  # a verify is not a copy
    assert scrape(repo, other).get_sample_value("pg_backup_remote_last_verify_timestamp_seconds") == 0  # another remote: not verified


def test_a_cli_backup_copied_off_site_records_its_bytes_and_duration(cluster: Cluster, db: str, env: dict[str, str],
                                                                     seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", db)
    env = remote_env(env, seaweed, prefix)
    taken = backup_id(env)
    record = offsite.read_record(Repository(Path(env["BACKUP_DIR"])), taken)
    assert record is not None
    assert record["bytes"] == sum(o.size for o in seaweed.store(prefix).list())
    assert isinstance(record["seconds"], float) and record["seconds"] > 0
