"""Soak: the daemon under ~300 requests/s (wrk, keep-alive, tests/faults/soak.lua) for a long time,
with backups back to back, against the same backups with no load, in one run.

    python bench/bench_soak.py --minutes 10 --rows 2000000 [--keep 20]

Prints each backup's time (loaded and unloaded), the load's latency and errors, and the daemon's RSS
over time. Without --keep every backup stays on the volume (as with days of retention), so each listing
grows; with --keep N the oldest are deleted after each backup and the volume stays the same size, so RSS
that keeps rising is a leak."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.embedded import Cluster  # noqa: E402
from sidecar.repository import Repository  # noqa: E402

TOKEN = "bench-token"
PORT = 19310


def call(path: str, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def backup() -> float:
    while (reply := call("/v1/backups", "POST"))[0] != 202:
        time.sleep(0.2)
    run_id = reply[1]["id"]
    while (state := call(f"/v1/runs/{run_id}")[1]["state"]) == "running":
        time.sleep(0.1)
    assert state == "succeeded", call(f"/v1/runs/{run_id}")
    return float(call("/v1/backups")[1][0]["durationSeconds"])


def rss_kib(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--pause-ms", type=int, default=15)
    parser.add_argument("--keep", type=int, default=0, help="delete all but the newest N backups after each one (0: keep all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    os.chmod(work, 0o755)
    with Cluster(base=work, port=54440) as cluster:
        cluster.psql("CREATE DATABASE b")
        cluster.psql(f"CREATE TABLE big AS SELECT g, md5(g::text) AS h, now() AS at FROM generate_series(1, {args.rows}) g", "b")
        env = {**os.environ, "DATABASE_URL": cluster.url("b"), "BACKUP_DIR": str(work / "backups"), "SIDECAR_LISTEN": f"127.0.0.1:{PORT}",
               "SIDECAR_API_TOKEN": TOKEN, "BACKUP_SCHEDULE": "0 2 * * *", "DRILL_AFTER_BACKUP": "false", "BACKUP_RETENTION_DAYS": "0"}
        daemon = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if call("/v1/backups")[1]:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            unloaded = [backup() for _ in range(3)]
            rss = [rss_kib(daemon.pid)]
            wrk = subprocess.Popen(["wrk", "-t", "2", "-c", str(args.connections), "-d", f"{int(args.minutes * 60) + 600}s",
                                    "-s", str(ROOT / "tests" / "faults" / "soak.lua"), f"http://127.0.0.1:{PORT}"],
                                   env={"SOAK_TOKEN": TOKEN, "SOAK_DELAY_MS": str(args.pause_ms)}, stdout=subprocess.PIPE, text=True)
            loaded: list[float] = []
            end = time.monotonic() + args.minutes * 60
            while time.monotonic() < end:
                loaded.append(backup())
                if args.keep:
                    repo = Repository(work / "backups")
                    for entry in repo.entries()[args.keep:]:
                        repo.delete(entry)
                rss.append(rss_kib(daemon.pid))
            wrk.send_signal(signal.SIGINT)
            report = json.loads(wrk.communicate(timeout=60)[0].strip().splitlines()[-1])
            after = [backup() for _ in range(3)]
        finally:
            daemon.terminate()
            daemon.wait()
    base = statistics.median(unloaded + after)
    print(f"machine: {os.cpu_count()} cores; {args.rows} rows; {args.minutes} min of load; "
          f"{'the newest ' + str(args.keep) if args.keep else 'every'} backup kept")
    print(f"backups unloaded (before/after): {unloaded} / {after} s, median {base:.2f} s")
    print(f"backups under load: {len(loaded)}, median {statistics.median(loaded):.2f} s, ratio {statistics.median(loaded) / base:.3f}, "
          f"max {max(loaded):.2f} s")
    print(f"load: {report['requests']} requests in {report['seconds']:.0f} s = {report['requests'] / report['seconds']:.0f}/s, "
          f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, max {report['max_ms']:.1f} ms, "
          f"errors connect/read/write/status/timeout {report['connect']}/{report['read']}/{report['write']}/{report['status']}/{report['timeout']}")
    print(f"daemon RSS KiB: start {rss[0]}, after 1/4 {rss[len(rss) // 4]}, after 1/2 {rss[len(rss) // 2]}, end {rss[-1]}, max {max(rss)}")


if __name__ == "__main__":
    main()
