"""Restore speed side by side with the stock tools, in one run (issue 15).

    python bench/bench_restore.py --rows 4000000 --rounds 3        (about 1 GB of tests/data/realistic.sql)

Cases, interleaved once per round, each into a database of its own that is dropped afterwards:
`pg_restore` (serial) and `pg_restore -j 2` of an uncompressed custom dump (`pg_dump -Fc -Z0` to a file) of the
same data; our whole `restore latest --target-db` (sha256 pass, zstd decode, schema, data, indexes and constraints,
row counts, validation) with RESTORE_JOBS=2 (the default) and 1; ours with the load's session settings off
(synchronous_commit and the timeouts: the server's defaults); and, with --before REV, our restore as it was
at that commit, run from a `git archive` of it. --extra adds two secondary indexes and a second table with a foreign
key, so there is more than one index to build. Prints each of our runs' steps (from its log), medians, the best run,
ratios to `pg_restore -j 2`, CPU seconds (the client processes', the server's) and our peak RSS; results are recorded
by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.embedded import Cluster  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402

DATASET = ROOT / "tests" / "data" / "realistic.sql"
EXTRA = """
CREATE INDEX ON bench_events (user_id);
CREATE INDEX ON bench_events (created_at);
CREATE TABLE bench_users (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO bench_users SELECT g, 'user ' || g FROM generate_series(0, 1000000) g;
ALTER TABLE bench_events ADD FOREIGN KEY (user_id) REFERENCES bench_users;
"""
# our CLI in this process, its peak RSS (KiB) on the last stderr line; PATCH may change the load's settings first
RUN = """import resource, sys
import sidecar.logical.load as load
{patch}
from sidecar.cli import main
code = main(sys.argv[1:])
print(f"peak_rss_kib {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}", file=sys.stderr)
sys.exit(code)
"""
NO_SETTINGS = "load.LOAD_SETTINGS = {}"


def server_cpu(data: Path) -> float:
    """CPU seconds of the server so far: the postmaster, its live children, and the children it reaped (ended backends)."""
    tick = os.sysconf("SC_CLK_TCK")
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == postmaster:
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="", help="git revision of our code to compare with (run from a git archive of it)")
    parser.add_argument("--extra", action="store_true", help="two more indexes and a second table with a foreign key")
    parser.add_argument("--only", default="", help="comma list of case numbers to run (1-based), for a quick look")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    print("# uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with Cluster(base=work, port=54420) as cluster:
        db = "source"
        cluster.psql(f"CREATE DATABASE {db}")
        subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={args.rows}", "-f", str(DATASET), "-d", cluster.url(db)], check=True)
        if args.extra:
            cluster.psql(EXTRA, db)
        size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('{db}'))")
        print(f"# database {db}: {args.rows} rows{' + extra indexes and a foreign key' if args.extra else ''}, {size}", flush=True)
        url = cluster.url(db)
        raw = work / "raw.dump"
        subprocess.run([find_tool("pg_dump"), "-Fc", "-Z0", "-f", str(raw), "-d", url], check=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "VALIDATION_", "RESTORE_", "PG"))},
               "DATABASE_URL": url, "BACKUP_RETENTION_DAYS": "0", "BACKUP_DIR": str(work / "backups"), "BACKUP_COMPRESSION": "zstd",
               "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "sidecar", "backup"], env=env, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pg_restore = find_tool("pg_restore")
        ours = [sys.executable, "-c", RUN.format(patch=""), "restore", "latest", "--target-db"]
        cases: dict[str, tuple[list[str], dict[str, str] | None]] = {
            "pg_restore (serial) of the uncompressed custom dump": ([pg_restore, "-d", "{db}", str(raw)], None),
            "pg_restore -j 2 of the uncompressed custom dump": ([pg_restore, "-j", "2", "-d", "{db}", str(raw)], None),
            "ours, RESTORE_JOBS=2 (default)": ([*ours, "{name}"], env),
            "ours, RESTORE_JOBS=1": ([*ours, "{name}"], {**env, "RESTORE_JOBS": "1"}),
            "ours, RESTORE_JOBS=2, load settings off": ([sys.executable, "-c", RUN.format(patch=NO_SETTINGS), "restore", "latest", "--target-db",
                                                         "{name}"], env),
        }
        if args.before:
            before = work / "before"
            before.mkdir()
            subprocess.run(f"git -C {ROOT} archive {args.before} sidecar | tar -x -C {before}", shell=True, check=True)
            cases[f"ours at {args.before}"] = (
                [sys.executable, "-c", RUN.format(patch="").replace("import sidecar.logical.load as load\n", ""), "restore", "latest",
                 "--target-db", "{name}"], {**env, "PYTHONPATH": str(before)})
        if args.only:
            keep = {int(n) - 1 for n in args.only.split(",")}
            cases = {name: case for i, (name, case) in enumerate(cases.items()) if i in keep}
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}  # CPU seconds (client processes, server)
        rss: dict[str, int] = {}
        for round_ in range(args.rounds):
            for i, (name, (argv, case_env)) in enumerate(cases.items()):
                target = f"r{round_}_{i}"
                if case_env is None:
                    cluster.psql(f"CREATE DATABASE {target}")
                argv = [a.replace("{db}", cluster.url(target)).replace("{name}", target) for a in argv]
                start, server_before, client_before = time.monotonic(), server_cpu(cluster.data), resource.getrusage(resource.RUSAGE_CHILDREN)
                result = subprocess.run(argv, env=case_env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                seconds = time.monotonic() - start
                client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                client = client_after.ru_utime + client_after.ru_stime - client_before.ru_utime - client_before.ru_stime
                cpu[name].append((client, server_cpu(cluster.data) - server_before))
                if result.returncode != 0:
                    raise SystemExit(f"{name} failed: {result.stderr[-2000:]}")
                if case_env is not None:
                    rss[name] = max(rss.get(name, 0), int(result.stderr.strip().splitlines()[-1].split()[-1]))
                    for line in result.stderr.splitlines():  # where the time went: the load's steps, then the restore's
                        if "loaded the schema in" in line or ": checksums, roles and a new database" in line:
                            print(f"#   {line.split(': ', 1)[-1]}", flush=True)
                times[name].append(seconds)
                print(f"# round {round_ + 1}: {name}: {seconds:.1f} s (CPU: client {client:.1f} s, server {cpu[name][-1][1]:.1f} s)", flush=True)
                cluster.psql(f"DROP DATABASE {target}")
        base_name = "pg_restore -j 2 of the uncompressed custom dump"
        base = statistics.median(times[base_name]) if base_name in times else 0.0
        print(f"\n| restore of {args.rows} rows ({size}) | median of {args.rounds} (s) | best (s) | median vs pg_restore -j 2 "
              "| CPU s, client + server (median) | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|")
        for name, values in times.items():
            med = statistics.median(values)
            ratio = f"{med / base:.2f}x" if base else "-"
            used = f"{statistics.median(c for c, _ in cpu[name]):.1f} + {statistics.median(s for _, s in cpu[name]):.1f}"
            print(f"| {name} | {med:.1f} | {min(values):.1f} | {ratio} | {used} | {rss[name] / 1024:.0f} |" if name in rss else
                  f"| {name} | {med:.1f} | {min(values):.1f} | {ratio} | {used} | - |", flush=True)
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{subprocess.run([find_tool('pg_restore'), '--version'], capture_output=True, text=True).stdout.strip()}")
    print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    shutil.rmtree(work, ignore_errors=True)  # the dump and the backups: gigabytes


if __name__ == "__main__":
    main()
