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
from tests.conftest import cli
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


def test_a_backup_brings_what_an_older_version_left_readable_to_the_configured_mode_and_follows_no_link(cluster: Cluster, db: str, env: dict[str, str],
                                                                                                        tmp_path: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT generate_series(1, 100) AS id", db)
    cli(env, "backup")
    volume = Path(env["BACKUP_DIR"])
    (volume / ".restores").mkdir(mode=0o755)
    (volume / ".restores" / "old.json").write_text("{}")
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (volume / "backup_2020-01-01T00-00-00-000Z.dump.zst").symlink_to(outside)
    for path in [*volume.iterdir(), *(volume / ".restores").iterdir()]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)  # as the previous version wrote them

    cli({**env, "BACKUP_GROUP_READABLE": "true"}, "backup")

    found = modes(volume)
    del found["."], found["backup_2020-01-01T00-00-00-000Z.dump.zst"]  # the volume's root keeps its own mode; a link is a link
    assert found == {name: ("dir 0o750" if name == ".restores" else "0o640") for name in found}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
