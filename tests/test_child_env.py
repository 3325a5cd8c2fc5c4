"""Secrets in children: pg_dump, pg_dumpall, psql and pg_restore get only what they need.

Before, every child inherited the whole environment (DATABASE_URL with its password, the API token,
cloud credentials) and `sslpassword` stayed in the `--dbname=` argv. Now a child sees an allow-list of
variables, the password as PGPASSWORD, and the other secret connection parameters in an in-memory
libpq service file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from sidecar.embedded import Cluster
from sidecar.postgres import find_tool
from tests.conftest import PASSWORD, cli, password_user
from tests.test_daemon import TOKEN

SSL_PASSWORD = "ssl-key-passphrase-s3cr3t"
AWS_SECRET = "aws-secret-key-s3cr3t"
FORBIDDEN_VARIABLES = ("DATABASE_URL", "DATABASE_PASSWORD", "DATABASE_PASSWORD_FILE", "SIDECAR_API_TOKEN", "SIDECAR_API_TOKEN_FILE",
                       "AWS_SECRET_ACCESS_KEY", "BACKUP_ENCRYPTION_IDENTITY_FILE")


def secret_env(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The sidecar's environment with a password, an sslpassword, a token and cloud credentials in it."""
    password_user(cluster)
    cluster.psql(f'ALTER ROLE pwuser CREATEDB; ALTER DATABASE "{db}" OWNER TO pwuser')
    cluster.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100); ALTER TABLE t OWNER TO pwuser", db)
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    return {**env, "DATABASE_URL": cluster.url(db, user="pwuser", password=PASSWORD) + f"&sslpassword={SSL_PASSWORD}",
            "DATABASE_PASSWORD_FILE": str(password_file), "SIDECAR_API_TOKEN": TOKEN, "SIDECAR_API_TOKEN_FILE": str(token_file),
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "VALIDATION_ENABLED": "false"}


def environ_of(raw: bytes) -> dict[str, str]:
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def assert_nothing_secret(environ: dict[str, str], cmdline: str, what: str) -> None:
    assert not set(FORBIDDEN_VARIABLES) & set(environ), (what, sorted(environ))
    others = "\n".join(f"{k}={v}" for k, v in environ.items() if k != "PGPASSWORD")
    for secret in (PASSWORD, SSL_PASSWORD, TOKEN, AWS_SECRET):
        assert secret not in others and secret not in cmdline, (what, secret)
    assert environ.get("PGPASSWORD") in (PASSWORD, None), what


def dumping_pg_dump(parent: int) -> int | None:
    """The pg_dump that `parent` runs to dump (not the short `pg_dump --version` before it)."""
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("Name", "").strip() == "pg_dump" and fields.get("PPid", "").strip() == str(parent) \
                    and b"--snapshot=" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except (OSError, ValueError):
            continue
    return None


def test_a_running_pg_dump_sees_only_pgpassword_and_gets_sslpassword_outside_argv(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> None:
    run_env = secret_env(cluster, db, env, tmp_path)
    holder = psycopg.connect(cluster.url(db))
    holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # pg_dump waits for it, alive, until we let go
    backup = subprocess.Popen([sys.executable, "-m", "sidecar", "backup"], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (pid := dumping_pg_dump(backup.pid)) is None and time.monotonic() < deadline and backup.poll() is None:
            time.sleep(0.05)
        assert pid, backup.stderr.read() if backup.poll() is not None else "pg_dump did not start"
        proc = Path("/proc") / str(pid)
        environ = environ_of((proc / "environ").read_bytes())
        cmdline = (proc / "cmdline").read_bytes().decode().replace("\0", " ")
        service_file = (proc / "fd" / environ["PGSERVICEFILE"].rsplit("/", 1)[1]).read_text() if "PGSERVICEFILE" in environ else ""
    finally:
        holder.rollback()
        holder.close()
    out, err = backup.communicate(timeout=120)

    assert backup.returncode == 0, err
    assert_nothing_secret(environ, cmdline, "pg_dump")
    assert environ["PGPASSWORD"] == PASSWORD and "--dbname=" in cmdline
    assert f"sslpassword={SSL_PASSWORD}" in service_file.splitlines()  # read by libpq (the backup succeeded), never on disk


def test_no_pg_tool_of_a_backup_and_a_restore_sees_a_secret_in_its_environment_or_argv(cluster: Cluster, db: str, env: dict[str, str],
                                                                                        tmp_path: Path) -> None:
    run_env = secret_env(cluster, db, env, tmp_path)
    spy, bin_dir = tmp_path / "spy", tmp_path / "bin"
    spy.mkdir()
    bin_dir.mkdir()
    real = Path(find_tool("pg_dump")).parent
    for tool in ("pg_dump", "pg_dumpall", "psql", "pg_restore"):
        wrapper = bin_dir / tool  # records what the real tool is given, then becomes it
        wrapper.write_text(f'#!/bin/sh\ncat /proc/$$/environ > {spy}/{tool}.$$.environ\ncat /proc/$$/cmdline > {spy}/{tool}.$$.cmdline\n'
                           f'exec {real}/{tool} "$@"\n')
        wrapper.chmod(0o755)
    run_env["PG_BIN_DIR"] = str(bin_dir)

    cli(run_env, "backup")
    restored = json.loads(cli(run_env, "restore", "latest", "--target-db", db + "_copy", "--json").stdout)

    assert cluster.psql("SELECT count(*) FROM t", db + "_copy") == "100", restored
    seen = sorted(spy.glob("*.environ"))
    assert {p.name.split(".")[0] for p in seen} == {"pg_dump", "pg_dumpall", "psql", "pg_restore"}
    for path in seen:
        cmdline = path.with_suffix(".cmdline").read_bytes().decode().replace("\0", " ")
        assert_nothing_secret(environ_of(path.read_bytes()), cmdline, path.name)


def test_validate_config_print_masks_every_secret_connection_parameter(env: dict[str, str]) -> None:
    url = "postgresql://u:pw-s3cr3t@h/db?sslpassword=ssl-s3cr3t&oauth_client_secret=oauth-s3cr3t&sslmode=require"

    printed = cli({**env, "DATABASE_URL": url}, "validate-config", "--print")

    assert "s3cr3t" not in printed.stdout + printed.stderr
    assert "sslpassword=****" in printed.stdout and "sslmode=require" in printed.stdout


def test_an_error_naming_a_secret_parameter_masks_its_value() -> None:
    from sidecar.postgres import describe

    text = describe(ValueError("invalid connection option: password='a b' sslpassword=xyz oauth_client_secret=q host=h"))

    assert text == "invalid connection option: password=**** sslpassword=**** oauth_client_secret=**** host=h"

