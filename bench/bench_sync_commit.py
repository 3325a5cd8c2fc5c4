"""What RPO 0 costs a commit: pgbench with the WAL receiver an ordinary (asynchronous) standby against the receiver as
the synchronous standby (synchronous_standby_names = 'pg_backup_sidecar', synchronous_commit = on), docs/pitr.md "The
loss window".

    python bench/bench_sync_commit.py --seconds 15 --rounds 2        (about 2 minutes)

A PostgreSQL 15 server with its durability defaults (fsync, synchronous_commit on; bench_pitr.BenchCluster), pgbench's
tables at --scale, `pg-backup-sidecar wal-receive` streaming into a spool on the same disk. Rounds alternate async and
sync (so that load from other work falls on both), each a `pgbench -N -c CLIENTS -T SECONDS` with per-transaction logs:
tps and the commit latency's p50/p99 (a -N transaction is 3 updates and an insert, then the commit; the difference
between the two settings is the commit's wait for the receiver's flush). Recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_pitr import BenchCluster, percentile  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402


def run_round(cluster: BenchCluster, work: Path, name: str, clients: int, seconds: int) -> tuple[float, float, float]:
    """(tps, p50 ms, p99 ms) of one pgbench run, from its per-transaction log (latency in microseconds, 3rd field)."""
    logs = work / name
    logs.mkdir()
    os.chmod(logs, 0o777)
    done = subprocess.run([find_tool("pgbench"), "-N", "-c", str(clients), "-j", str(clients), "-T", str(seconds), "-l", "--log-prefix",
                           str(logs / "tx"), cluster.url("postgres")], capture_output=True, text=True, check=True)
    latencies = [int(line.split()[2]) / 1000 for path in logs.iterdir() for line in path.read_text().splitlines()]
    tps = next(float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("tps"))
    return tps, percentile(latencies, 50), percentile(latencies, 99)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (async, sync) runs")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--scale", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(work, entry.pw_uid, entry.pw_gid)
    print("# uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "WAL_", "VALIDATION_"))}
    receiver = None
    try:
        with BenchCluster(base=work, port=54480) as cluster:
            subprocess.run([find_tool("pgbench"), "-i", "-q", "-s", str(args.scale), cluster.url("postgres")], check=True, capture_output=True)
            env = {**clean, "PYTHONPATH": str(ROOT), "DATABASE_URL": cluster.url("postgres"), "BACKUP_DIR": str(work / "backups")}
            receiver = subprocess.Popen([sys.executable, "-m", "sidecar", "wal-receive"], env=env, cwd=work, stdout=subprocess.DEVNULL,
                                        stderr=open(work / "receiver.log", "ab"))  # noqa: SIM115
            deadline = time.monotonic() + 30
            while cluster.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_backup_sidecar'") != "1":
                if time.monotonic() > deadline:
                    raise SystemExit("the receiver did not connect: " + (work / "receiver.log").read_text()[-2000:])
                time.sleep(0.2)
            results: dict[str, list[tuple[float, float, float]]] = {"async": [], "sync": []}
            for number in range(args.rounds):
                for mode, names in (("async", ""), ("sync", "pg_backup_sidecar")):
                    cluster.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
                    cluster.psql("SELECT pg_reload_conf()")
                    time.sleep(1)
                    state = cluster.psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'pg_backup_sidecar'")
                    figures = run_round(cluster, work, f"{mode}{number}", args.clients, args.seconds)
                    results[mode].append(figures)
                    print(f"round {number + 1} {mode} (sync_state {state}): tps {figures[0]:.0f}, commit latency p50 {figures[1]:.2f} ms, "
                          f"p99 {figures[2]:.2f} ms", flush=True)
            for mode, rows in results.items():
                print(f"{mode}: median of {len(rows)} rounds: tps {median(r[0] for r in rows):.0f}, p50 {median(r[1] for r in rows):.2f} ms, "
                      f"p99 {median(r[2] for r in rows):.2f} ms")
    finally:
        if receiver is not None:
            receiver.terminate()
            receiver.wait(timeout=60)
        print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
