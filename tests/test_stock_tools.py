"""Backups open with stock tools (age, zstd, gunzip, psql, pg_restore) without our code."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import age
from sidecar.embedded import Cluster
from sidecar.postgres import find_tool
from sidecar.streams import decode, encode
from tests.conftest import backup_id, cli


def metadata(env: dict[str, str], bid: str) -> dict[str, object]:
    return json.loads((Path(env["BACKUP_DIR"]) / f"{bid}.metadata.json").read_text())  # type: ignore[no-any-return]


def test_an_encrypted_backup_opens_with_age_zstd_and_pg_restore(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1234) g", db)
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    bid = backup_id({**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public})
    meta = metadata(env, bid)
    name = meta["files"]["dump"]["name"]  # type: ignore[index]
    assert name.endswith(".dump.zst.age")
    path = Path(env["BACKUP_DIR"]) / name
    assert subprocess.run(["sha256sum", str(path)], capture_output=True, text=True).stdout.split()[0] == meta["checksum"]
    cluster.psql("CREATE DATABASE stock_restore")
    pipeline = f"age -d -i {key} {path} | zstd -d | {find_tool('pg_restore')} --exit-on-error -d '{cluster.url('stock_restore')}'"
    subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], check=True)
    assert cluster.psql("SELECT count(*) FROM t", "stock_restore") == "1234"


def test_a_gzip_backup_is_a_sql_gz_that_gunzip_and_psql_restore(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 777) g", db)
    bid = backup_id({**env, "BACKUP_COMPRESSION": "gzip"})
    path = Path(env["BACKUP_DIR"]) / f"{bid}.sql.gz"
    assert path.exists()
    cluster.psql("CREATE DATABASE gunzip_restore")
    subprocess.run(["bash", "-o", "pipefail", "-c", f"gunzip -c {path} | {find_tool('psql')} -X -q -v ON_ERROR_STOP=1 -d '{cluster.url('gunzip_restore')}'"],
                   check=True, capture_output=True)
    assert cluster.psql("SELECT count(*) FROM t", "gunzip_restore") == "777"


def test_a_truncated_sql_gz_commits_nothing_where_gunzip_psql_would(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE a AS SELECT g AS id FROM generate_series(1, 50000) g; CREATE TABLE b AS SELECT g AS id FROM generate_series(1, 50000) g", db)
    bid = backup_id({**env, "BACKUP_COMPRESSION": "gzip"})
    directory = Path(env["BACKUP_DIR"])
    path = directory / f"{bid}.sql.gz"
    truncated = gzip.decompress(path.read_bytes())
    truncated = truncated[: truncated.index(b"\n\\.\n") + 4]  # cut cleanly after the first table's data
    data = gzip.compress(truncated)
    # the classic pipeline commits most of the rows and exits 0
    cluster.psql("CREATE DATABASE classic")
    classic = subprocess.run([find_tool("psql"), "-X", "-q", "-d", cluster.url("classic")], input=truncated, capture_output=True)
    assert classic.returncode == 0 and cluster.psql("SELECT count(*) FROM a", "classic") == "50000"
    # ours: the same truncated content, re-recorded as if it were the backup, is refused and nothing is committed
    path.write_bytes(data)
    meta = metadata(env, bid)
    import hashlib

    meta["files"]["dump"].update(size=len(data), checksum=hashlib.sha256(data).hexdigest())  # type: ignore[index]
    meta.update(size=len(data), checksum=hashlib.sha256(data).hexdigest())
    (directory / f"{bid}.metadata.json").write_text(json.dumps(meta))
    assert cli(env, "verify", bid, check=False).returncode == 1
    result = cli(env, "restore", bid, "--target-db", "ours", check=False)
    assert result.returncode == 3 and "truncated" in result.stderr
    assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'ours'") == "0"


def _encrypt(data: bytes, public: str) -> bytes:
    out = io.BytesIO()
    age.encrypt(io.BytesIO(data), out, [public])
    return out.getvalue()


def _decrypt(data: bytes, key: Path) -> bytes:
    out = io.BytesIO()
    age.decrypt(io.BytesIO(data), out, age.parse_identities(key))
    return out.getvalue()


def test_age_files_interoperate_with_the_age_cli(tmp_path: Path) -> None:
    secret, public = age.generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(f"# created by the test\n{secret}\n")
    for size in (0, 1, 65535, 65536, 65537, 200_000):
        data = os.urandom(size)
        ours = _encrypt(data, public)
        assert subprocess.run(["age", "-d", "-i", str(key)], input=ours, capture_output=True, check=True).stdout == data
        theirs = subprocess.run(["age", "-r", public], input=data, capture_output=True, check=True).stdout
        assert _decrypt(theirs, key) == data


def test_a_truncated_age_file_is_an_error(tmp_path: Path) -> None:
    secret, public = age.generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(secret)
    whole = _encrypt(os.urandom(200_000), public)
    for cut in (10, 200, 65536 + 16 + 100, len(whole) - 1):
        with pytest.raises(age.AgeError):
            _decrypt(whole[:cut], key)


class _Pieces:
    """A reader that returns the given sizes in turn (then the rest), like a pipe."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self._data, self._cuts = memoryview(data), list(cuts)

    def read(self, size: int = -1) -> bytes:
        size = min(size if size >= 0 else len(self._data), self._cuts.pop(0) if self._cuts else len(self._data))
        piece, self._data = bytes(self._data[:size]), self._data[size:]
        return piece


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300_000), cuts=st.lists(st.integers(min_value=1, max_value=100_000), max_size=8),
       compression=st.sampled_from(["zstd", "gzip", "none"]), encrypted=st.booleans())
def test_the_stream_pipeline_round_trips_any_bytes_and_chunking(data: bytes, cuts: list[int], compression: str, encrypted: bool, tmp_path_factory: pytest.TempPathFactory) -> None:
    secret, public = _KEYS
    stored = io.BytesIO()
    encode(_Pieces(data, cuts), stored, compression, 1 if compression != "none" else 0, (public,) if encrypted else None)
    key = tmp_path_factory.mktemp("key") / "key.txt"
    key.write_text(secret)
    out = io.BytesIO()
    decode(_Pieces(stored.getvalue(), [7777] * 1000), out, compression, age.parse_identities(key) if encrypted else None)
    assert out.getvalue() == data


_KEYS = age.generate_identity()
