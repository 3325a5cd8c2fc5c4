"""Retention on the remote store, against a real S3 server (SeaweedFS) and the real CLI: its own days, never the newest
good remote backup nor a pinned one, the metadata object deleted first, leftovers of interrupted deletes and copies
cleaned, a delete the store refuses reported as kept by lock."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import S3Store

from sidecar import api
from sidecar.config import load_config
from sidecar.repository import METADATA_SUFFIX, format_id
from sidecar.storage.copy import TOMBSTONE_SUFFIX, add_fact, copy_backup, delete_remote, metadata_bytes, remote_entries
from sidecar.storage.local import LocalStore
from sidecar.storage.objectstore import ObjectStore
from tests.conftest import Cluster, cli
from tests.storage.seaweed import ACCESS_KEY, LOCKED_BUCKET, SECRET_KEY, SeaweedServer
from tests.storage.test_object_store import make_backup

NOW = datetime.now(UTC)


def offline_env(tmp_path: Path, server: SeaweedServer, prefix: str, bucket: str = "backups", **extra: str) -> dict[str, str]:
    """prune does not connect to PostgreSQL: the remote, an empty volume, and the retention settings of the test."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "AWS_"))}
    return {**clean, **server.environment(prefix, bucket=bucket), "DATABASE_URL": "postgresql://u@h/db",
            "BACKUP_DIR": str(tmp_path / "volume"), **extra}


def remote_backups(store: ObjectStore, tmp_path: Path, ages: list[int]) -> list[str]:
    """Complete remote backups taken `ages` days ago (copied as the sidecar copies them), oldest first."""
    ids = []
    for days in sorted(ages, reverse=True):
        metadata = make_backup(tmp_path / "source", NOW - timedelta(days=days, minutes=5), dump_size=4096, seed=str(days).encode())
        copy_backup(tmp_path / "source", metadata, store)
        ids.append(metadata["id"])
    return ids


def names(store: ObjectStore) -> set[str]:
    return {info.name for info in store.list()}


def listed(env: dict[str, str]) -> list[str]:
    return [b["id"] for b in json.loads(cli(env, "list", "--remote", "--json").stdout)]


