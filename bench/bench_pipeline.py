"""Our backup pipeline alone, without the server: how fast it can take pg_dump's output, in one thread and with the
read-ahead (streams.Prefetch: the pipe and the row counts in one thread, zstd, sha256 and the file in the other).

    python bench/bench_pipeline.py --dump /tmp/dump.custom --rounds 2      (a `pg_dump -Fc -Z0` file, read at memory speed)

The backup keeps pace with the server when this is faster than the server's backend writes COPY data (about 150 MB/s
per core here): the figure says what one core, or two, of the sidecar's own can take. Printed as a table; recorded
by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.logical import dumpcounts  # noqa: E402
from sidecar.streams import HashingFile, Prefetch, ReadTap, encode  # noqa: E402


def run(dump: Path, depth: int, level: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of one pass over `dump` (depth 0: one thread), and the rows counted."""
    out = HashingFile(Path(tempfile.mkdtemp(prefix="bench-pipeline-")) / "out.zst")
    with open(dump, "rb", buffering=0) as raw:
        source = dumpcounts.CountingReader(ReadTap(io.BufferedReader(raw, 1 << 20)), dumpcounts.row_counter("custom"))
        wall, cpu = time.monotonic(), time.process_time()
        if depth:
            with Prefetch(source, depth) as ahead:
                encode(ahead, out, "zstd", level, None)
        else:
            encode(source, out, "zstd", level, None)
        out.close()
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    out.path.unlink()
    out.path.parent.rmdir()
    return wall, cpu, sum(source.result().values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", type=Path, required=True, help="a pg_dump -Fc -Z0 file")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--level", type=int, default=1)
    args = parser.parse_args()
    size = args.dump.stat().st_size
    best: dict[int, tuple[float, float]] = {}
    for _ in range(args.rounds):  # interleaved
        for depth in (0, 1, 2):
            wall, cpu, rows = run(args.dump, depth, args.level)
            if depth not in best or wall < best[depth][0]:
                best[depth] = (wall, cpu)
    print(f"\n| {size / 1e6:.0f} MB dump, {rows} rows, zstd {args.level} | best wall (s) | CPU (s) | MB/s |\n|---|---|---|---|")
    for depth, (wall, cpu) in best.items():
        name = "one thread" if depth == 0 else f"read-ahead, {depth} read{'s' if depth > 1 else ''} deep"
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {size / wall / 1e6:.0f} |")
    print(f"\n{os.cpu_count()} cores; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
