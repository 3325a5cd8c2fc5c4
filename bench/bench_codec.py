"""Throughput of the codec stages alone, in this process, on generated table-like text (no database).

    python bench/bench_codec.py --mb 200 --rounds 5 [--before-age OLD_AGE_PY]

age: encrypt and decrypt of the whole input through `sidecar.age` (pyrage), through an older
in-house `age.py` given with --before-age (its push API `Encryptor`/`Decryptor`; it needs the
`cryptography` package; e.g. `git show 69fae24:sidecar/age.py > /tmp/age_before.py`), and the stock
`age` CLI for reference. zstd: level-1 compression and decompression through `sidecar.streams`
(bounded output), and `zstandard` alongside when it is installed. Output goes nowhere. The cases run
interleaved, round after round, so a busy machine slows them alike; best of N rounds, MB/s of
plaintext. Results are recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import importlib
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path and "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(ROOT))

from sidecar import age, streams  # noqa: E402


def table_text(size: int) -> bytes:
    """Rows like a pg_dump COPY block: ids, hex words, amounts, dates (zstd -1 gets about 2.5:1)."""
    rng = random.Random(1)
    words = [f"{rng.getrandbits(32):08x}" for _ in range(5000)]
    rows, total, n = [], 0, 0
    while total < size:
        row = f"{n}\t{rng.choice(words)}\t{rng.choice(words)} {rng.choice(words)}\t{rng.randint(0, 9999)}.{rng.randint(0, 99):02d}\t2024-01-{rng.randint(1, 28):02d}\n"
        rows.append(row)
        total += len(row)
        n += 1
    return "".join(rows).encode()[:size]


class Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def age_before(path: Path, public: str, key: Path, data: bytes, sealed: bytes) -> dict[str, Callable[[], object]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("age_before", path)
    assert spec is not None and spec.loader is not None
    old: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    step = 1 << 20

    def encrypt() -> None:
        enc = old.Encryptor([public])
        for i in range(0, len(data), step):
            enc.update(data[i:i + step])
        enc.finish()

    def decrypt() -> None:
        dec = old.Decryptor(old.parse_identities(key))
        for i in range(0, len(sealed), step):
            dec.update(sealed[i:i + step])
        dec.finish()

    return {"age encrypt, before (in-house age.py, cryptography)": encrypt, "age decrypt, before (in-house age.py, cryptography)": decrypt}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before-age", type=Path)
    args = parser.parse_args()
    data = table_text(args.mb * 1_000_000)
    mb = len(data) / 1e6
    print(f"sidecar from {Path(streams.__file__).parent}; {mb:.0f} MB of table text; best of {args.rounds}, interleaved")

    secret, public = age.generate_identity()
    tmp = Path(tempfile.mkdtemp())
    key = tmp / "key.txt"
    key.write_text(secret + "\n")
    sealed = io.BytesIO()
    age.encrypt(io.BytesIO(data), sealed, [public])
    plain, cipher = tmp / "plain", tmp / "cipher"
    plain.write_bytes(data)
    cipher.write_bytes(sealed.getvalue())
    packed = io.BytesIO()
    streams.encode(io.BytesIO(data), packed, "zstd", 1, None)
    stored = packed.getvalue()

    cases: dict[str, Callable[[], object]] = {
        "age encrypt, ours (pyrage)": lambda: age.encrypt(io.BytesIO(data), Discard(), [public]),
        "age decrypt, ours (pyrage)": lambda: age.decrypt(io.BytesIO(sealed.getvalue()), Discard(), age.parse_identities(key)),
    }
    if args.before_age:
        cases.update(age_before(args.before_age, public, key, data, sealed.getvalue()))
    if shutil.which("age"):
        cases["age encrypt, age CLI (file to /dev/null)"] = lambda: subprocess.run(["age", "-r", public, "-o", os.devnull, str(plain)], check=True)
        cases["age decrypt, age CLI (file to /dev/null)"] = lambda: subprocess.run(["age", "-d", "-i", str(key), "-o", os.devnull, str(cipher)], check=True)
    cases["zstd -1 compress, ours (backports.zstd, sidecar.streams)"] = lambda: streams.encode(io.BytesIO(data), Discard(), "zstd", 1, None)
    cases["zstd decompress, ours (bounded: 1 MiB per step)"] = lambda: streams.decode(io.BytesIO(stored), Discard(), "zstd", None)
    try:
        zstandard: Any = importlib.import_module("zstandard")  # the library used before, if still installed
    except ImportError:
        zstandard = None
    if zstandard is not None:
        step = 1 << 20

        def z_compress() -> None:
            obj = zstandard.ZstdCompressor(level=1).compressobj()
            for i in range(0, len(data), step):
                obj.compress(data[i:i + step])
            obj.flush()

        def z_decompress() -> None:
            obj = zstandard.ZstdDecompressor().decompressobj()
            for i in range(0, len(stored), step):
                obj.decompress(stored[i:i + step])

        cases["zstd -1 compress, before (zstandard compressobj)"] = z_compress
        cases["zstd decompress, before (zstandard decompressobj, unbounded)"] = z_decompress

    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    shutil.rmtree(tmp)
    print("| case | MB/s (best) | MB/s (median) |\n|---|---|---|")
    for name, spent in times.items():
        print(f"| {name} | {mb / min(spent):.0f} | {mb / sorted(spent)[len(spent) // 2]:.0f} |")


if __name__ == "__main__":
    main()