def test_prune_deletes_expired_remote_backups_by_their_own_days_but_never_the_newest_good_or_a_pinned_one(
        seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    store = seaweed.store(prefix)
    d70, d60, d50, d40, d20 = remote_backups(store, tmp_path, [70, 60, 50, 40, 20])
    add_fact(store, d60, "pin", True)  # pinned on the remote: a fact object beside the backup
    env = offline_env(tmp_path, seaweed, prefix, BACKUP_RETENTION_DAYS="7", BACKUP_REMOTE_RETENTION_DAYS="45")

    dry = cli(env, "prune", "--dry-run").stdout.splitlines()
    assert dry[0] == "would delete 0, kept 0"  # the (empty) volume
    assert dry[1] == f"remote {store.description}: would delete 2, kept 3"
    assert f"  would delete: {d70}: older than 45 days" in dry and f"  would delete: {d50}: older than 45 days" in dry
    assert f"  keep: {d60}: pinned (unpin to release)" in dry
    assert listed(env) == [d20, d40, d50, d60, d70]  # a dry run deletes nothing

    done = cli(env, "prune").stdout.splitlines()
    assert done[1] == f"remote {store.description}: deleted 2, kept 3"
    assert listed(env) == [d20, d40, d60]  # 40 days old is kept: the remote's own 45 days, not the volume's 7
    assert not any(name.startswith((d70, d50)) for name in names(store))  # data objects, metadata and tombstone all gone

    # every remote backup older than the retention: the newest good one stays anyway; 0 keeps everything
    old = seaweed.store(prefix + "-old")
    o30, o20 = remote_backups(old, tmp_path / "old", [30, 20])
    old_env = offline_env(tmp_path, seaweed, prefix + "-old", BACKUP_RETENTION_DAYS="7")  # the remote inherits 7 days
    assert cli({**old_env, "BACKUP_REMOTE_RETENTION_DAYS": "0"}, "prune").stdout.splitlines()[1] == f"remote {old.description}: deleted 0, kept 2"
    assert f"  deleted: {o30}: older than 7 days" in cli(old_env, "prune").stdout.splitlines()
    assert listed(old_env) == [o20]


def test_a_backup_pinned_on_the_volume_is_kept_on_the_remote_too(seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    store = seaweed.store(prefix)
    older, newer = remote_backups(store, tmp_path, [60, 50])
    volume = tmp_path / "volume"
    metadata = make_backup(volume, datetime.fromisoformat(json.loads(b"".join(store.open_read(older + METADATA_SUFFIX)))["timestamp"]),
                           dump_size=4096, seed=b"60")
    assert metadata["id"] == older
    (volume / (older + METADATA_SUFFIX)).write_text(json.dumps({**metadata, "keep": True}))
    env = offline_env(tmp_path, seaweed, prefix, BACKUP_RETENTION_DAYS="30")
    out = cli(env, "prune").stdout.splitlines()
    assert f"remote {store.description}: deleted 0, kept 2" in out
    assert listed(env) == [newer, older]


def test_a_backup_prunes_the_remote_after_its_copy_as_the_daemon_does_after_each_backup(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    store = seaweed.store(prefix)
    [expired] = remote_backups(store, tmp_path, [40])
    cluster.psql("CREATE TABLE t AS SELECT 1 AS one", db)
    env = {**env, **seaweed.environment(prefix), "DRILL_AFTER_BACKUP": "false"}
    taken = cli(env, "backup").stdout.strip().splitlines()[-1]  # the daemon runs this same command for each backup
    assert listed(env) == [taken]  # copied, then the remote pruned: 40 days is past the default 30
    assert not any(name.startswith(expired) for name in names(store))


def test_the_leftovers_of_an_interrupted_remote_delete_are_not_listed_and_the_next_prune_removes_them(
        seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    store = seaweed.store(prefix)
    gone, kept = remote_backups(store, tmp_path, [50, 1])
    # what a prune killed after its first steps leaves: the tombstone written, the metadata deleted, the data still there
    store.put_stream(gone + TOMBSTONE_SUFFIX, [b'{"deleting": true}\n'])
    store.delete(gone + METADATA_SUFFIX)
    env = offline_env(tmp_path, seaweed, prefix)
    assert listed(env) == [kept]  # a half-deleted backup is never listed
    assert any(name.startswith(gone + ".dump") for name in names(store))
    out = cli(env, "prune").stdout.splitlines()
    assert out[1] == f"remote {store.description}: deleted 0, kept 1, 3 leftover objects removed"
    assert f"  removed leftover: {gone}.dump.zst" in out
    assert not any(name.startswith(gone) for name in names(store))


def test_data_objects_without_metadata_are_left_to_a_copy_in_progress_for_a_day(seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    store = seaweed.store(prefix)
    [complete] = remote_backups(store, tmp_path, [2])
    interrupted = make_backup(tmp_path / "volume", NOW - timedelta(days=3), dump_size=4096, seed=b"interrupted")  # also pending locally
    orphan = make_backup(tmp_path / "elsewhere", NOW - timedelta(days=4), dump_size=4096, seed=b"orphan")
    for metadata, directory in ((interrupted, tmp_path / "volume"), (orphan, tmp_path / "elsewhere")):
        for item in metadata["files"].values():  # a copy cut short before its metadata object
            with open(directory / item["name"], "rb") as handle:
                store.put_stream(item["name"], handle)
    config = replace(load_config(environ=offline_env(tmp_path, seaweed, prefix)), remote=seaweed.remote(prefix, retention_days=0))  # keys in files
    report = api.prune_backups(config).remote
    assert report is not None and report.error is None and report.leftovers == []  # young: maybe a copy in progress
    later = api.prune_backups(config, now=NOW + timedelta(days=2)).remote
    assert later is not None and sorted(later.leftovers) == sorted(item["name"] for item in orphan["files"].values())
    assert any(name.startswith(interrupted["id"]) for name in names(store))  # the local backup's copy is still to finish
    assert [e.id for e in remote_entries(store)] == [complete]


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Files made immutable (chattr +i: no one deletes them, not even root), released at the end."""
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root (CI runs as root)")
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_remote_backup_whose_metadata_the_store_refuses_to_delete_is_kept_by_lock_and_stays_listed_whole(
        tmp_path: Path, immutable: list[Path]) -> None:
    store = LocalStore(tmp_path / "bucket")
    metadata = make_backup(tmp_path / "source", NOW - timedelta(days=90), dump_size=4096)
    copy_backup(tmp_path / "source", metadata, store)
    locked = store.dir / (metadata["id"] + METADATA_SUFFIX)
    if subprocess.run(["chattr", "+i", str(locked)], check=False, capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    immutable.append(locked)
    deletion = delete_remote(store, metadata["id"])
    assert deletion.outcome == "kept-by-lock" and "kept by the bucket's lock" in deletion.note
    [entry] = remote_entries(store)
    assert entry.id == metadata["id"] and entry.good  # the data objects were not touched: the backup is whole


def test_pruning_a_bucket_with_object_lock_hides_the_backup_and_the_lock_keeps_its_versions(
        seaweed: SeaweedServer, prefix: str, tmp_path: Path) -> None:
    """S3 Object Lock (SeaweedFS follows S3): a delete without a version id is never refused, it adds a delete marker;
    the locked versions stay until their retention date. Prune reports the backup deleted, and the bucket keeps it."""
    until = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    writer = S3Store(LOCKED_BUCKET, prefix=prefix, endpoint=seaweed.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                     secret_access_key=SECRET_KEY, client_options={"allow_http": True, "default_headers": {
                         "x-amz-object-lock-mode": "COMPLIANCE", "x-amz-object-lock-retain-until-date": until}})
    versions: dict[str, Any] = {}
    for days in (60, 1):
        metadata = make_backup(tmp_path / "source", NOW - timedelta(days=days), dump_size=4096, seed=str(days).encode())
        for item in metadata["files"].values():
            versions[item["name"]] = obstore.put(writer, item["name"], (tmp_path / "source" / item["name"]).read_bytes())["version"]
        versions[metadata["id"] + METADATA_SUFFIX] = obstore.put(writer, metadata["id"] + METADATA_SUFFIX, metadata_bytes(metadata))["version"]
    old = format_id(NOW - timedelta(days=60))
    env = offline_env(tmp_path, seaweed, prefix, bucket=LOCKED_BUCKET)
    assert cli(env, "prune").stdout.splitlines()[1].endswith(": deleted 1, kept 1")
    assert listed(env) == [format_id(NOW - timedelta(days=1))]
    kept = obstore.get(writer, old + METADATA_SUFFIX, options={"version": versions[old + METADATA_SUFFIX]})
    assert json.loads(bytes(kept.bytes()))["id"] == old  # the lock kept the version
