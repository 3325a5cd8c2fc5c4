"""Daemon CPU per HTTP request, a new connection per request vs one kept-alive connection.

    python bench/bench_http_cpu.py --requests 1000

The daemon runs with an empty backup volume and an unreachable database (no backup runs); its CPU time
is read from /proc before and after each batch."""

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-http-")
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "BACKUP_DIR": f"{work}/backups", "SIDECAR_LISTEN": f"127.0.0.1:{PORT}",
           "SIDECAR_API_TOKEN": "bench", "BACKUP_SCHEDULE": "0 2 * * *", "BACKUP_ON_START": "false"}
    daemon = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        for keep_alive in (False, True):
            for path in ("/metrics", "/v1/backups", "/healthz"):
                daemon_before, client_before, started = cpu_seconds(daemon.pid), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                conn = http.client.HTTPConnection("127.0.0.1", PORT)
                for _ in range(args.requests):
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
                daemon_ms = (cpu_seconds(daemon.pid) - daemon_before) * 1000 / args.requests
                print(f"{'keep-alive' if keep_alive else 'new connection':14} {path:12} wall {wall * 1000 / args.requests:.2f} ms/request, "
                      f"daemon CPU {daemon_ms:.2f} ms/request, client CPU {client * 1000 / args.requests:.2f} ms/request")
    finally:
        daemon.terminate()
        daemon.wait()


if __name__ == "__main__":
    main()
