"""Nothing on the volume is readable by others: files 0600 and directories 0700, or 0640/0750 with
BACKUP_GROUP_READABLE=true (a group such as Kubernetes' fsGroup reads them), whatever the umask."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.embedded import Cluster
from tests.test_daemon import Running, idle, request


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0 for this test and every process it starts: modes must not come from the umask."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def modes(root: Path) -> dict[str, str]:
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = ("dir " if path.is_dir() else "") + oct(stat.S_IMODE(path.lstat().st_mode))
    return found


@pytest.mark.parametrize(("group_readable", "file_mode", "dir_mode"), [("false", 0o600, 0o700), ("true", 0o640, 0o750)])
def test_every_file_and_directory_the_sidecar_writes_on_the_volume_has_the_configured_mode(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path,
                                                                                          open_umask: None, group_readable: str, file_mode: int,
                                                                                          dir_mode: int) -> None:
    cluster.psql("CREATE TABLE t AS SELECT generate_series(1, 100) AS id", db)
    volume = Path(env["BACKUP_DIR"])  # not there yet: the sidecar creates it
    daemon = Running({**env, "BACKUP_ON_START": "true", "BACKUP_GROUP_READABLE": group_readable}, tmp_path / "daemon.log")
    try:
        idle(daemon)  # the backup at start-up and its drill (which records `verified` in the metadata) are done
        status, restore = request(daemon.base, "/v1/restores", method="POST",
                                  body=json.dumps({"backup": "latest", "request_id": "modes", "target_db": db + "_modes"}).encode())
        assert status == 202, restore
        daemon.wait_for(lambda: request(daemon.base, f"/v1/restores/{restore['id']}")[1]["state"] == "succeeded", "the restore")
    finally:
        assert daemon.stop() == 0

    found = modes(volume)
    assert any(name.endswith(".metadata.json") for name in found) and any(name.startswith(".restores/") for name in found), found
    expected = {name: (f"dir {oct(dir_mode)}" if (volume / name).is_dir() and name != "." else oct(file_mode)) for name in found}
    expected["."] = oct(dir_mode)
    assert found == expected
