"""Daemon CPU per request under the soak test's load: wrk with 6 kept-alive connections, each pausing 15 ms
between requests (about 340 requests/s), alternating /metrics and /v1/backups (tests/faults/soak.lua).

    python bench/bench_http_load.py --rounds 2 --seconds 10 [--compare /path/to/other/checkout]

The daemon runs with an empty volume and an unreachable database, so only HTTP is measured; its CPU time is
read from /proc before and after each round. With --compare, the other checkout (e.g. `git worktree add
/tmp/old 69fae24`) runs interleaved with this one, and both are printed side by side."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT = 19411


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(checkout: Path, seconds: int) -> tuple[float, dict[str, float]]:
    """(daemon CPU ms per request, wrk's report)"""
    scratch = tempfile.mkdtemp()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(checkout), "DATABASE_URL": f"postgresql://u@/x?host={scratch}&port=1",
           "BACKUP_DIR": f"{scratch}/backups", "SIDECAR_LISTEN": f"127.0.0.1:{PORT}", "SIDECAR_API_TOKEN": "bench",
           "BACKUP_SCHEDULE": "0 2 1 1 *", "BACKUP_RETRY_SECONDS": "0"}
    daemon = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4)
        before = cpu_seconds(daemon.pid)
        out = subprocess.run(["wrk", "-t", "2", "-c", "6", "-d", f"{seconds}s", "-s", str(ROOT / "tests" / "faults" / "soak.lua"), f"http://127.0.0.1:{PORT}"],
                             env={"SOAK_TOKEN": "bench", "SOAK_DELAY_MS": "15"}, capture_output=True, text=True, check=True).stdout
        used = cpu_seconds(daemon.pid) - before
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    report = json.loads(out.strip().splitlines()[-1])
    return used / report["requests"] * 1000, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--compare", type=Path, help="another checkout, run interleaved with this one")
    args = parser.parse_args()
    checkouts = {"this": ROOT} | ({"other": args.compare} if args.compare else {})
    results: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            ms, report = one_round(checkout, args.seconds)
            results[name].append(ms)
            print(f"{name}: {report['requests']} requests, daemon CPU {ms:.3f} ms per request, p99 {report['p99_ms']:.1f} ms", flush=True)
    for name, values in results.items():
        print(f"{name}: best {min(values):.3f} ms per request, all {', '.join(f'{v:.3f}' for v in values)}")


if __name__ == "__main__":
    main()
