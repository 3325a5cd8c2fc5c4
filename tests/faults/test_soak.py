"""Load: /metrics and /v1/backups hammered at a few hundred requests/s while backups run.

The load comes from wrk (Debian's package), a second process on loopback that keeps its connections
alive as Prometheus does and paces each one (tests/faults/soak.lua). Backups alternate unloaded and
loaded, so the comparison is made in one run on one machine."""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from sidecar.embedded import Cluster
from tests.test_daemon import TOKEN, Running, backup_run, request

CONNECTIONS = 6
PAUSE_MS = 15  # per connection between requests: 6 connections give about 300 requests/s
PAIRS = 3


def rss_kib(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1])


def backup_through_the_api(running: Running) -> dict[str, Any]:
    """A backup taken through POST /v1/backups; its metadata."""
    run = backup_run(running)
    assert run["state"] == "succeeded", running.log.read_text()[-2000:]
    return request(running.base, f"/v1/backups/{run['backup']}")[1]  # type: ignore[no-any-return]


def test_a_few_hundred_requests_per_second_during_backups_get_no_errors_and_keep_the_daemon_small(cluster: Cluster, db: str, env: dict[str, str],
                                                                                            tmp_path: Path) -> None:
    wrk = shutil.which("wrk")
    assert wrk, "wrk (Debian package wrk) is required"
    cluster.psql("CREATE TABLE big AS SELECT g, md5(g::text) AS h, now() AS at FROM generate_series(1, 8000000) g", db)
    running = Running({**env, "BACKUP_ON_START": "false", "BACKUP_SCHEDULE": "0 2 * * *", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    try:
        running.wait_for(lambda: request(running.base, "/v1/backups")[1], "the catch-up backup", timeout=120)  # also warms the caches
        rss_before = rss_kib(running.proc.pid)
        unloaded: list[float] = []
        loaded: list[float] = []
        reports: list[dict[str, Any]] = []
        for _ in range(PAIRS):
            unloaded.append(backup_through_the_api(running)["durationSeconds"])
            load = subprocess.Popen([wrk, "-t", "2", "-c", str(CONNECTIONS), "-d", "300s", "-s", str(Path(__file__).with_name("soak.lua")), running.base],
                                    env={"SOAK_TOKEN": TOKEN, "SOAK_DELAY_MS": str(PAUSE_MS)}, stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)  # the load is on before the backup starts and stays on until it has ended
            loaded.append(backup_through_the_api(running)["durationSeconds"])
            load.send_signal(signal.SIGINT)
            out, _ = load.communicate(timeout=30)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        assert request(running.base, "/healthz")[0] == 200
        rss_after = rss_kib(running.proc.pid)
    finally:
        assert running.stop() == 0
    for report in reports:
        # the load was real: wrk paces ~400 requests/s; with the suite's other worker on the same 2 cores it got 190-200
        # (the rate is the benchmark's figure, bench/bench_soak.py; here it only shows the daemon was kept busy)
        assert report["requests"] / report["seconds"] >= 100, report
        assert report["connect"] == report["read"] == report["write"] == report["status"] == report["timeout"] == 0, report
        assert report["p99_ms"] < 250, report
    # How much the load slows a backup is a figure for the benchmark (bench/bench_soak.py, bench/RESULTS.md), not an
    # assertion: on 2 shared cores it swung from 1.03 to 1.37 with whatever else the machine ran, for the old server
    # and the new one alike. What the test holds: no request fails, none waits long, the daemon stays small.
    ratio = statistics.median(loaded) / statistics.median(unloaded)
    print(f"soak: unloaded {unloaded} s, loaded {loaded} s, median ratio {ratio:.3f}; daemon RSS {rss_before} -> {rss_after} KiB; load {reports}")
    assert rss_after < rss_before + 20 * 1024, (rss_before, rss_after)
