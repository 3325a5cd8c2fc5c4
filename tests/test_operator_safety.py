"""Issue 11: empty or missing arguments never do the dangerous thing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sidecar import api
from sidecar.config import load_config
from sidecar.embedded import Cluster
from sidecar.errors import UsageError
from tests.conftest import backup_id, cli


def test_an_empty_target_db_is_a_usage_error_and_never_the_live_database(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)", db)
    backup_id(env)
    cluster.psql("INSERT INTO t VALUES (2)", db)
    for args in (["restore", "latest", "--target-db", ""], ["restore", "latest", "--target-db", "  "], ["restore", ""], ["drill", ""],
                 ["verify", ""], ["backup", "--label", ""]):
        out = cli(env, *args, check=False)
        assert out.returncode == 2 and "is empty" in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
    with pytest.raises(UsageError):
        api.restore_backup("latest", load_config(None, env), target_db="")
    assert cluster.psql("SELECT count(*) FROM t", db) == "2"  # the live database was never restored over


def test_restore_options_without_an_id_are_a_usage_error_and_a_bare_restore_lists(env: dict[str, str]) -> None:
    for args in (["--target-db", "foo"], ["--in-place"], ["--force"]):
        out = cli(env, "restore", *args, check=False)
        assert out.returncode == 2 and "need a backup id" in out.stderr, out
    bare = cli(env, "restore")
    assert bare.returncode == 0 and "no backups yet" in bare.stdout


def test_a_drill_of_an_encrypted_backup_without_the_secret_key_verifies_checksums_and_says_so(cluster: Cluster, db: str, env: dict[str, str],
                                                                                              tmp_path: Path) -> None:
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    sealed = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public}  # the secret key lives elsewhere
    cluster.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)", db)
    bid = backup_id(sealed)
    out = cli(sealed, "drill", bid, check=False)
    assert out.returncode == 0 and "SKIPPED" in out.stdout and "checksums were verified" in out.stdout
    verified = json.loads((Path(env["BACKUP_DIR"]) / f"{bid}.metadata.json").read_text())["verified"]
    assert verified["ok"] is None and verified["skipped"] and verified["findings"] == []
    dump = next(p for p in Path(env["BACKUP_DIR"]).iterdir() if p.name.startswith(bid) and ".dump" in p.name)
    with open(dump, "r+b") as handle:  # a flipped byte is still found without the key
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 1]))
    bad = cli(sealed, "drill", bid, check=False)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "sha256" in bad.stdout
