"""Throughput of the codec stages alone, in this process, on generated table-like text (no database).

    python bench/bench_codec.py --mb 200 --rounds 3

age: encrypt and decrypt of the whole input through `sidecar.age` (whichever implementation the
imported checkout has: the push API `Encryptor`/`Decryptor` of the old in-house module, or
`encrypt`/`decrypt` over pyrage), and the stock `age` CLI for reference. zstd: level-1 compression
and decompression through `sidecar.streams` (bounded output), and `zstandard` alongside when it is
installed. Best of N rounds, MB/s of plaintext. Results are recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
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


def best(rounds: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def age_functions(public: str, key: Path) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    step = 1 << 20
    if hasattr(age, "Encryptor"):  # the in-house implementation (before pyrage)
        def encrypt_old(data: bytes) -> bytes:
            enc = age.Encryptor([public])
            out = [enc.update(data[i:i + step]) for i in range(0, len(data), step)]
            return b"".join(out) + enc.finish()

        def decrypt_old(data: bytes) -> bytes:
            dec = age.Decryptor(age.parse_identities(key))
            out = [dec.update(data[i:i + step]) for i in range(0, len(data), step)]
            return b"".join(out) + dec.finish()

        return encrypt_old, decrypt_old

    def encrypt(data: bytes) -> bytes:
        out = io.BytesIO()
        age.encrypt(io.BytesIO(data), out, [public])
        return out.getvalue()

    def decrypt(data: bytes) -> bytes:
        out = io.BytesIO()
        age.decrypt(io.BytesIO(data), out, age.parse_identities(key))
        return out.getvalue()

    return encrypt, decrypt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = table_text(args.mb * 1_000_000)
    mb = len(data) / 1e6
    print(f"sidecar.age from {age.__file__}; {mb:.0f} MB of table text; best of {args.rounds}")

    secret, public = age.generate_identity()
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key.txt"
        key.write_text(secret + "\n")
        encrypt, decrypt = age_functions(public, key)
        sealed = encrypt(data)
        assert decrypt(sealed) == data
        print(f"| age encrypt, ours | {mb / best(args.rounds, lambda: encrypt(data)):.0f} MB/s |")
        print(f"| age decrypt, ours | {mb / best(args.rounds, lambda: decrypt(sealed)):.0f} MB/s |")
        if shutil.which("age"):
            plain, cipher = Path(tmp) / "plain", Path(tmp) / "cipher"
            plain.write_bytes(data)
            cipher.write_bytes(sealed)
            enc_cli = best(args.rounds, lambda: subprocess.run(["age", "-r", public, "-o", os.devnull, str(plain)], check=True))
            dec_cli = best(args.rounds, lambda: subprocess.run(["age", "-d", "-i", str(key), "-o", os.devnull, str(cipher)], check=True))
            print(f"| age encrypt, age CLI (file to /dev/null) | {mb / enc_cli:.0f} MB/s |")
            print(f"| age decrypt, age CLI (file to /dev/null) | {mb / dec_cli:.0f} MB/s |")

    if hasattr(streams, "encode"):
        packed = io.BytesIO()
        streams.encode(io.BytesIO(data), packed, "zstd", 1, None)
        stored = packed.getvalue()

        def unpack() -> None:
            streams.decode(io.BytesIO(stored), io.BytesIO(), "zstd", None)

        print(f"| zstd -1 compress, sidecar.streams | {mb / best(args.rounds, lambda: streams.encode(io.BytesIO(data), io.BytesIO(), 'zstd', 1, None)):.0f} MB/s |")
        print(f"| zstd decompress (bounded), sidecar.streams | {mb / best(args.rounds, unpack):.0f} MB/s |")
    try:
        import zstandard
    except ImportError:
        return
    step = 1 << 20

    def z_compress() -> bytes:
        obj = zstandard.ZstdCompressor(level=1).compressobj()
        return b"".join(obj.compress(data[i:i + step]) for i in range(0, len(data), step)) + obj.flush()

    compressed = z_compress()

    def z_decompress() -> None:
        obj = zstandard.ZstdDecompressor().decompressobj()
        for i in range(0, len(compressed), step):
            obj.decompress(compressed[i:i + step])

    print(f"| zstd -1 compress, zstandard compressobj | {mb / best(args.rounds, z_compress):.0f} MB/s |")
    print(f"| zstd decompress (unbounded), zstandard decompressobj | {mb / best(args.rounds, z_decompress):.0f} MB/s |")


if __name__ == "__main__":
    main()
