"""Backup and restore speed and memory, side by side with plain pg_dump baselines, in one run.

    python bench/bench_backup.py --rows 4000000 --rounds 2      (about 1 GB of tests/data/realistic.sql)
    python bench/bench_backup.py --url postgresql://...  --rounds 3 --cases 'raw|ours zstd -1$' --no-restore
                                                               (a database loaded already, e.g. 5 GB: left as it is)

Every case's wall time, its CPU time (the processes it ran, and the PostgreSQL server's: every `postgres` process on the
machine, so run it on a quiet one) and ratios against raw `pg_dump -Fc -Z0` thrown away (the server's own speed) and
written to a file and fsynced (the least a backup must do).

Prints a table and ratios; results are recorded by hand in bench/RESULTS.md with the machine."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.age import generate_identity  # noqa: E402
from sidecar.embedded import Cluster  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402

DATASET = ROOT / "tests" / "data" / "realistic.sql"


CPU: dict[str, list[tuple[float, float]]] = {}  # case -> (client CPU s, server CPU s) per run, for the database at hand
POSTMASTER = 0  # the server's postmaster: its CPU and its children's are the server's


def server_cpu() -> float:
    """CPU seconds of the server: the postmaster with the children it waited for (backends gone) and those alive."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid: str) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on

    total = sum(int(x) for x in stat(str(POSTMASTER))[11:15])  # utime stime cutime cstime
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = stat(pid)
        except OSError:
            continue
        if fields[1] == str(POSTMASTER):
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _run(name: str, argv: list[str] | str, env: dict[str, str] | None = None, shell: bool = False) -> tuple[float, str]:
    before = server_cpu()
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            executable="/bin/bash" if shell else None)
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    time.sleep(0.3)  # the postmaster reaps the backend
    CPU.setdefault(name, []).append((usage.ru_utime + usage.ru_stime, server_cpu() - before))
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{name} failed ({os.waitstatus_to_exitcode(status)}): {stderr.strip()[-2000:]}")
    return seconds, stderr


def timed(argv: list[str] | str, env: dict[str, str] | None = None, shell: bool = False, name: str = "") -> float:
    return _run(name or str(argv), argv, env, shell)[0]


