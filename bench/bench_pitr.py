"""Point-in-time recovery (issue 13), side by side in one run: archive lag under a write load, the receiver's CPU, and
a restore to a time against a logical restore of the same database.

    python bench/bench_pitr.py --seconds 60 --size-mb 1000          (about 15 minutes on a 2-core machine)
    python bench/bench_pitr.py --seconds 20 --size-mb 100           (a quick look)

1. Lag. A PostgreSQL 15 cluster (16 MiB WAL segments, fsync on, synchronous_commit on: a server's defaults) with
   pgbench's tables at --scale; `pg-backup-sidecar wal-receive` streams WAL into BACKUP_DIR (zstd, the default) while
   `pgbench -N -c 2` writes for --seconds. Every 0.25 s a probe commits one row and notes when its commit returned and
   the WAL position after it. Two figures per probe: until the receiver has *flushed* that position to the spool
   (pg_stat_replication.flush_lsn: what survives a crash of the database's node if the spool's volume survives), and
   until the segment holding it is *archived* (sha256 + zstd + record written, polled every 20 ms): a segment is
   archived once it is complete, so this lag is about half a segment's fill time at the write rate, plus our stages.
   The receiver's CPU: utime + stime of the sidecar process and its pg_receivewal child over the run (from /proc).
2. Restore. The database is grown with tests/data/realistic.sql to --size-mb, then: our logical `backup`, a
   `base-backup`, a few writes, the target time T, more writes, a segment switch. Timed: `restore --to-time T
   --into-data-dir D` and the server started on D until it accepts writes (promoted), against our logical `restore
   latest --target-db` of the same database and stock `pg_restore -j 2` of a `pg_dump -Fc -Z0` file. Both restore
   the same data; the physical one also replays the WAL since the base backup and brings every database back.

Results are recorded by hand in bench/RESULTS.md with `uptime` before and after."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.embedded import HBA, Cluster  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402

DATASET = ROOT / "tests" / "data" / "realistic.sql"
ROWS_PER_MB = 3600  # realistic.sql: about 280 MB of database per 1,000,000 rows


class BenchCluster(Cluster):
    """A server with its defaults for durability (fsync, full_page_writes, synchronous_commit on), 16 MiB segments, and
    `local replication` allowed (trust: a bench on a Unix socket in a private directory)."""

    def start(self) -> BenchCluster:
        self._run([find_tool("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])
        (self.data / "pg_hba.conf").write_text(HBA + "local replication all trust\n")
        self.start_existing()
        return self

    def start_existing(self) -> None:
        options = f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -c port={self.port} -c max_wal_size=4GB"
        self._run([find_tool("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "600", "start"])


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def segment_of(position: int, timeline: int = 1, size: int = 16 << 20) -> str:
    number = position // size
    per = 0x100000000 // size
    return f"{timeline:08X}{number // per:08X}{number % per:08X}"


def cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of a process and its live children (the pg_receivewal child), in seconds, by program name."""
    total: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            name, rest = Path(f"/proc/{p}/stat").read_text().split(" (", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        total[name] = total.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return total


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench_lag(cluster: BenchCluster, work: Path, env: dict[str, str], seconds: int, scale: int) -> None:
    subprocess.run([find_tool("pgbench"), "-i", "-q", "-s", str(scale), cluster.url("postgres")], check=True, capture_output=True)
    cluster.psql("CREATE TABLE probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())")
    receiver = subprocess.Popen([sys.executable, "-m", "sidecar", "wal-receive"], env=env, cwd=work, stdout=subprocess.DEVNULL,
                                stderr=open(work / "receiver.log", "ab"))  # noqa: SIM115
    archive = Path(env["BACKUP_DIR"]) / "wal"
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for record in archive.glob("*/*/*.json"):
                seen.setdefault(record.name[:-5], time.monotonic())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone() != (1,):
                if time.monotonic() > deadline:
                    raise SystemExit("the receiver did not connect: " + (work / "receiver.log").read_text()[-2000:])
                time.sleep(0.1)
            spool = Path(env["BACKUP_DIR"]) / "wal" / "spool"
            while any(not n.endswith(".partial") for n in os.listdir(spool) if not n.startswith(".")):
                time.sleep(0.1)  # the backlog from before the receiver started (pgbench -i) is archived before the load
            watcher.start()
            start_lsn = lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
            cpu_before, wall_before = cpu_seconds(receiver.pid), time.monotonic()
            load = subprocess.Popen([find_tool("pgbench"), "-N", "-c", "2", "-j", "1", "-T", str(seconds), cluster.url("postgres")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            probes: list[tuple[float, int]] = []
            flushed: list[float] = []
            pending: list[tuple[float, int]] = []
            while load.poll() is None:
                conn.execute("INSERT INTO probe DEFAULT VALUES")
                committed = time.monotonic()
                position = lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])  # type: ignore[index]
                probes.append((committed, position))
                pending.append((committed, position))
                row = conn.execute("SELECT flush_lsn::text FROM pg_stat_replication").fetchone()
                if row and row[0]:
                    flush = lsn(row[0])
                    now = time.monotonic()
                    flushed += [now - c for c, p in pending if p <= flush]
                    pending = [(c, p) for c, p in pending if p > flush]
                time.sleep(0.02 if pending else 0.25)
            output = load.communicate()[0]
            end_lsn = lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
            cpu_after, wall = cpu_seconds(receiver.pid), time.monotonic() - wall_before
            by_program = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
            cpu_used = sum(by_program.values())
            conn.execute("SELECT pg_switch_wal()")
            time.sleep(3)
    finally:
        stop.set()
        receiver.terminate()
        receiver.wait(timeout=60)
    archived = [seen[segment_of(p)] - c for c, p in probes if segment_of(p) in seen]
    wal_mb = (end_lsn - start_lsn) / 1e6
    tps = next((line for line in output.splitlines() if line.startswith("tps")), "tps ?")
    print(f"## lag under pgbench -N -c 2 for {seconds} s (scale {scale}): {tps.strip()}; {wal_mb:.0f} MB of WAL "
          f"({wal_mb / wall:.1f} MB/s, a 16 MiB segment every {16.8 / max(wal_mb / wall, 0.01):.1f} s)")
    print(f"probes: {len(probes)}; flushed by the receiver: {len(flushed)}; in a segment archived: {len(archived)}")
    if flushed:
        print(f"commit -> flushed to the spool (receiver's flush_lsn): p50 {percentile(flushed, 50):.3f} s, "
              f"p99 {percentile(flushed, 99):.3f} s, max {max(flushed):.3f} s")
    if archived:
        print(f"commit -> segment archived (sha256 + zstd + record): p50 {percentile(archived, 50):.2f} s, "
              f"p99 {percentile(archived, 99):.2f} s, max {max(archived):.2f} s")
    print(f"receiver CPU (sidecar + pg_receivewal): {cpu_used:.1f} s in {wall:.0f} s = {100 * cpu_used / wall:.0f}% of one core, "
          f"{1000 * cpu_used / max(wal_mb, 1):.1f} ms per MB of WAL ("
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(by_program.items())) + ")", flush=True)


