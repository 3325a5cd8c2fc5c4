"""A backup with a volume and a remote streams each file to the store while it is written (the tee), against a real
S3 server (SeaweedFS), real PostgreSQL and the real CLI: the data is uploaded once, during the backup, and the copy
after the commit only writes the metadata object; a store killed during the backup leaves the local backup committed
and pending; memory stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, cli
from tests.storage.seaweed import SECRET_KEY, SeaweedServer


def remote_env(env: dict[str, str], server: SeaweedServer, prefix: str) -> dict[str, str]:
    # uncompressed: the dump is big enough for a multipart upload and for the tee to take a while
    return {**env, **server.environment(prefix), "DRILL_AFTER_BACKUP": "false", "BACKUP_COMPRESSION": "false", "VALIDATION_ENABLED": "false"}


def listed(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    return json.loads(cli(env, "list", "--json", *args).stdout)  # type: ignore[no-any-return]


def offsite_file(env: dict[str, str], name: str) -> dict[str, Any]:
    return json.loads((Path(env["BACKUP_DIR"]) / ".offsite" / name).read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def own_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS of this module's own, which a test kills and starts again (the session's one stays up)."""
    with SeaweedServer(tmp_path_factory.mktemp("tee-seaweed")) as server:
        yield server


def test_a_backup_with_a_remote_uploads_its_data_once_while_it_is_written_and_stays_under_100_mb(
        cluster: Cluster, db: str, env: dict[str, str], seaweed: SeaweedServer, prefix: str) -> None:
    from tests.test_memory_decode import LIMIT_MIB, measured

    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 11)::text) AS h "
                 "FROM generate_series(1, 1200000) g", db)
    env = remote_env(env, seaweed, prefix)
    uploads_before = set(seaweed.incomplete_uploads())
    backed_up, backup_mib = measured(env, "backup")
    taken = backed_up.stdout.strip().splitlines()[-1]
    assert "ERROR" not in backed_up.stderr and "WARNING" not in backed_up.stderr, backed_up.stderr
    print(f"peak RSS of a backup with its off-site copy: {backup_mib} MiB")
    assert backup_mib < LIMIT_MIB, f"peak RSS {backup_mib} MiB"

    [remote] = listed(env, "--remote")
    assert remote["id"] == taken and remote["status"] == "ok" and remote["size"] > 100 << 20
    # uploaded once: the upload counter is exactly the objects in the store (data files and metadata)
    objects = {info.name: info.size for info in seaweed.store(prefix).list("backup_")}
    assert set(objects) == {f["name"] for f in remote["files"].values()} | {taken + ".metadata.json"}
    assert offsite_file(env, "counters.json")["upload_bytes"] == {"copy": sum(objects.values())}
    # ... and while the dump was written: the copy after the commit spent less time than the uploads took
    record = offsite_file(env, taken + ".json")
    assert record["bytes"] == sum(objects.values())
    assert record["seconds"] < record["upload_seconds"], record
    assert cli(env, "verify", taken, "--remote").stdout.startswith(f"{taken}: OK")
    assert cli(env, "copy").stdout.strip() == "nothing to copy: every good backup is off-site"
    assert set(seaweed.incomplete_uploads()) <= uploads_before


def test_the_store_killed_while_a_backup_streams_to_it_leaves_the_backup_committed_and_pending_and_copy_pending_completes_it(
        cluster: Cluster, db: str, env: dict[str, str], own_seaweed: SeaweedServer, prefix: str) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 600000) g", db)
    env = remote_env(env, own_seaweed, prefix)
    before = set(own_seaweed.incomplete_uploads())
    child = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # the dump's multipart upload is under way while its file is still being written on the volume
        while not (set(own_seaweed.incomplete_uploads()) - before and list(Path(env["BACKUP_DIR"]).glob("backup_*.dump.partial"))):
            assert child.poll() is None, f"the backup ended with no upload while its dump was written: {child.stderr.read() if child.stderr else ''}"
            assert time.monotonic() < deadline, "no upload began while the dump was written"
            time.sleep(0.01)
        own_seaweed.kill()
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    taken = out.strip().splitlines()[-1]
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and taken in errors[0] and "not copied off-site" in errors[0], err
    assert "Traceback" not in err and SECRET_KEY not in err
    assert [(b["id"], b["status"]) for b in listed(env)] == [(taken, "ok")]
    assert cli(env, "verify", taken).returncode == 0
    still_down = cli(env, "copy", "pending", check=False)
    assert still_down.returncode == 3 and "1 still pending" in still_down.stderr, still_down.stderr

    own_seaweed.start()
    assert listed(env, "--remote") == []  # data objects may be there; without the metadata object no backup is listed
    assert cli(env, "copy", "pending").stdout.startswith(f"{taken}: copied off-site")
    assert [(b["id"], b["status"]) for b in listed(env, "--remote")] == [(taken, "ok")]
    assert cli(env, "verify", taken, "--remote").returncode == 0


def test_a_store_that_stops_answering_while_a_backup_streams_to_it_does_not_hold_the_backup_up(
        cluster: Cluster, db: str, env: dict[str, str], own_seaweed: SeaweedServer, prefix: str) -> None:
    """The tee gives up on a store that makes the backup wait (TEE_GRACE = 5 s, plus 5% of the time so far): the local
    backup finishes while the store is still frozen (SIGSTOP: connections accepted, nothing answered), and stays pending
    until the store is back. Before, one write waited up to 60 s for the store, and the backup with it."""
    import os
    import signal

    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 600000) g", db)
    env = remote_env(env, own_seaweed, prefix)
    child = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert own_seaweed.process is not None
    group = own_seaweed.process.pid
    frozen = False
    try:
        deadline = time.monotonic() + 120
        before = set(own_seaweed.incomplete_uploads())
        while not (set(own_seaweed.incomplete_uploads()) - before and list(Path(env["BACKUP_DIR"]).glob("backup_*.dump.partial"))):
            assert child.poll() is None, "the backup ended with no upload while its dump was written"
            assert time.monotonic() < deadline, "no upload began while the dump was written"
            time.sleep(0.01)
        os.killpg(group, signal.SIGSTOP)
        frozen = True
        # the old tee waited 60 s in one write; this one gives up after ~5 s: 45 s is far from both
        out, err = child.communicate(timeout=45)
        assert frozen, "the store is still frozen here"
    finally:
        if frozen:
            os.killpg(group, signal.SIGCONT)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    taken = out.strip().splitlines()[-1]
    assert "slower than the backup" in err and "not copied off-site" in err, err
    assert [(b["id"], b["status"]) for b in listed(env)] == [(taken, "ok")]
    assert cli(env, "copy", "pending").stdout.startswith(f"{taken}: copied off-site")
    assert [(b["id"], b["status"]) for b in listed(env, "--remote")] == [(taken, "ok")]
