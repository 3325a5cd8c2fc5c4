"""A point-in-time restore from the bucket alone (the volume lost) to a restore point or a transaction, just before
it, on a timeline: the target is looked for in the WAL on the remote first (its LSN chooses the base backup), a target
that is not there is refused before anything is written, and without pg_waldump PostgreSQL's own refusal to promote
past a target it did not reach becomes the one-line error."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from sidecar.config import load_config
from sidecar.physical.offsite import copy_wal, wal_object
from sidecar.postgres import find_tool
from tests.conftest import cli
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for
from tests.storage.seaweed import SeaweedServer

ROWS = "SELECT count(*) || ' ' || string_agg(DISTINCT note, ',' ORDER BY note) FROM t"


def test_the_bucket_alone_restores_to_a_restore_point_or_a_transaction_and_refuses_one_that_is_not_there(
        wal_cluster: WalCluster, pitr_env: dict[str, str], tmp_path: Path, seaweed: SeaweedServer) -> None:
    prefix = "t-" + uuid.uuid4().hex[:12]
    store = seaweed.store(prefix)
    env = {**pitr_env, **seaweed.environment(prefix)}
    backups = Path(env["BACKUP_DIR"])
    system = wal_cluster.psql("SELECT system_identifier FROM pg_control_system()")
    wal_cluster.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")
    receiver = Receiver(env, tmp_path / "receiver.log")
    try:
        wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start")
        older = cli(env, "base-backup").stdout.strip()  # copied off-site as it is taken
        wal_cluster.psql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
        wal_cluster.psql("SELECT pg_create_restore_point('before b')")
        xid = wal_cluster.psql("WITH b AS (INSERT INTO t SELECT g, 'b' FROM generate_series(11, 20) g RETURNING 1) "
                               "SELECT txid_current() % 4294967296 FROM (SELECT count(*) FROM b) n")  # one transaction
        wal_cluster.psql("INSERT INTO t SELECT g, 'c' FROM generate_series(21, 30) g")
        switch(wal_cluster)
        newer = cli(env, "base-backup").stdout.strip()  # after both targets: a restore to them needs the older one
        wal_cluster.psql("INSERT INTO t SELECT g, 'd' FROM generate_series(31, 40) g")
        last = switch(wal_cluster)
        wait_for(lambda: archived(backups, last), f"segment {last} to be archived")
    finally:
        assert receiver.stop() == 0
    report = copy_wal(load_config(environ=env), store)
    assert report.ok and store.stat(wal_object(system, last + ".json")), report
    shutil.rmtree(backups)  # the volume is lost

    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:
        result = cli(env, "restore", "--to-restore-point", "before b", "--from-remote", "--into-data-dir", str(restored.data))
        assert f"from base backup {older} " in result.stdout and "restore point 'before b'" in result.stdout, result.stdout
        staged = sorted(p.name for p in (restored.data / "pg_wal").iterdir() if p.is_file())
        assert last not in staged, staged  # the WAL staged ends just after the target
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql(ROWS) == "10 a"
    finally:
        restored.destroy()
    restored = WalCluster(port=54332, bin_dir=wal_cluster.bin_dir)
    try:  # just before the transaction, on timeline 1 named
        cli(env, "restore", "--to-xid", xid, "--exclusive", "--timeline", "1", "--from-remote", "--into-data-dir", str(restored.data))
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql(ROWS) == "10 a"
    finally:
        restored.destroy()
    scratch = Path(tempfile.mkdtemp(prefix="pgsc-remote-targets-"))  # TMPDIR of its own, reachable by the scratch server's user
    bin_dir = Path(tempfile.mkdtemp(prefix="pgsc-bin-"))  # the server's programs without pg_waldump, reachable by that user too
    for path in (scratch, bin_dir):
        path.chmod(0o755)
    env = {**env, "TMPDIR": str(scratch)}
    try:  # after the transaction, into a database of the live server through a scratch server
        into_db = cli(env, "restore", "--to-xid", xid, "--from-remote", "--target-db", "at_xid")
        assert "into at_xid" in into_db.stdout, into_db.stdout
        assert wal_cluster.psql(ROWS, "at_xid") == "20 a,b"

        into = tmp_path / "never"
        missing = cli(env, "restore", "--to-restore-point", "never made", "--from-remote", "--into-data-dir", str(into), check=False)
        assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
        assert "restore point 'never made' is not in the WAL on the remote" in missing.stderr and not into.exists(), missing.stderr
        wrong = cli(env, "restore", "--to-latest", "--timeline", "7", "--from-remote", "--into-data-dir", str(into), check=False)
        assert wrong.returncode == 2 and "timeline 7 is not in the WAL on the remote" in wrong.stderr and not into.exists(), wrong.stderr

        # without a pg_waldump here the target cannot be looked for: the oldest base backup, and PostgreSQL says it was not reached
        for tool in Path(find_tool("postgres")).parent.iterdir():
            if tool.name != "pg_waldump":
                os.symlink(tool, bin_dir / tool.name)
        unseen = cli({**env, "PG_BIN_DIR": str(bin_dir)}, "restore", "--to-restore-point", "never made", "--from-remote", "--target-db", "never",
                     check=False)
        assert unseen.returncode == 2 and "Traceback" not in unseen.stderr, unseen.stderr
        line = unseen.stderr.strip().splitlines()[-1]
        assert "restore point 'never made' is not in the archived WAL: recovery ended before reaching it" in line, unseen.stderr
        assert f"restoring from the oldest base backup there ({older})" in unseen.stderr, unseen.stderr
        assert wal_cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'never'") == "0"
        assert not list(scratch.iterdir())  # the scratch servers' directories and pg_waldump's scratch files are gone
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(bin_dir, ignore_errors=True)
    assert newer != older
