"""One pass over the data (issue 15): what the server reads during a backup, side by side in one run.

    python bench/bench_onepass.py --rows 1000000 --rounds 3        (about 280 MB of tests/data/realistic.sql)

Cases, interleaved once per round: raw `pg_dump -Fc -Z0 > /dev/null`; our backup before this change (the
code at --before, run from a `git archive` of it: row counts by a count(*) scan of every table beside
pg_dump); our backup now (row counts read from pg_dump's stream); both with validation off, so the
comparison is the dump and its counts; then our backup now with validation on, whose extra reads are
validation's own. For each: pg_stat_database's blocks (blks_read + blks_hit) and tuples returned during
the backup, and wall time; medians of the rounds. Then the parser alone, in this process, on the raw dump
(MB/s). Results are recorded by hand in bench/RESULTS.md with `uptime` before and after."""

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
from sidecar.logical.dumpcounts import count_dump  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402

DATASET = ROOT / "tests" / "data" / "realistic.sql"
STATS = "SELECT blks_read + blks_hit, tup_returned, blks_read FROM pg_stat_database WHERE datname = current_database()"


def stats(cluster: Cluster, db: str) -> tuple[int, int, int]:
    """Blocks (read + hit), tuples returned, blocks read from outside shared buffers."""
    time.sleep(1.2)  # backends report their counters when they end or go idle (at most once a second)
    blocks, returned, read = cluster.psql(STATS, db, "-A", "-t", "-F", " ").split()
    return int(blocks), int(returned), int(read)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="5597bfd", help="git revision of the code that counted rows with count(*)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-onepass-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    before = work / "before"
    before.mkdir()
    subprocess.run(f"git -C {ROOT} archive {args.before} sidecar | tar -x -C {before}", shell=True, check=True)
    print("# uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with Cluster(base=work, port=54410) as cluster:
        db = "onepass"
        cluster.psql(f"CREATE DATABASE {db}")
        subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={args.rows}", "-f", str(DATASET), "-d", cluster.url(db)], check=True)
        size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('{db}'))")
        print(f"# database {db}: {args.rows} rows, {size}", flush=True)
        url = cluster.url(db)
        pg_dump = find_tool("pg_dump")
        base = {**{k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "VALIDATION_", "PG"))},
                "DATABASE_URL": url, "BACKUP_RETENTION_DAYS": "0", "BACKUP_DIR": str(work / "backups"), "BACKUP_COMPRESSION": "zstd"}
        cases: dict[str, tuple[list[str] | str, dict[str, str]]] = {
            "raw pg_dump -Fc -Z0 > /dev/null": (f"{pg_dump} -Fc -Z0 -d '{url}' > /dev/null", {}),
            "ours before (count(*) scan), validation off": ([sys.executable, "-m", "sidecar", "backup"],
                                                            {**base, "PYTHONPATH": str(before), "VALIDATION_ENABLED": "false"}),
            "ours now (counts from the stream), validation off": ([sys.executable, "-m", "sidecar", "backup"],
                                                                  {**base, "PYTHONPATH": str(ROOT), "VALIDATION_ENABLED": "false"}),
            "ours now, validation on (default)": ([sys.executable, "-m", "sidecar", "backup"], {**base, "PYTHONPATH": str(ROOT)}),
        }
        results: dict[str, list[tuple[float, int, int, int]]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (argv, env) in cases.items():
                start_stats = stats(cluster, db)
                start = time.monotonic()
                subprocess.run(argv, shell=isinstance(argv, str), env=env or None, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=work,  # not this checkout: `python -m` would import the sidecar beside it
                               executable="/bin/bash" if isinstance(argv, str) else None)
                seconds = time.monotonic() - start
                end_stats = stats(cluster, db)
                results[name].append((seconds, *(b - a for a, b in zip(start_stats, end_stats, strict=True))))  # type: ignore[arg-type]
                for path in (work / "backups").glob("backup_*"):
                    path.unlink()
                print(f"# {name}: {results[name][-1]}", flush=True)
        raw = [statistics.median(r[i] for r in results["raw pg_dump -Fc -Z0 > /dev/null"]) for i in range(4)]
        print(f"\n| case ({args.rows} rows, {size}), median of {args.rounds} | blocks (read+hit) | vs raw | tuples returned | vs raw "
              "| of which read (blks_read) | wall (s) | vs raw |")
        print("|---|---|---|---|---|---|---|---|")
        for name, rows in results.items():
            med = [statistics.median(r[i] for r in rows) for i in range(4)]
            print(f"| {name} | {med[1]:,.0f} | {med[1] / raw[1]:.2f}x | {med[2]:,.0f} | {med[2] / raw[2]:.2f}x | {med[3]:,.0f} | {med[0]:.1f} | {med[0] / raw[0]:.2f}x |")
        now = [statistics.median(r[i] for r in results["ours now (counts from the stream), validation off"]) for i in range(4)]
        valid = [statistics.median(r[i] for r in results["ours now, validation on (default)"]) for i in range(4)]
        print(f"\nvalidation's own cost (median, on minus off): {valid[1] - now[1]:,.0f} blocks, {valid[2] - now[2]:,.0f} tuples returned, "
              f"{valid[0] - now[0]:.1f} s")

        # the parser alone, on the very bytes pg_dump writes, fed in the 1 MiB reads the backup uses
        for fmt, flags in (("custom", ["-Fc", "-Z0"]), ("plain", ["-Fp"])):
            dump = work / f"raw.{fmt}"
            start = time.monotonic()
            subprocess.run([pg_dump, *flags, "-f", str(dump), "-d", url], check=True)
            dump_seconds = time.monotonic() - start
            data = dump.read_bytes()
            chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
            best = min(_timed_parse(chunks, fmt) for _ in range(3))
            print(f"parser alone, {fmt}: {len(data) / 1e6:.0f} MB in {best:.2f} s = {len(data) / best / 1e6:.0f} MB/s on one core; "
                  f"pg_dump wrote it at {len(data) / dump_seconds / 1e6:.0f} MB/s: the parser costs {best / dump_seconds:.0%} of pg_dump's time")
            dump.unlink()
    print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


def _timed_parse(chunks: list[bytes], fmt: str) -> float:
    start = time.perf_counter()
    count_dump(chunks, fmt)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
