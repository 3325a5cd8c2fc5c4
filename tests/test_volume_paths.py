"""Nothing outside the volume: a file name in metadata is only ever one of that backup's own files.

A tampered (or hand-edited) metadata file that names `../victim.txt`, an absolute path or another
backup's dump made prune delete that file, and restore and verify read it. Such an entry is now
listed as unreadable, reported, and never read nor deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sidecar.embedded import Cluster
from sidecar.repository import Entry, Repository
from tests.conftest import backup_id, cli
from tests.test_daemon import Running, request

OLD = "backup_2020-01-01T00-00-00-000Z"  # older than any retention period: prune wants it gone


@pytest.fixture
def volume(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> tuple[str, Path, Path]:
    """A real backup (the newest), and a file outside the volume that nothing may touch."""
    cluster.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)", db)
    victim = tmp_path / "victim.txt"
    victim.write_text("not a backup\n")
    return backup_id(env), Path(env["BACKUP_DIR"]), victim


def plant(directory: Path, source: str, dump_name: str) -> dict[str, Any]:
    """An old backup copied from `source`, its own files in place, whose metadata names `dump_name` as the dump."""
    metadata = json.loads((directory / f"{source}.metadata.json").read_text())
    for item in metadata["files"].values():
        own = item["name"].replace(source, OLD)
        shutil.copyfile(directory / item["name"], directory / own)
        item["name"] = own
    metadata.update(id=OLD, timestamp="2020-01-01T00:00:00.000Z", keep=False)
    metadata["files"]["dump"]["name"] = dump_name
    (directory / f"{OLD}.metadata.json").write_text(json.dumps(metadata))
    return metadata


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def hostile_names(victim: Path) -> dict[str, str]:
    return {
        "parent": "../victim.txt",
        "absolute": str(victim),
        "own-prefix-then-parent": f"{OLD}.dump.zst/../../victim.txt",
        "dot-dot": "..",
        "nul": f"{OLD}.dump.zst\u0000",
        "plain-not-its-own": "victim.txt",
        "its-own-metadata": f"{OLD}.metadata.json",
    }


@pytest.mark.parametrize("kind", ["parent", "absolute", "own-prefix-then-parent", "dot-dot", "nul", "plain-not-its-own", "its-own-metadata"])
def test_prune_never_deletes_a_file_that_metadata_names_outside_the_backup_and_reports_it(env: dict[str, str], volume: tuple[str, Path, Path], kind: str) -> None:
    newest, directory, victim = volume
    name = hostile_names(victim)[kind]
    plant(directory, newest, name)
    (directory / "victim.txt").write_text("a stranger's file on the volume\n")
    before = snapshot(directory.parent)

    pruned = cli(env, "prune", "--json")

    report = json.loads(pruned.stdout)
    assert report["deleted"] == [] and report["reported"] and OLD in report["reported"][0]
    assert snapshot(directory.parent) == before  # the victim, the stranger's file and every backup file are untouched
    assert "WARNING" in pruned.stderr and "not a file of this backup" in pruned.stderr
    listed = {b["id"]: b for b in json.loads(cli(env, "list", "--json").stdout)}
    assert listed[OLD]["status"] == "unreadable-metadata"
    assert "not a file of this backup" in listed[OLD]["problem"] and name[:80].replace("\u0000", "\\x00") in listed[OLD]["problem"]  # shown up to 80 characters
    assert listed[newest]["status"] == "ok"


def test_prune_never_deletes_another_backups_dump_named_in_old_metadata(env: dict[str, str], volume: tuple[str, Path, Path]) -> None:
    newest, directory, _ = volume
    real = json.loads((directory / f"{newest}.metadata.json").read_text())["files"]["dump"]
    plant(directory, newest, real["name"])  # same size and checksum: before, this entry looked good

    cli(env, "prune")

    assert (directory / real["name"]).exists()
    assert cli(env, "verify", newest).returncode == 0


def test_restore_and_verify_of_metadata_naming_another_backups_dump_read_nothing_and_change_nothing(cluster: Cluster, db: str, env: dict[str, str],
                                                                                                    volume: tuple[str, Path, Path]) -> None:
    newest, directory, _ = volume
    plant(directory, newest, json.loads((directory / f"{newest}.metadata.json").read_text())["files"]["dump"]["name"])
    cluster.psql("INSERT INTO t VALUES (1000)", db)

    verify = cli(env, "verify", OLD, check=False)
    restore = cli(env, "restore", OLD, check=False)

    assert verify.returncode == 1 and "unreadable-metadata" in verify.stdout
    assert restore.returncode == 3 and "unreadable-metadata" in restore.stderr and "Traceback" not in restore.stderr
    assert cluster.psql("SELECT count(*) FROM t", db) == "101"  # before, backup OLD restored the other backup's data
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_%'") == "0"


def test_delete_refuses_metadata_naming_a_file_outside_the_backup(volume: tuple[str, Path, Path]) -> None:
    newest, directory, victim = volume
    metadata = plant(directory, newest, "../victim.txt")
    before = snapshot(directory.parent)

    deleted = Repository(directory).delete(Entry(OLD, metadata, "ok"))  # as if a listing had let it through

    assert deleted is False and snapshot(directory.parent) == before and victim.exists()


def test_a_dump_that_is_a_symlink_out_of_the_volume_is_never_read_and_prune_removes_only_the_link(cluster: Cluster, db: str, env: dict[str, str],
                                                                                                 volume: tuple[str, Path, Path], tmp_path: Path) -> None:
    newest, directory, _ = volume
    metadata = plant(directory, newest, "")
    real = json.loads((directory / f"{newest}.metadata.json").read_text())["files"]["dump"]
    outside = tmp_path / "outside.dump"
    shutil.copyfile(directory / real["name"], outside)
    own = real["name"].replace(newest, OLD)
    metadata["files"]["dump"]["name"] = own
    (directory / f"{OLD}.metadata.json").write_text(json.dumps(metadata))
    (directory / own).unlink()
    (directory / own).symlink_to(outside)

    listed = {b["id"]: b for b in json.loads(cli(env, "list", "--json").stdout)}
    verify = cli(env, "verify", OLD, check=False)
    restore = cli(env, "restore", OLD, "--target-db", db + "_linked", check=False)
    cli(env, "prune")

    assert listed[OLD]["status"] == "missing-file" and verify.returncode == 1 and "not a regular file" in verify.stdout
    assert restore.returncode == 3 and cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{db}_linked'") == "0"
    assert outside.exists() and not (directory / own).is_symlink()


def test_restore_records_are_never_written_through_a_link_out_of_the_volume(env: dict[str, str], volume: tuple[str, Path, Path], db: str,
                                                                           tmp_path: Path) -> None:
    _, directory, _ = volume
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (directory / ".restores").symlink_to(elsewhere)
    daemon = Running(env, tmp_path / "daemon.log")
    try:
        status, restore = request(daemon.base, "/v1/restores", method="POST",
                                  body=json.dumps({"backup": "latest", "request_id": "linked", "target_db": db + "_linked"}).encode())
        assert status == 202, restore
        daemon.wait_for(lambda: request(daemon.base, f"/v1/restores/{restore['id']}")[1]["state"] == "succeeded", "the restore")
    finally:
        assert daemon.stop() == 0
    assert list(elsewhere.iterdir()) == [] and "cannot record restore" in daemon.log.read_text()
