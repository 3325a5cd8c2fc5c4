"""Table-level recovery (issue 16): `pitr find` over the archived WAL, and `restore --table` of one dropped table from a
database with other data, against a whole-database point-in-time restore (`restore --to-xid --target-db`).

    python bench/bench_tables.py --rows 2000000 --other-mb 300      (about 5 minutes on a 2-core machine)

A PostgreSQL 15 server (bench_pitr.BenchCluster: 16 MiB segments, fsync on) with `wal-receive` running; a table `big`
of --rows rows (~130 bytes each); a base backup; then `tests/data/realistic.sql` at --other-mb (writes since the base
backup: the WAL `pitr find` and the restore read); `DROP TABLE big` in one transaction, a segment switch. Timed: `pitr find --dropped-table public.big` (a
scratch server restored to the base backup's end for the table's OID, then every segment since read with pg_waldump),
`restore --to-xid N --exclusive --table public.big` (scratch server recovered to just before the drop, pg_dump -t into
pg_restore --single-transaction on the live server), with the sidecar process's peak RSS (bench/rss.py), and `restore
--to-xid N --exclusive --target-db whole` (the whole database through a dump). Results go by hand into bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_pitr import DATASET, ROWS_PER_MB, BenchCluster  # noqa: E402

from sidecar.postgres import find_tool  # noqa: E402


def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr[-2000:]}")
    return time.monotonic() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the table that is dropped")
    parser.add_argument("--other-mb", type=int, default=300, help="the rest of the database (realistic.sql), MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tables-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(work, entry.pw_uid, entry.pw_gid)
    print("# uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "WAL_", "VALIDATION_"))}
    try:
        with BenchCluster(base=work, port=54480) as cluster:
            cluster.psql("CREATE DATABASE app")
            env = {**clean, "PYTHONPATH": str(ROOT), "DATABASE_URL": cluster.url("app"), "BACKUP_DIR": str(work / "backups"),
                   "BACKUP_RETENTION_DAYS": "0"}
            receiver = subprocess.Popen([sys.executable, "-m", "sidecar", "wal-receive"], env=env, cwd=work, stdout=subprocess.DEVNULL,
                                        stderr=open(work / "receiver.log", "ab"))  # noqa: SIM115
            try:
                time.sleep(2)
                cluster.psql("CREATE TABLE big (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), note text);"
                             f"INSERT INTO big (id, note) SELECT g, md5(g::text) || md5((g * 7)::text) FROM generate_series(1, {args.rows}) g;"
                             "CREATE INDEX big_at ON big (at)", "app")
                run([sys.executable, "-m", "sidecar", "base-backup"], env, work)  # the table is older than the newest base backup
                subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={args.other_mb * ROWS_PER_MB}", "-f", str(DATASET), "-d",
                                cluster.url("app")], check=True, capture_output=True)  # writes since: the WAL that find reads
                size = cluster.psql("SELECT pg_size_pretty(pg_total_relation_size('big')) || ' of ' || pg_size_pretty(pg_database_size('app'))", "app")
                xid = cluster.psql("BEGIN; DROP TABLE big; SELECT txid_current() % 4294967296; COMMIT", "app")
                last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())")
                deadline = time.monotonic() + 300
                while not list((work / "backups" / "wal").glob(f"*/*/{last}.json")):
                    if time.monotonic() > deadline:
                        raise SystemExit("the last segment was not archived in 300 s")
                    time.sleep(0.5)
            finally:
                receiver.terminate()
                receiver.wait(timeout=60)
            print(f"## table big: {args.rows} rows, {size}; dropped by transaction {xid}", flush=True)
            took, found = run([sys.executable, "-m", "sidecar", "pitr", "find", "--dropped-table", "public.big", "--json"], env, work)
            moment = json.loads(found.stdout)
            assert str(moment["xid"]) == xid, moment
            print(f"pitr find --dropped-table: {took:.1f} s, {moment['segments_searched']} "
                  "segments of 16 MiB read", flush=True)
            took, restored = run([sys.executable, str(ROOT / "bench" / "rss.py"), "restore", "--to-xid", xid, "--exclusive", "--table", "public.big"],
                                 env, work)
            rss = restored.stderr.strip().splitlines()[-1].split()[-1]
            rows = cluster.psql("SELECT count(*) FROM big_pitr", "app")
            print(f"restore --to-xid --exclusive --table public.big: {took:.1f} s, {rows} rows back, sidecar peak RSS {int(rss) / 1024:.1f} MB",
                  flush=True)
            took, _ = run([sys.executable, "-m", "sidecar", "restore", "--to-xid", xid, "--exclusive", "--target-db", "whole"], env, work)
            print(f"restore --to-xid --exclusive --target-db whole (the whole database): {took:.1f} s", flush=True)
    finally:
        print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
