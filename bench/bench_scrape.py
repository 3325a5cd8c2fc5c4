"""Scrape latency of /metrics while a backup runs (target: under 50 ms).

    python bench/bench_scrape.py --rows 2000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.embedded import Cluster  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402

DATASET = ROOT / "tests" / "data" / "realistic.sql"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    os.chmod(work, 0o755)
    with Cluster(base=work, port=54420) as cluster:
        cluster.psql("CREATE DATABASE b")
        subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={args.rows}", "-f", str(DATASET),
                        "-d", cluster.url("b")], check=True, capture_output=True)
        env = {**os.environ, "DATABASE_URL": cluster.url("b"), "BACKUP_DIR": str(work / "backups"), "BACKUP_ON_START": "true",
               "SIDECAR_LISTEN": "127.0.0.1:19299", "DRILL_AFTER_BACKUP": "false"}
        daemon = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, stderr=subprocess.DEVNULL)
        try:
            latencies: list[float] = []
            seen_running = False
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    body = urllib.request.urlopen("http://127.0.0.1:19299/metrics", timeout=5).read().decode()
                except OSError:
                    time.sleep(0.1)
                    continue
                running = 'pg_backup_in_progress{operation="backup"} 1.0' in body
                if running:
                    latencies.append(time.monotonic() - start)
                    seen_running = True
                elif seen_running:
                    break
                time.sleep(0.02)
        finally:
            daemon.terminate()
            daemon.wait()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    print(f"{len(ms)} scrapes during a backup of {args.rows} rows: p50 {statistics.median(ms):.1f} ms, "
          f"p99 {ms[int(len(ms) * 0.99) - 1]:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
