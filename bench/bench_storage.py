"""Upload (and download) throughput to a local SeaweedFS: our ObjectStore vs obstore's plain put/get, in one run.

    python bench/bench_storage.py --size-mb 500 --rounds 3

Starts its own SeaweedFS (tests/storage/seaweed.py), writes one file of incompressible data, then per round:
ObjectStore.put_stream of the open file (8 MiB parts x 4, create-only, sha256 checked while streaming, S3 sha256
checksums per part) and obstore.put of the same Path (5 MiB x 12, no checks); then reads both back. Prints the
best round of each, side by side, with the ratio; results are recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import obstore  # noqa: E402
from obstore.store import S3Store  # noqa: E402

from sidecar.storage.base import sha256_of  # noqa: E402
from sidecar.storage.objectstore import ObjectStore  # noqa: E402
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedServer  # noqa: E402


def put_ours(store: ObjectStore, source: Path, expected: str, size: int) -> None:
    with open(source, "rb") as handle:
        assert store.put_stream("obj", handle, sha256=expected).size == size


def get_ours(store: ObjectStore, expected: str) -> None:
    assert sha256_of(store.open_read("obj"))[0] == expected


def get_plain(store: S3Store, name: str, expected: str) -> None:
    h = hashlib.sha256()
    for chunk in obstore.get(store, name).stream():
        h.update(chunk)
    assert h.hexdigest() == expected


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "source.bin"
        digest = hashlib.sha256()
        with open(source, "wb") as out:
            for _ in range(args.size_mb):
                block = os.urandom(1 << 20)
                digest.update(block)
                out.write(block)
        expected = digest.hexdigest()
        size = source.stat().st_size
        with SeaweedServer(work / "seaweed", locked_buckets=()) as server:
            print(f"SeaweedFS up in {server.started_in:.1f} s; {size >> 20} MiB, {args.rounds} rounds; "
                  f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, obstore {obstore.__version__}")
            plain = S3Store(BUCKET, prefix="bench-plain", endpoint=server.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY, client_options={"allow_http": True})
            best: dict[str, float] = {}
            for round_ in range(args.rounds):
                ours = server.store(f"bench-ours-{round_}")
                name = f"obj-{round_}"
                steps: list[tuple[str, Callable[[], None]]] = [
                    ("upload: ObjectStore.put_stream", partial(put_ours, ours, source, expected, size)),
                    ("upload: obstore.put", partial(obstore.put, plain, name, source)),  # type: ignore[list-item]
                    ("download+sha256: ObjectStore.open_read", partial(get_ours, ours, expected)),
                    ("download+sha256: obstore.get", partial(get_plain, plain, name, expected)),
                ]
                for label, action in steps:
                    began = time.monotonic()
                    action()
                    best[label] = min(best.get(label, float("inf")), time.monotonic() - began)
        mib = size / (1 << 20)
        print(f"{'':42} {'seconds':>8} {'MiB/s':>8}")
        for label, seconds in best.items():
            print(f"{label:42} {seconds:8.2f} {mib / seconds:8.1f}")
        print(f"upload ratio ours/plain (time): {best['upload: ObjectStore.put_stream'] / best['upload: obstore.put']:.2f}x; "
              f"download ratio: {best['download+sha256: ObjectStore.open_read'] / best['download+sha256: obstore.get']:.2f}x")


if __name__ == "__main__":
    main()
