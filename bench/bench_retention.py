"""Cost of one retention classification (runs after every backup) and of resolving 'latest'.

    python bench/bench_retention.py --backups 720
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.repository import Entry, choose_latest, format_id  # noqa: E402
from sidecar.retention import Policy, classify  # noqa: E402

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def entries(count: int) -> list[Entry]:
    """A backup every 2 hours, every 7th one with a failed drill; fresh objects (nothing parsed yet)."""
    result = []
    for n in range(count):
        backup_id = format_id(NOW - timedelta(hours=2 * n))
        result.append(Entry(backup_id, {"id": backup_id, "verified": {"at": backup_id, "ok": n % 7 != 0, "findings": []}}, "ok"))
    return result


def timed(count: int, run: Callable[[list[Entry]], object], repeat: int = 30) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        fresh = entries(count)
        started = time.perf_counter()
        run(fresh)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backups", type=int, default=720)
    args = parser.parse_args()
    tiers = Policy(days=30, last=10, daily=14, weekly=8, monthly=12, timezone="Europe/Berlin")
    for name, run in (("classify, 30 days", lambda e: classify(e, 30, NOW)),
                      (f"classify, {tiers.describe()}", lambda e: classify(e, tiers, NOW)),
                      ("choose_latest", lambda e: choose_latest(e, NOW))):
        median, best = timed(args.backups, run)
        print(f"{name}: median {median:.1f} ms, best {best:.1f} ms for {args.backups} backups")


if __name__ == "__main__":
    main()