def timed(argv: list[str] | str, env: dict[str, str] | None, cwd: Path) -> float:
    start = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=cwd, shell=isinstance(argv, str), capture_output=True, text=True,
                            executable="/bin/bash" if isinstance(argv, str) else None)
    if result.returncode != 0:
        raise SystemExit(f"{argv if isinstance(argv, str) else ' '.join(argv)} failed: {result.stderr[-2000:]}")
    return time.monotonic() - start


def bench_restore(cluster: BenchCluster, work: Path, env: dict[str, str], size_mb: int) -> None:
    db = "app"
    cluster.psql(f"CREATE DATABASE {db}")
    rows = size_mb * ROWS_PER_MB
    subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={rows}", "-f", str(DATASET), "-d", cluster.url(db)], check=True)
    cluster.psql("CHECKPOINT")
    size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('{db}'))")
    app_env = {**env, "DATABASE_URL": cluster.url(db)}
    receiver = subprocess.Popen([sys.executable, "-m", "sidecar", "wal-receive"], env=app_env, cwd=work, stdout=subprocess.DEVNULL,
                                stderr=open(work / "receiver.log", "ab"))  # noqa: SIM115
    try:
        backup_s = timed([sys.executable, "-m", "sidecar", "backup"], app_env, work)
        base_s = timed([sys.executable, "-m", "sidecar", "base-backup"], app_env, work)
        cluster.psql("CREATE TABLE marks (at text); INSERT INTO marks VALUES ('before')", db)
        time.sleep(1.1)
        target = datetime.now(UTC).isoformat()
        time.sleep(1.1)
        cluster.psql("INSERT INTO marks VALUES ('after')", db)
        cluster.psql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 120
        while True:
            listed = json.loads(subprocess.run([sys.executable, "-m", "sidecar", "list", "--base", "--json"], env=app_env, cwd=work,
                                               capture_output=True, text=True, check=True).stdout)
            if listed and all(b.get("status") == "ok" for b in listed):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"base backup not good after 120 s: {listed}")
            time.sleep(1)
        time.sleep(2)  # the switched segment
    finally:
        receiver.terminate()
        receiver.wait(timeout=60)
    dump = work / "stock.dump"
    dump_s = timed(f"{find_tool('pg_dump')} -Fc -Z0 -d '{cluster.url(db)}' > {dump}", None, work)
    print(f"## restore of a {size} database ({rows} rows of realistic.sql); backup {backup_s:.0f} s, base-backup {base_s:.0f} s, "
          f"pg_dump -Fc -Z0 {dump_s:.0f} s", flush=True)

    restored = BenchCluster(base=work, port=cluster.port + 1)
    shutil.rmtree(restored.data, ignore_errors=True)
    start = time.monotonic()
    timed([sys.executable, "-m", "sidecar", "restore", "--to-time", target, "--into-data-dir", str(restored.data)], app_env, work)
    written = time.monotonic() - start
    restored.start_existing()
    with psycopg.connect(restored.url(db), autocommit=True) as conn:
        while conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
            time.sleep(0.05)
        physical = time.monotonic() - start
        marks = [r[0] for r in conn.execute("SELECT at FROM marks ORDER BY at")]
    restored.destroy()
    assert marks == ["before"], f"the restore to {target} has {marks}, not only 'before'"
    print(f"restore --to-time --into-data-dir, then the server up and promoted: {physical:.1f} s (data directory written in {written:.1f} s)")
    logical = timed([sys.executable, "-m", "sidecar", "restore", "latest", "--target-db", "app_logical"], app_env, work)
    print(f"our logical restore latest --target-db: {logical:.1f} s")
    cluster.psql("CREATE DATABASE app_stock")
    stock = timed([find_tool("pg_restore"), "-j", "2", "-d", cluster.url("app_stock"), str(dump)], None, work)
    print(f"stock pg_restore -j 2 of pg_dump -Fc -Z0: {stock:.1f} s")
    print(f"ratios: physical/logical {physical / logical:.2f}x, physical/stock {physical / stock:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60, help="pgbench write load for the lag figures")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale")
    parser.add_argument("--size-mb", type=int, default=1000, help="database size for the restore figures (0: skip them)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pitr-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(work, entry.pw_uid, entry.pw_gid)
    print("# uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "WAL_", "VALIDATION_"))}
    try:
        with BenchCluster(base=work, port=54470) as cluster:
            env = {**clean, "PYTHONPATH": str(ROOT), "DATABASE_URL": cluster.url("postgres"), "BACKUP_DIR": str(work / "backups"),
                   "BACKUP_RETENTION_DAYS": "0"}
            bench_lag(cluster, work, env, args.seconds, args.scale)
            if args.size_mb:
                bench_restore(cluster, work, env, args.size_mb)
    finally:
        print("# uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
