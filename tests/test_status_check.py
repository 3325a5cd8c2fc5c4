"""`check`: what would stop a backup, restore or drill, found before it happens (real server, roles, volumes)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.age import generate_identity
from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli, tmpfs


def lines(output: str, kind: str) -> list[str]:
    return [line[len(kind) + 2:] for line in output.splitlines() if line.startswith(kind + ": ")]


def test_check_says_what_it_checked_and_exits_0_when_all_is_well(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t (id int); CREATE SEQUENCE s", db)
    result = cli(env, "check")
    ok = lines(result.stdout, "ok")
    assert ok[0].startswith(f"connected to database {db} on PostgreSQL ") and ok[0].endswith(" as postgres (superuser)")
    assert "postgres can read all 2 tables and sequences" in ok
    assert any(line.startswith("pg_dump ") and " can dump PostgreSQL " in line for line in ok)
    assert any(line.startswith(f"backup directory {env['BACKUP_DIR']} (does not exist yet; ") and " bytes free" in line for line in ok)
    assert not lines(result.stdout, "problem") and result.stdout.splitlines()[-1] == f"all {len(ok)} checks passed"
    assert not Path(env["BACKUP_DIR"]).exists()  # check changes nothing


def test_check_names_each_missing_right_as_the_backup_would_find_it_and_exits_1(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    role = f"r_{db}"
    cluster.psql(f"CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {db} TO {role}")
    cluster.psql(f"CREATE TABLE open (id int); CREATE TABLE secret (id int); CREATE TABLE policed (id int);"
                 f"ALTER TABLE policed ENABLE ROW LEVEL SECURITY; GRANT SELECT ON open, policed TO {role}", db)
    weak = {**env, "DATABASE_URL": cluster.url(db, user=role)}
    result = cli(weak, "check", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines(result.stdout, "problem") == [
        f"role {role} cannot read 1 of 3 tables and sequences, so pg_dump will fail: public.secret; GRANT SELECT on them "
        f"(and USAGE on their schemas), or GRANT pg_read_all_data TO {role}",
        f"1 table has row-level security and {role} neither owns it nor has BYPASSRLS, so pg_dump will refuse them: public.policed; "
        f"ALTER ROLE {role} BYPASSRLS",
        f"role {role} can neither create databases nor is it a superuser: restores and drills (which load into a new database) "
        f"will fail; ALTER ROLE {role} CREATEDB, or restore with --in-place",
        f"role {role} does not own database {db}: a restore cannot rename it to swap in the restored copy; "
        f"ALTER DATABASE {db} OWNER TO {role}, or restore with --in-place",
    ]
    assert any("backups hold the roles but not their passwords" in line for line in lines(result.stdout, "note"))
    assert result.stdout.splitlines()[-1] == "4 problems found"
    failed = cli(weak, "backup", check=False)  # what check predicted
    assert failed.returncode == 3 and "permission denied for table secret" in failed.stderr

    cluster.psql(f"GRANT SELECT ON secret TO {role}", db)
    cluster.psql(f"ALTER ROLE {role} CREATEDB BYPASSRLS; ALTER DATABASE {db} OWNER TO {role}")
    fixed = cli(weak, "check")
    assert not lines(fixed.stdout, "problem") and lines(fixed.stdout, "note")  # role passwords: a note, not a failure
    backup_id(weak)


def test_check_exits_3_when_it_cannot_connect_and_still_checks_the_rest(tmp_path: Path, env: dict[str, str]) -> None:
    result = cli({**env, "DATABASE_URL": f"postgresql://postgres@/app?host={tmp_path}&port=1"}, "check", check=False)
    assert result.returncode == 3
    [problem] = lines(result.stdout, "problem")
    assert problem.startswith("cannot connect to database 'app': ") and "check DATABASE_URL" in problem
    assert any(line.startswith("backup directory ") for line in lines(result.stdout, "ok"))
    as_json = cli({**env, "DATABASE_URL": f"postgresql://postgres@/app?host={tmp_path}&port=1"}, "check", "--json", check=False)
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and (report["ok"], report["connected"], report["problems"]) == (False, False, [problem])


def test_check_finds_an_identity_file_that_belongs_to_no_recipient(env: dict[str, str], tmp_path: Path) -> None:
    secret, public = generate_identity()
    _, other = generate_identity()
    identity = tmp_path / "key.txt"
    identity.write_text(secret + "\n")
    encrypted = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_IDENTITY_FILE": str(identity)}
    wrong = cli({**encrypted, "BACKUP_ENCRYPTION_RECIPIENTS": other}, "check", check=False)
    assert wrong.returncode == 1
    assert lines(wrong.stdout, "problem") == [
        f"identity file {identity} holds no secret key of any BACKUP_ENCRYPTION_RECIPIENTS (it is the key of {public}): "
        "new backups could not be restored with it; fix the recipients or the identity file"]
    assert secret not in wrong.stdout + wrong.stderr
    right = cli({**encrypted, "BACKUP_ENCRYPTION_RECIPIENTS": f"{other},{public}"}, "check")
    assert f"identity file {identity} holds the secret key of recipient {public}" in lines(right.stdout, "ok")


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "volume", "size=1m") as mount:
        yield mount


def test_check_finds_a_read_only_volume_and_one_too_full_for_the_next_backup(cluster: Cluster, db: str, env: dict[str, str],
                                                                              small_volume: Path) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g", db)
    on_volume = {**env, "BACKUP_DIR": str(small_volume)}
    backup_id(on_volume)
    size = sum(f.stat().st_size for f in small_volume.iterdir() if f.name.startswith("backup_") and not f.name.endswith(".json"))
    filler = small_volume / "filler"
    with open(filler, "wb") as handle:  # leave half the backup's size free
        stat = os.statvfs(small_volume)
        handle.write(b"\0" * (stat.f_bavail * stat.f_frsize - size // 2))
    nearly_full = cli(on_volume, "check", check=False)
    assert nearly_full.returncode == 1
    [problem] = lines(nearly_full.stdout, "problem")
    assert problem.startswith(f"backup directory {small_volume}: ") and f"bytes free, less than the newest backup's {size} bytes" in problem
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "oflag=append", "conv=notrunc"], capture_output=True, check=False)  # to ENOSPC
    full = cli(on_volume, "check", check=False)
    assert lines(full.stdout, "problem") == [f"backup directory {small_volume} is full (No space left on device): no backup can be "
                                             "written; grow the volume or lower the retention"]
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_volume)], check=True)
    read_only = cli(on_volume, "check", check=False)
    assert read_only.returncode == 1
    assert lines(read_only.stdout, "problem") == [f"backup directory {small_volume} is not writable (Read-only file system); mount the "
                                                  "backup volume read-write and give this user write access, or set BACKUP_DIR"]
