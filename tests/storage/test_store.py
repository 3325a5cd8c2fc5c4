"""What every store promises, asked of both homes: the local volume and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator

import pytest

from sidecar.errors import ChecksumMismatch
from sidecar.storage.base import Deleted, ObjectExists, ObjectMissing, Store
from sidecar.storage.local import LocalStore
from sidecar.storage.objectstore import ObjectStore

MB = 1 << 20


def incompressible(total: int, seed: bytes = b"seed", chunk: int = MB) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes (sha256 in counter mode is fast enough and needs no memory)."""
    counter = 0
    produced = 0
    while produced < total:
        block = b"".join(hashlib.sha256(seed + (counter + i).to_bytes(8, "big")).digest() for i in range(chunk // 32))
        counter += chunk // 32
        block = block[: total - produced]
        produced += len(block)
        yield block


def digest(chunks: Iterator[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for c in chunks:
        h.update(c)
        size += len(c)
    return h.hexdigest(), size


def test_a_50_mb_stream_comes_back_with_the_same_sha256(store: Store) -> None:
    expected, size = digest(incompressible(50 * MB))
    result = store.put_stream("backup.dump", incompressible(50 * MB))
    assert (result.sha256, result.size, result.existed) == (expected, size, False)
    assert digest(store.open_read("backup.dump")) == (expected, size)
    info = store.stat("backup.dump")
    assert info is not None and info.size == size
    assert [i.name for i in store.list()] == ["backup.dump"]


def test_a_small_object_round_trips_too(store: Store) -> None:
    store.put_stream("meta.json", [b'{"a": 1}'])
    assert b"".join(store.open_read("meta.json")) == b'{"a": 1}'


def test_create_only_refuses_different_content_and_accepts_the_same(store: Store) -> None:
    for name, size in (("small", 1000), ("large", 20 * MB)):  # one PUT, and a multipart upload
        first = store.put_stream(name, incompressible(size))
        again = store.put_stream(name, incompressible(size), sha256=first.sha256)
        assert again.existed and again.sha256 == first.sha256
        assert store.put_stream(name, incompressible(size)).existed  # the same content, digest not given in advance
        with pytest.raises(ObjectExists, match=f"{name} already exists with different content"):
            store.put_stream(name, incompressible(size, seed=b"other"))
        assert digest(store.open_read(name))[0] == first.sha256  # untouched


def test_a_stream_that_fails_midway_leaves_nothing_listed(store: Store) -> None:
    def failing() -> Iterator[bytes]:
        yield from incompressible(30 * MB)
        raise OSError("the source broke")

    with pytest.raises(OSError, match="the source broke"):
        store.put_stream("broken.dump", failing())
    assert store.list() == []
    assert store.stat("broken.dump") is None
    if isinstance(store, LocalStore):
        assert os.listdir(store.dir) == []  # no temp file left either


def test_data_that_does_not_match_the_expected_sha256_is_not_stored(store: Store) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    for name, size in (("small", 100), ("large", 20 * MB)):
        with pytest.raises(ChecksumMismatch, match=f"{name}: sha256 of the data written is .*, expected {wrong}"):
            store.put_stream(name, incompressible(size), sha256=wrong)
    assert store.list() == []


def test_list_filters_by_prefix_and_delete_reports_what_happened(store: Store) -> None:
    for name in ("backup_1.dump", "backup_1.metadata.json", "other"):
        store.put_stream(name, [name.encode()])
    assert [i.name for i in store.list("backup_")] == ["backup_1.dump", "backup_1.metadata.json"]
    assert store.delete("backup_1.dump") == Deleted.DELETED
    assert store.delete("backup_1.dump") == Deleted.MISSING
    assert [i.name for i in store.list()] == ["backup_1.metadata.json", "other"]
    with pytest.raises(ObjectMissing, match="backup_1.dump does not exist"):
        b"".join(store.open_read("backup_1.dump"))


def test_a_local_object_is_private_to_the_sidecar(tmp_path: pytest.TempPathFactory) -> None:
    store = LocalStore(tmp_path / "s")  # type: ignore[operator]
    store.put_stream("a", [b"x"])
    assert stat.S_IMODE((store.dir / "a").stat().st_mode) == 0o600


def test_the_repository_partials_and_temp_files_are_not_objects(tmp_path: pytest.TempPathFactory) -> None:
    store = LocalStore(tmp_path / "s")  # type: ignore[operator]
    store.dir.mkdir()
    (store.dir / "backup_x.dump.partial").write_bytes(b"half")
    (store.dir / ".backup_x.dump.1234.tmp").write_bytes(b"half")
    assert store.list() == []


def test_object_names_are_flat(store: Store) -> None:
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(Exception, match="invalid object name"):
            store.put_stream(bad, [b"x"])


def test_an_object_store_names_where_it_is(store: Store) -> None:
    if isinstance(store, ObjectStore):
        assert store.description.startswith("s3://backups/t-") and "secret" not in store.description
