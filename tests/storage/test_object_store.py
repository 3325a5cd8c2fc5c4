"""The object store against a real S3 server (SeaweedFS): failures, a server killed mid-upload, memory, locks,
and the off-site copy of backup sets (data first, metadata last, idempotent, verified)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import S3Store

from sidecar.errors import ChecksumMismatch
from sidecar.repository import format_id
from sidecar.storage.base import Deleted, ObjectExists, StorageError, StoreUnusable
from sidecar.storage.copy import add_fact, copy_backup, remote_entries, verify_remote
from sidecar.storage.local import LocalStore
from sidecar.storage.objectstore import ObjectStore
from sidecar.storage.remote import RemoteConfig
from tests.storage.seaweed import ACCESS_KEY, LOCKED_BUCKET, SECRET_KEY, SeaweedServer
from tests.storage.test_store import digest, incompressible

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    assert SECRET_KEY not in text and ACCESS_KEY not in text, text
    return text


def make_backup(directory: Path, at: datetime, dump_size: int = 3 * MB, seed: bytes = b"dump") -> dict[str, Any]:
    """A committed local backup set as backup.py writes it (the file contents are random, which is all a copy sees)."""
    backup_id = format_id(at)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, name, size in (("dump", backup_id + ".dump.zst", dump_size), ("globals", backup_id + ".globals.sql.zst", 1000)):
        h = hashlib.sha256()
        with open(directory / name, "wb") as out:
            for chunk in incompressible(size, seed=seed + kind.encode()):
                out.write(chunk)
                h.update(chunk)
        files[kind] = {"name": name, "size": size, "checksum": h.hexdigest()}
    metadata = {"id": backup_id, "timestamp": at.isoformat(), "files": files, "checksum": files["dump"]["checksum"], "keep": False}
    (directory / (backup_id + ".metadata.json")).write_text(json.dumps(metadata))
    return metadata


# --- one-line errors naming the problem -----------------------------------------------------------

def test_wrong_credentials_are_named_in_one_line(seaweed: SeaweedServer, tmp_path: Path) -> None:
    wrong = tmp_path / "secret"
    wrong.write_text("not-the-secret")
    store = ObjectStore(seaweed.remote("x", secret_access_key_file=wrong))
    with pytest.raises(StoreUnusable) as caught:
        store.check()
    assert caught.value.reason == "credentials"
    assert "rejected the credentials (SignatureDoesNotMatch)" in one_line(caught.value)
    assert "not-the-secret" not in str(caught.value)


def test_a_missing_bucket_is_named_in_one_line(seaweed: SeaweedServer) -> None:
    store = seaweed.store("x", bucket="no-such-bucket")
    with pytest.raises(StoreUnusable) as caught:
        store.check()
    assert caught.value.reason == "missing-bucket"
    assert "bucket 'no-such-bucket' does not exist" in one_line(caught.value)
    with pytest.raises(StoreUnusable, match="does not exist"):  # an upload says the same, and creates nothing
        store.put_stream("a", [b"x"])


def test_an_unreachable_endpoint_is_named_in_one_line(seaweed: SeaweedServer) -> None:
    store = ObjectStore(seaweed.remote("x", endpoint="http://127.0.0.1:9"), attempts=2)
    with pytest.raises(StoreUnusable) as caught:
        store.check()
    assert caught.value.reason == "unreachable"
    assert "cannot reach the endpoint" in one_line(caught.value) and "BACKUP_REMOTE_ENDPOINT" in str(caught.value)


def test_credentials_come_from_the_standard_environment_in_a_child(seaweed: SeaweedServer, prefix: str) -> None:
    script = "from sidecar.storage.objectstore import store_from_environment as s; st = s(); st.check(); print(st.put_stream('e', [b'env']).size)"
    env = {**os.environ, **seaweed.environment(prefix), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr
    bad = subprocess.run([sys.executable, "-c", script], env={**env, "AWS_SECRET_ACCESS_KEY": "wrong-wrong"}, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "rejected the credentials" in bad.stderr and "wrong-wrong" not in bad.stderr


# --- faults ---------------------------------------------------------------------------------------

def test_the_server_killed_mid_upload_leaves_nothing_listed_and_works_after_a_restart(seaweed: SeaweedServer, prefix: str) -> None:
    store = ObjectStore(seaweed.remote(prefix), attempts=2)
    killed = False

    def source() -> Any:
        nonlocal killed
        for i, chunk in enumerate(incompressible(60 * MB)):
            if i == 30 and seaweed.incomplete_uploads():  # half sent, the multipart upload under way
                seaweed.kill()
                killed = True
            yield chunk

    try:
        with pytest.raises(StorageError) as caught:
            store.put_stream("big.dump", source())
    finally:
        seaweed.start()
    assert killed
    assert "cannot reach the endpoint" in one_line(caught.value)
    assert store.list() == [] and store.stat("big.dump") is None  # nothing half-written is visible
    again = store.put_stream("big.dump", incompressible(60 * MB))
    assert digest(store.open_read("big.dump")) == (again.sha256, 60 * MB)


def test_a_copy_killed_mid_upload_is_finished_by_running_it_again(seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    """The daemon copying a backup is SIGKILLed during a multipart upload; the remote lists no backup, and the next run completes it."""
    metadata = make_backup(tmp_path / "local", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), dump_size=120 * MB)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from sidecar.storage.copy import copy_backup
        from sidecar.storage.objectstore import store_from_environment
        copy_backup(Path({str(tmp_path / 'local')!r}), json.loads(sys.argv[1]), store_from_environment())
    """)
    env = {**os.environ, **seaweed.environment(prefix), "PYTHONPATH": str(ROOT)}
    before = set(seaweed.incomplete_uploads())
    child = subprocess.Popen([sys.executable, "-c", script, json.dumps(metadata)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not set(seaweed.incomplete_uploads()) - before:
            assert child.poll() is None, "the copy ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    store = seaweed.store(prefix)
    assert remote_entries(store) == []  # no metadata object: no remote backup
    result = copy_backup(tmp_path / "local", metadata, store)
    assert result.uploaded[-1] == metadata["id"] + ".metadata.json"
    [entry] = remote_entries(store)
    assert (entry.id, entry.status) == (metadata["id"], "ok")
    verify_remote(store, entry.metadata or {})
    assert copy_backup(tmp_path / "local", metadata, store).already_complete


def test_a_flipped_byte_in_a_remote_object_is_detected(seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    metadata = make_backup(tmp_path / "local", datetime(2026, 1, 2, tzinfo=UTC))
    store = seaweed.store(prefix)
    copy_backup(tmp_path / "local", metadata, store)
    dump = metadata["files"]["dump"]["name"]
    damaged = bytearray(b"".join(store.open_read(dump)))
    damaged[len(damaged) // 2] ^= 0x01
    raw = S3Store("backups", prefix=prefix, endpoint=seaweed.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                  secret_access_key=SECRET_KEY, client_options={"allow_http": True})
    obstore.put(raw, dump, bytes(damaged))  # bit rot, or someone with write access: the size is unchanged
    [entry] = remote_entries(store)
    assert entry.status == "ok"  # a listing checks sizes; the content needs reading
    with pytest.raises(ChecksumMismatch, match=f"{dump} of {metadata['id']} does not match its metadata .*damaged"):
        verify_remote(store, entry.metadata or {})
    store.delete(metadata["id"] + ".metadata.json")  # the copy is redone: the damaged object is named, not overwritten nor trusted
    with pytest.raises(ObjectExists, match=f"{dump} already exists with different content"):
        copy_backup(tmp_path / "local", metadata, store)


def test_a_local_file_changed_since_the_backup_is_not_copied(seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    metadata = make_backup(tmp_path / "local", datetime(2026, 1, 3, tzinfo=UTC), dump_size=20 * MB)
    path = tmp_path / "local" / metadata["files"]["dump"]["name"]
    with open(path, "r+b") as f:
        f.seek(10 * MB)
        f.write(b"\x00")
    store = seaweed.store(prefix)
    with pytest.raises(ChecksumMismatch, match="nothing was stored"):
        copy_backup(tmp_path / "local", metadata, store)
    assert store.stat(metadata["files"]["dump"]["name"]) is None and remote_entries(store) == []


# --- the off-site copy ----------------------------------------------------------------------------

@pytest.mark.parametrize("home", ["local", "s3"])
def test_a_remote_backup_is_listed_once_its_metadata_exists_newest_first(home: str, request: pytest.FixtureRequest, prefix: str, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "remote") if home == "local" else request.getfixturevalue("seaweed").store(prefix)
    older = make_backup(tmp_path / "local", datetime(2026, 1, 1, tzinfo=UTC))
    newer = make_backup(tmp_path / "local", datetime(2026, 1, 2, tzinfo=UTC), seed=b"other")
    copy_backup(tmp_path / "local", older, store)
    for item in newer["files"].values():  # a copy interrupted before its metadata
        with open(tmp_path / "local" / item["name"], "rb") as f:
            store.put_stream(item["name"], f)
    assert [e.id for e in remote_entries(store)] == [older["id"]]
    first = copy_backup(tmp_path / "local", newer, store)
    assert set(first.present) == {i["name"] for i in newer["files"].values()}  # already there, same sha256: skipped
    assert [(e.id, e.status) for e in remote_entries(store)] == [(newer["id"], "ok"), (older["id"], "ok")]
    store.delete(older["files"]["globals"]["name"])
    assert [(e.id, e.status) for e in remote_entries(store)] == [(newer["id"], "ok"), (older["id"], "missing-file")]


def test_pins_and_drill_results_are_new_objects_and_the_newest_wins(seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    metadata = make_backup(tmp_path / "local", datetime(2026, 1, 1, tzinfo=UTC))
    store = seaweed.store(prefix)
    copy_backup(tmp_path / "local", metadata, store)
    t = datetime(2026, 2, 1, tzinfo=UTC)
    add_fact(store, metadata["id"], "pin", True, t)
    add_fact(store, metadata["id"], "verified", {"ok": False}, t)
    add_fact(store, metadata["id"], "verified", {"ok": True}, t + timedelta(days=1))
    [entry] = remote_entries(store)
    assert entry.metadata and entry.metadata["keep"] is True and entry.metadata["verified"] == {"ok": True}
    names = [i.name for i in store.list()]
    assert f"{metadata['id']}.verified.2026-02-02T00-00-00-000Z.json" in names and len(names) == 6


# --- memory ---------------------------------------------------------------------------------------

def test_uploading_and_downloading_300_mb_keeps_the_process_under_100_mb(seaweed: SeaweedServer, prefix: str) -> None:
    # VmHWM, the peak RSS of this process image: getrusage's ru_maxrss would carry over the forking pytest's peak
    script = textwrap.dedent("""
        import re
        from pathlib import Path
        from sidecar.storage.objectstore import store_from_environment
        from tests.storage.test_store import incompressible, digest
        peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
        store = store_from_environment()
        start = peak()
        put = store.put_stream("big.dump", incompressible(300 << 20, seed=b"rss"))
        assert digest(store.open_read("big.dump")) == (put.sha256, 300 << 20)
        print(start, peak())
    """)
    env = {**os.environ, **seaweed.environment(prefix), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    start_kib, peak_kib = (int(v) for v in done.stdout.split())
    print(f"peak RSS after imports {start_kib // 1024} MiB, after 300 MiB up and down {peak_kib // 1024} MiB")
    assert peak_kib < 100 * 1024


# --- Object Lock ----------------------------------------------------------------------------------

def test_deleting_a_locked_backup_hides_it_and_the_lock_keeps_its_data(seaweed: SeaweedServer, prefix: str) -> None:
    """S3 semantics (SeaweedFS follows them): a DELETE without a version id in a bucket with Object Lock adds a delete
    marker; the locked version stays until its retention ends. The store reports the backup deleted (it is no longer
    listed) and the bytes are still in the bucket."""
    until = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    locked_writer = S3Store(LOCKED_BUCKET, prefix=prefix, endpoint=seaweed.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY, client_options={"allow_http": True, "default_headers": {
                                "x-amz-object-lock-mode": "COMPLIANCE", "x-amz-object-lock-retain-until-date": until}})
    version = obstore.put(locked_writer, "backup_x.dump", b"precious")["version"]
    store = seaweed.store(prefix, bucket=LOCKED_BUCKET)
    assert store.put_stream("backup_y.dump", [b"also precious"]).size == 13  # create-only works in a locked, versioned bucket
    assert store.delete("backup_x.dump") == Deleted.DELETED
    assert [i.name for i in store.list()] == ["backup_y.dump"]
    kept = obstore.get(locked_writer, "backup_x.dump", options={"version": version})
    assert bytes(kept.bytes()) == b"precious"


# --- configuration --------------------------------------------------------------------------------

def test_sse_and_storage_class_are_sent_and_accepted(seaweed: SeaweedServer, prefix: str) -> None:
    store = ObjectStore(RemoteConfig(**{**seaweed.remote(prefix).__dict__, "storage_class": "STANDARD"}))
    assert store.put_stream("a", incompressible(10 * MB)).size == 10 * MB
