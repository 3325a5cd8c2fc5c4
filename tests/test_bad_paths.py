"""Every bad input gets one clear line, a non-zero exit, and leaves the database and backups untouched."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli, password_user


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ".lock"}


@pytest.fixture
def backed_up(cluster: Cluster, db: str, env: dict[str, str]) -> tuple[str, Path]:
    cluster.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat('x', 50) FROM generate_series(1, 5000) g", db)
    return backup_id(env), Path(env["BACKUP_DIR"])


def dump_path(directory: Path, bid: str) -> Path:
    meta = json.loads((directory / f"{bid}.metadata.json").read_text())
    return directory / meta["files"]["dump"]["name"]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_a_flipped_byte_fails_verify_and_restore_changes_nothing(cluster: Cluster, db: str, env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    bid, directory = backed_up
    path = dump_path(directory, bid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cluster.psql("INSERT INTO t VALUES (99999, 'after')", db)
    verify = cli(env, "verify", bid, check=False)
    assert verify.returncode == 1
    assert "does not match the recorded checksum" in verify.stdout
    restore = cli(env, "restore", bid, check=False)
    assert restore.returncode == 3
    assert "checksum" in one_line(restore.stderr) and "nothing was changed" in restore.stderr
    assert cluster.psql("SELECT count(*) FROM t", db) == "5001"
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_restore%'") == "0"


def test_a_truncated_file_is_reported_not_restored(cluster: Cluster, db: str, env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    bid, directory = backed_up
    path = dump_path(directory, bid)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    verify = cli(env, "verify", bid, check=False)
    assert verify.returncode == 1 and "BAD" in verify.stdout
    assert cli(env, "restore", bid, check=False).returncode == 3
    assert cluster.psql("SELECT count(*) FROM t", db) == "5000"


def test_missing_metadata_is_listed_and_never_restored(env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    bid, directory = backed_up
    (directory / f"{bid}.metadata.json").unlink()
    listing = json.loads(cli(env, "list", "--json").stdout)
    assert listing == [{"id": bid, "problem": f"{bid}.metadata.json is missing", "status": "missing-metadata", "timestamp": listing[0]["timestamp"]}]
    assert cli(env, "verify", bid, check=False).returncode == 1
    result = cli(env, "restore", bid, check=False)
    assert result.returncode == 3 and "missing-metadata" in one_line(result.stderr)
    pruned = cli(env, "prune", "--json")
    assert json.loads(pruned.stdout)["deleted"] == [] and dump_path_exists(directory, bid)


def dump_path_exists(directory: Path, bid: str) -> bool:
    return any(p.name.startswith(bid) for p in directory.iterdir())


@pytest.mark.parametrize("ref", ["backup_2001-01-01T00-00-00-000Z", "../../etc/passwd", "backup_2024-13-45T99-00-00-000Z", "x" * 5000, "latest\x00"])
def test_unknown_or_hostile_ids_are_usage_errors(env: dict[str, str], backed_up: tuple[str, Path], ref: str) -> None:
    bid, directory = backed_up
    before = files(directory)
    for command in ("verify", "restore"):
        result = cli(env, command, ref.replace("\x00", "\\0"), check=False)
        assert result.returncode == 2, result.stderr
        assert "list" in one_line(result.stderr)
    assert files(directory) == before


def test_unreachable_database_and_wrong_password(cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    unreachable = cli({**env, "DATABASE_URL": f"postgresql://postgres@/app?host={tmp_path}&port=1"}, "backup", check=False)
    assert unreachable.returncode == 3
    assert "cannot connect" in one_line(unreachable.stderr)
    password_user(cluster)
    wrong = cli({**env, "DATABASE_URL": cluster.url("postgres", user="pwuser", password="wrong-one-xyz")}, "backup", check=False)
    assert wrong.returncode == 3
    line = one_line(wrong.stderr)
    assert "password authentication failed" in line and "wrong-one-xyz" not in wrong.stderr
    assert not list(Path(env["BACKUP_DIR"]).glob("backup_*"))


def test_a_full_disk_removes_the_partial_and_keeps_older_backups(cluster: Cluster, db: str, env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    bid, directory = backed_up
    cluster.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(10000, 200000) g", db)
    before = files(directory)
    limit = sum(len(v) for v in before.values()) + 100_000  # room for the small globals file, not the dump

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = cli(env, "backup", check=False, preexec_fn=small_disk)
    assert result.returncode == 3
    assert "no space left" in one_line(result.stderr)
    assert files(directory) == before
    assert cli(env, "verify", bid).returncode == 0


def test_a_killed_pg_dump_fails_the_backup_and_leaves_no_partial(cluster: Cluster, db: str, env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    bid, directory = backed_up
    cluster.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(10000, 3000000) g", db)
    before = files(directory)
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env={**env, "BACKUP_COMPRESSION_LEVEL": "19"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    for _ in range(400):
        partial = [p for p in directory.glob("*.dump.zst.partial") if p.stat().st_size > 0]
        pids = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "pg_dump"], capture_output=True, text=True).stdout.split()
        if partial and pids:
            os.kill(int(pids[0]), signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    assert killed, "pg_dump was never seen writing"
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "pg_dump" in one_line(stderr) and "signal 9" in stderr
    assert files(directory) == before


def test_restore_of_an_encrypted_backup_without_identity_says_what_to_set(cluster: Cluster, env: dict[str, str], db: str) -> None:
    from sidecar.age import generate_identity

    _, public = generate_identity()
    encrypted = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public}
    bid = backup_id(encrypted)
    result = cli(encrypted, "restore", bid, check=False)
    assert result.returncode == 3 and "BACKUP_ENCRYPTION_IDENTITY_FILE" in one_line(result.stderr)
    other_secret, _ = generate_identity()
    key = Path(env["BACKUP_DIR"]).parent / "other.txt"
    key.write_text(other_secret + "\n")
    wrong = cli({**encrypted, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key)}, "restore", bid, check=False)
    assert wrong.returncode == 3 and "no identity" in one_line(wrong.stderr)
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_restore%'") == "0"


def test_a_second_operation_is_refused_while_the_lock_is_held(env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    _, directory = backed_up
    import fcntl

    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = cli(env, "backup", check=False)
    assert result.returncode == 3 and "another operation holds" in one_line(result.stderr)


def test_a_pg_dump_older_than_the_server_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    # Only one PostgreSQL version is installable here, so an old pg_dump is a stand-in script that
    # reports version 9.6 (and would fail if it were ever asked to dump).
    bin_dir = tmp_path / "oldbin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_dumpall"):
        script = bin_dir / tool
        script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'pg_dump (PostgreSQL) 9.6.24' && exit 0\nexit 99\n")
        script.chmod(0o755)
    result = cli({**env, "PG_BIN_DIR": str(bin_dir)}, "backup", check=False)
    assert result.returncode == 3
    assert "cannot dump a newer server" in one_line(result.stderr)


def test_leftovers_of_a_killed_backup_are_never_listed_and_are_cleaned(env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    bid, directory = backed_up
    (directory / "backup_2099-01-01T00-00-00-000Z.dump.zst.partial").write_bytes(b"half")
    meta = json.loads((directory / f"{bid}.metadata.json").read_text())
    interrupted = {**meta, "id": "backup_2099-01-02T00-00-00-000Z",
                   "files": {"dump": {**meta["files"]["dump"], "name": "backup_2099-01-02T00-00-00-000Z.dump.zst"}}}
    (directory / "backup_2099-01-02T00-00-00-000Z.metadata.json").write_text(json.dumps(interrupted))
    (directory / "backup_2099-01-02T00-00-00-000Z.dump.zst.partial").write_bytes(b"renamed never")
    assert [b["id"] for b in json.loads(cli(env, "list", "--json").stdout)] == [bid]
    backup_id(env)
    assert not [p for p in directory.iterdir() if p.name.startswith("backup_2099")]


def test_a_long_lived_listing_sees_every_change_to_the_volume(env: dict[str, str], backed_up: tuple[str, Path]) -> None:
    # the daemon lists through one process for months, with parsed metadata cached by (inode, mtime, size)
    from sidecar.repository import Repository

    bid, directory = backed_up
    repo = Repository(directory)
    assert [(e.id, e.status, e.metadata and e.metadata["keep"]) for e in repo.entries()] == [(bid, "ok", False)]
    cli(env, "pin", bid)
    assert repo.entries()[0].metadata["keep"] is True  # type: ignore[index]
    meta_path = directory / f"{bid}.metadata.json"
    text = meta_path.read_text()
    time.sleep(0.01)
    with open(meta_path, "r+") as handle:  # edited in place: same inode, same size
        handle.write(text.replace(f'"id": "{bid}"', '"id": "' + bid.replace("Z", "X") + '"'))
    assert repo.entries()[0].status == "unreadable-metadata"
    meta_path.write_text(text)
    assert repo.entries()[0].status == "ok"
    with open(dump_path(directory, bid), "r+b") as handle:
        handle.truncate(10)
    assert repo.entries()[0].status == "size-mismatch"
    meta_path.unlink()
    assert repo.entries()[0].status == "missing-metadata"
