"""A whole server (issue 14): wall time and our peak RSS of one backup set with BACKUP_PARALLEL=1, 2, 4.

    python bench/bench_server.py --databases 4 --rows 400000 --rounds 2

A throwaway server with N databases of `rows` rows each (about 60 MB per 400 000 rows); each round backs up
the set (BACKUP_DATABASES=all, validation off, zstd 1) once per parallelism, interleaved; medians of the
rounds. Peak RSS is the sidecar process's own (bench/rss.py; pg_dump children excluded: their memory is
pg_dump's whatever we do). Results are recorded by hand in bench/RESULTS.md with `uptime` before and after."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.embedded import Cluster  # noqa: E402

TABLE = ("CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, kind text, payload text);"
         "INSERT INTO events SELECT g, now() - g * interval '1 second', 'kind ' || g % 17, md5(g::text) || md5((g * 7)::text) "
         "FROM generate_series(1, {rows}) g")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--databases", type=int, default=4)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parallel", default="1,2,4")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-server-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    print("# uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with Cluster(base=work, port=54411) as cluster:
        for i in range(args.databases):
            cluster.psql(f"CREATE DATABASE db{i}")
            cluster.psql(TABLE.format(rows=args.rows), f"db{i}")
        size = cluster.psql("SELECT pg_size_pretty(sum(pg_database_size(datname))) FROM pg_database WHERE datname LIKE 'db%'")
        print(f"# {args.databases} databases of {args.rows} rows, {size} in all", flush=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG"))}
        results: dict[int, list[tuple[float, int]]] = {}
        for _ in range(args.rounds):
            for parallel in (int(p) for p in args.parallel.split(",")):
                backups = work / f"backups-{parallel}"
                env = {**clean, "PYTHONPATH": str(ROOT), "DATABASE_URL": cluster.url("postgres"), "BACKUP_DIR": str(backups),
                       "BACKUP_DATABASES": "all", "BACKUP_PARALLEL": str(parallel), "VALIDATION_ENABLED": "false", "BACKUP_RETENTION_DAYS": "0"}
                started = time.monotonic()
                done = subprocess.run([sys.executable, str(ROOT / "bench" / "rss.py"), "backup"], env=env, capture_output=True, text=True, check=True)
                wall = time.monotonic() - started
                rss = int(done.stderr.strip().splitlines()[-1].split()[-1])
                results.setdefault(parallel, []).append((wall, rss))
                subprocess.run(["rm", "-rf", str(backups)], check=True)
        for parallel, runs in results.items():
            print(f"BACKUP_PARALLEL={parallel}: wall {statistics.median(w for w, _ in runs):.2f} s "
                  f"(runs {', '.join(f'{w:.2f}' for w, _ in runs)}), peak RSS {max(r for _, r in runs) / 1024:.1f} MiB")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