def ours(env: dict[str, str], *args: str, name: str = "", root: Path = ROOT) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of our own process (the code under `root`), via bench/rss.py."""
    seconds, stderr = _run(name or " ".join(args), [sys.executable, str(root / "bench" / "rss.py"), *args], {**env, "PYTHONPATH": str(root)})
    return seconds, int(stderr.strip().splitlines()[-1].split()[-1])


def main() -> None:
    global POSTMASTER
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--small-rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", default="1,3", help="zstd levels to compare")
    parser.add_argument("--cases", default="", help="regular expression: only the cases whose name matches (e.g. 'raw|ours zstd -1$')")
    parser.add_argument("--no-restore", action="store_true", help="leave out the restore comparison")
    parser.add_argument("--url", help="an existing database to back up (loaded already; neither created nor dropped)")
    parser.add_argument("--before", default="", help="git revision of our code to compare with (run from a git archive of it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    before = work / "before"
    if args.before:
        before.mkdir()
        subprocess.run(f"git -C {ROOT} archive {args.before} sidecar bench | tar -x -C {before}", shell=True, check=True)
    for tree in (ROOT, before) if args.before else (ROOT,):  # as installed (pip compiles the package): nothing compiled in a timed run
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "sidecar")], check=True)
    with contextlib.ExitStack() as stack:
        cluster = None if args.url else stack.enter_context(Cluster(base=work, port=54400))
        rss: dict[int, int] = {}
        for rows in ([args.rows] if args.url else [args.small_rows, args.rows]):
            db = f"bench_{rows}"
            if cluster is None:
                url = args.url
                db = url.split("?")[0].rsplit("/", 1)[-1]
                psql = [find_tool("psql"), "-X", "-At", "-d", url, "-c"]
                size = subprocess.run([*psql, "SELECT pg_size_pretty(pg_database_size(current_database()))"], capture_output=True, text=True, check=True).stdout.strip()
                rows = int(subprocess.run([*psql, "SELECT count(*) FROM bench_events"], capture_output=True, text=True, check=True).stdout)
                args.rows = rows
            else:
                cluster.psql(f"CREATE DATABASE {db}")
                subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={rows}", "-f", str(DATASET), "-d", cluster.url(db)], check=True)
                size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('{db}'))")
                url = cluster.url(db)
            print(f"# database {db}: {rows} rows, {size}", flush=True)
            CPU.clear()
            data = subprocess.run([find_tool("psql"), "-X", "-At", "-d", url, "-c", "SHOW data_directory"], capture_output=True, text=True, check=True).stdout.strip()
            POSTMASTER = int((Path(data) / "postmaster.pid").read_text().split()[0])
            secret, public = generate_identity()
            key = work / "key.txt"
            key.write_text(secret + "\n")
            base_env = {**os.environ, "DATABASE_URL": url, "BACKUP_RETENTION_DAYS": "0"}
            pg_dump = find_tool("pg_dump")
            cases: dict[str, object] = {
                "raw pg_dump -Fc -Z0 > /dev/null": f"{pg_dump} -Fc -Z0 -d '{url}' > /dev/null",
                "raw pg_dump -Fc -Z0 to a file, fsynced": f"{pg_dump} -Fc -Z0 -d '{url}' -f {work}/raw-file.dump && sync {work}/raw-file.dump",
                "pg_dump -Fp | gzip": f"{pg_dump} -Fp -d '{url}' | gzip > {work}/plain.sql.gz",
                "pg_dump -Fc (default compression)": f"{pg_dump} -Fc -d '{url}' > {work}/custom.dump",
            }
            for level in args.levels.split(","):
                cases[f"ours zstd -{level}"] = {"BACKUP_COMPRESSION": "zstd", "BACKUP_COMPRESSION_LEVEL": level}
            if args.before:
                cases[f"ours zstd -{args.levels.split(',')[0]} at {args.before}"] = {
                    "BACKUP_COMPRESSION": "zstd", "BACKUP_COMPRESSION_LEVEL": args.levels.split(",")[0], "root": str(before)}
            cases[f"ours zstd -{args.levels.split(',')[0]} + age"] = {
                "BACKUP_COMPRESSION": "zstd", "BACKUP_COMPRESSION_LEVEL": args.levels.split(",")[0],
                "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public}
            cases["ours gzip -1"] = {"BACKUP_COMPRESSION": "gzip", "BACKUP_COMPRESSION_LEVEL": "1"}
            cases["ours, no compression"] = {"BACKUP_COMPRESSION": "none"}  # our own work alone: pipe, row counts, sha256, fsync
            if rows != args.rows:
                cases = {k: v for k, v in cases.items() if k.startswith("ours zstd -1") and "age" not in k}
            elif args.cases:
                cases = {k: v for k, v in cases.items() if re.search(args.cases, k)}
            times: dict[str, list[float]] = {name: [] for name in cases}
            sizes: dict[str, int] = {}
            for _ in range(args.rounds):  # interleaved: every case once per round
                for name, case in cases.items():
                    if isinstance(case, str):
                        times[name].append(timed(case, shell=True, name=name))
                        (work / "raw-file.dump").unlink(missing_ok=True)  # deleted outside the timing, as our backups are
                    else:
                        backups = work / "backups"
                        env = {**base_env, **case, "BACKUP_DIR": str(backups)}  # type: ignore[dict-item]
                        root = Path(env.pop("root", str(ROOT)))
                        seconds, peak = ours(env, "backup", name=name, root=root)
                        times[name].append(seconds)
                        if root == ROOT:
                            rss[rows] = max(rss.get(rows, 0), peak)
                        else:
                            print(f"# {name}: peak RSS {peak / 1024:.0f} MiB", flush=True)
                        newest = max(backups.glob("backup_*"), key=lambda p: p.stat().st_size)
                        sizes[name] = newest.stat().st_size
                        for path in backups.glob("backup_*"):
                            path.unlink()
            if rows == args.rows:
                for name, file in (("pg_dump -Fp | gzip", "plain.sql.gz"), ("pg_dump -Fc (default compression)", "custom.dump")):
                    if name in times:
                        sizes[name] = (work / file).stat().st_size
                raw = min(times["raw pg_dump -Fc -Z0 > /dev/null"])
                raw_file = min(times.get("raw pg_dump -Fc -Z0 to a file, fsynced", [float("nan")]))
                gz = min(times.get("pg_dump -Fp | gzip", [float("nan")]))
                print(f"\n| case ({rows} rows, {size}) | best of {args.rounds} (s) | median (s) | vs raw pg_dump > /dev/null | vs raw pg_dump to a file "
                      "| pg_dump\\|gzip / this | CPU s: client + server (median) | size (MB) |")
                print("|---|---|---|---|---|---|---|---|")
                for name, values in times.items():
                    best = min(values)
                    mb = f"{sizes[name] / 1e6:.0f}" if name in sizes else "-"
                    client = statistics.median(c for c, _ in CPU[name])
                    server = statistics.median(s for _, s in CPU[name])
                    print(f"| {name} | {best:.2f} | {statistics.median(values):.2f} | {best / raw:.2f}x | {best / raw_file:.2f}x | {gz / best:.2f}x "
                          f"| {client:.2f} + {server:.2f} | {mb} |", flush=True)
                if args.no_restore or cluster is None:
                    if cluster is not None:
                        cluster.psql(f"DROP DATABASE {db}")
                    continue
                # restore: ours (verify + decode + pg_restore into a new database + row counts) vs pg_restore -j 2
                subprocess.run(f"{pg_dump} -Fc -Z0 -d '{url}' > {work}/raw.dump", shell=True, check=True)
                restore_times: dict[str, list[float]] = {"pg_restore -j 2 (uncompressed custom dump)": [], "ours restore --target-db (zstd -1)": []}
                env = {**base_env, "BACKUP_COMPRESSION": "zstd", "BACKUP_COMPRESSION_LEVEL": "1", "BACKUP_DIR": str(work / "backups")}
                ours(env, "backup")
                for i in range(args.rounds):
                    cluster.psql(f"CREATE DATABASE r_{i}")
                    restore_times["pg_restore -j 2 (uncompressed custom dump)"].append(
                        timed([find_tool("pg_restore"), "-j", "2", "-d", cluster.url(f"r_{i}"), str(work / "raw.dump")]))
                    seconds, peak = ours(env, "restore", "latest", "--target-db", f"o_{i}")
                    restore_times["ours restore --target-db (zstd -1)"].append(seconds)
                    print(f"# restore peak RSS {peak / 1024:.0f} MiB", flush=True)
                base = min(restore_times["pg_restore -j 2 (uncompressed custom dump)"])
                print("\n| restore | best (s) | vs pg_restore -j 2 |\n|---|---|---|")
                for name, values in restore_times.items():
                    print(f"| {name} | {min(values):.1f} | {min(values) / base:.2f}x |")
            if cluster is not None:
                cluster.psql(f"DROP DATABASE {db}")
        print("\n| database rows | peak RSS of our backup process (MiB) |\n|---|---|")
        for rows, peak in rss.items():
            print(f"| {rows} | {peak / 1024:.0f} |")
        print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
              f"{subprocess.run([find_tool('pg_dump'), '--version'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
