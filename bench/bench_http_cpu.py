"""Daemon CPU per HTTP request, a new connection per request vs one kept-alive connection.

    python bench/bench_http_cpu.py --requests 1000 --rounds 3

The daemon runs with an empty backup volume and an unreachable database (no backup runs); its CPU time
is read from /proc before and after each batch. Each case runs once per round, interleaved with the
others, and the best round is shown (the machine is shared: the best is the least disturbed). The code
measured is the one `python -m sidecar` imports: set PYTHONPATH to compare two checkouts."""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import subprocess
import sys
import tempfile
import time

PORT = 19311


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch(pid: int, path: str, keep_alive: bool, requests: int) -> tuple[float, float, float]:
    """(wall, daemon CPU, client CPU) in ms per request."""
    daemon_before, client_before, started = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", PORT)
    for _ in range(requests):
        if not keep_alive:
            conn = http.client.HTTPConnection("127.0.0.1", PORT)
        conn.request("GET", path, headers={"Authorization": "Bearer bench"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        if not keep_alive:
            conn.close()
    wall = time.monotonic() - started
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    client = client_after.ru_utime + client_after.ru_stime - client_before.ru_utime - client_before.ru_stime
    daemon = cpu_seconds(pid) - daemon_before
    return wall * 1000 / requests, daemon * 1000 / requests, client * 1000 / requests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-http-")
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "BACKUP_DIR": f"{work}/backups", "SIDECAR_LISTEN": f"127.0.0.1:{PORT}",
           "SIDECAR_API_TOKEN": "bench", "BACKUP_SCHEDULE": "0 2 * * *", "BACKUP_ON_START": "false", "BACKUP_RETRY_SECONDS": "3600"}
    daemon = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, stderr=subprocess.DEVNULL)
    cases = [(keep_alive, path) for keep_alive in (False, True) for path in ("/metrics", "/v1/backups", "/healthz")]
    best: dict[tuple[bool, str], tuple[float, float, float]] = {}
    try:
        time.sleep(2)
        for _ in range(args.rounds):
            for case in cases:
                result = batch(daemon.pid, case[1], case[0], args.requests)
                if case not in best or result[1] < best[case][1]:
                    best[case] = result
        for (keep_alive, path), (wall, daemon_ms, client) in best.items():
            print(f"{'keep-alive' if keep_alive else 'new connection':14} {path:12} wall {wall:.2f} ms/request, "
                  f"daemon CPU {daemon_ms:.2f} ms/request, client CPU {client:.2f} ms/request")
    finally:
        daemon.terminate()
        daemon.wait()


if __name__ == "__main__":
    main()
