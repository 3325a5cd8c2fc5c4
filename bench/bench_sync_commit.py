"""What RPO 0 costs a commit: the WAL receiver as the synchronous standby (synchronous_standby_names =
'pg_backup_sidecar') with synchronous_commit = on (each commit waits for the receiver's flush), against
synchronous_commit = local (the same server, each commit waits for its own WAL flush only: what a server without a
synchronous standby does). docs/pitr.md "The loss window".

    python bench/bench_sync_commit.py --seconds 5 --rounds 6        (about 2 minutes)

A PostgreSQL 15 server with its durability defaults (fsync, synchronous_commit on; bench_pitr.BenchCluster), pgbench's
tables at --scale, `pg-backup-sidecar wal-receive` streaming into a spool on the same disk. On a machine shared with
other work, load comes and goes, so both measures pair the two settings under the same load:
1. a probe: one connection commits a one-row INSERT --probes times, alternating `SET synchronous_commit` between local
   and on before each transaction; the commit's latency (client side) per setting, p50/p90/p99;
2. pgbench -N (-c CLIENTS) in short rounds alternating the two settings (PGOPTIONS): tps and transaction latency
   (per-transaction logs), medians over the rounds.
Recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
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


def run_round(cluster: BenchCluster, work: Path, name: str, clients: int, seconds: int, setting: str) -> tuple[float, float, float, float]:
    """(tps, mean ms, p50 ms, p99 ms) of one pgbench -N run with synchronous_commit = `setting`, from its per-transaction
    log (latency in microseconds, 3rd field)."""
    logs = work / name
    logs.mkdir()
    os.chmod(logs, 0o777)
    env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={setting}"}
    done = subprocess.run([find_tool("pgbench"), "-N", "-c", str(clients), "-j", str(clients), "-T", str(seconds), "-l", "--log-prefix",
                           str(logs / "tx"), cluster.url("postgres")], capture_output=True, text=True, check=True, env=env)
    latencies = [int(line.split()[2]) / 1000 for path in logs.iterdir() for line in path.read_text().splitlines()]
    tps = next(float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("tps"))
    return tps, sum(latencies) / len(latencies), percentile(latencies, 50), percentile(latencies, 99)


def probe(cluster: BenchCluster, count: int) -> dict[str, list[float]]:
    """Commit latency (ms) of a one-row INSERT, alternating synchronous_commit local / on transaction by transaction."""
    import psycopg

    times: dict[str, list[float]] = {"local": [], "on": []}
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        for i in range(2 * count):
            setting = "on" if i % 2 else "local"
            conn.execute(f"SET synchronous_commit = {setting}")
            started = time.perf_counter()
            conn.execute("INSERT INTO probe DEFAULT VALUES")
            times[setting].append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5, help="each pgbench round")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of pgbench rounds (local, on)")
    parser.add_argument("--probes", type=int, default=2000, help="commits of the probe per setting")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--scale", type=int, default=5)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a SIGTERM still runs the clean-up below (receiver, server, directory)
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
            cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'pg_backup_sidecar'")
            cluster.psql("SELECT pg_reload_conf()")
            time.sleep(1)
            print("sync_state:", cluster.psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'pg_backup_sidecar'"))
            times = probe(cluster, args.probes)
            for setting, values in times.items():
                print(f"probe, synchronous_commit = {setting}: {len(values)} commits, p50 {percentile(values, 50):.2f} ms, "
                      f"p90 {percentile(values, 90):.2f} ms, p99 {percentile(values, 99):.2f} ms", flush=True)
            results: dict[str, list[tuple[float, float, float, float]]] = {"local": [], "on": []}
            for number in range(args.rounds):
                for setting in ("local", "on"):
                    figures = run_round(cluster, work, f"{setting}{number}", args.clients, args.seconds, setting)
                    results[setting].append(figures)
                    print(f"pgbench round {number + 1}, synchronous_commit = {setting}: tps {figures[0]:.0f}, transaction latency mean "
                          f"{figures[1]:.2f} ms, p50 {figures[2]:.2f} ms, p99 {figures[3]:.2f} ms", flush=True)
            for setting, rows in results.items():
                print(f"pgbench -N -c {args.clients}, synchronous_commit = {setting}: median of {len(rows)} rounds: tps {median(r[0] for r in rows):.0f}, "
                      f"mean {median(r[1] for r in rows):.2f} ms, p50 {median(r[2] for r in rows):.2f} ms, p99 {median(r[3] for r in rows):.2f} ms")
    finally:
        if receiver is not None:
            receiver.terminate()
            receiver.wait(timeout=60)
        print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
