"""Connections (psycopg), tool discovery and version checks, running pg tools with stderr in errors."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from functools import cache
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.conninfo import make_conninfo

from sidecar.config import Config
from sidecar.errors import SidecarError

SEARCH_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)


def find_tool(name: str, bin_dir: Path | None = None) -> str:
    """A PostgreSQL client program: PG_BIN_DIR, else the newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates = [bin_dir] if bin_dir else SEARCH_DIRS
    for directory in candidates:
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found and not bin_dir:
        return found
    where = f"in PG_BIN_DIR={bin_dir}" if bin_dir else "on PATH or in /usr/lib/postgresql/*/bin"
    raise SidecarError(f"{name} not found {where}; install the PostgreSQL client tools (apt-get install postgresql-client)")


@cache
def tool_version(path: str) -> tuple[int, str]:
    """(major, full text) of a pg tool's --version."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    match = re.search(r"\(PostgreSQL\) (\d+)(\.\d+)?", out)
    if not match:
        raise SidecarError(f"cannot tell the version of {path} ('{out}')")
    return int(match.group(1)), match.group(0).replace("(PostgreSQL) ", "").strip()


def child_env(config: Config) -> tuple[str, dict[str, str]]:
    """(conninfo without password, environment with PGPASSWORD): passwords never go into argv."""
    params = config.conninfo()
    password = params.pop("password", None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k in ("PGSSLROOTCERT",)}
    env["PGAPPNAME"] = "pg-backup-sidecar"
    if password:
        env["PGPASSWORD"] = password
    return make_conninfo(**params), env


def connect(config: Config, dbname: str | None = None, autocommit: bool = True) -> psycopg.Connection[Any]:
    params = config.conninfo()
    if dbname:
        params["dbname"] = dbname
    params.setdefault("connect_timeout", "10")
    params.setdefault("application_name", "pg-backup-sidecar")
    try:
        return psycopg.connect(make_conninfo(**params), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise SidecarError(f"cannot connect to database {params.get('dbname')!r}: {describe(exc)}; check DATABASE_URL and that the server is up") from None


def describe(exc: BaseException) -> str:
    """A one-line description of a database error that never contains the password."""
    text = " ".join(str(exc).split())
    return re.sub(r"password=\S+", "password=****", text)[:400]


PIPE_SIZE = 1 << 20


def _widen(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB lets pg_dump keep writing while we compress (measured: backup
    wall time 1.42x -> 1.15x of raw pg_dump on 2 cores; bench/RESULTS.md)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default pipe works, only slower


class Child:
    """A child process in its own process group, stderr drained into a bounded tail."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin: int | IO[bytes] | None = subprocess.DEVNULL,
                 stdout: int | IO[bytes] | None = subprocess.PIPE) -> None:
        self.name = Path(argv[0]).name
        try:
            self.proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise SidecarError(f"cannot run {argv[0]} ({exc.strerror})") from None
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                _widen(pipe.fileno())
        self._tail: deque[str] = deque(maxlen=20)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)

    def stderr_tail(self) -> str:
        self._reader.join(timeout=5)
        lines = [line for line in self._tail if not line.startswith(("WARNING:  there is no transaction", "NOTICE:"))]
        return " | ".join(lines[-4:])

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join(timeout=5)
        return code

    def check(self, what: str) -> None:
        code = self.wait()
        if code != 0:
            detail = self.stderr_tail() or f"exit code {code}"
            if code < 0:
                detail = f"killed by signal {-code}" + (f" ({detail})" if self.stderr_tail() else "")
            raise SidecarError(f"{what} failed: {self.name}: {detail}")

    def terminate(self, grace: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self._reader.join(timeout=5)


def server_info(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    row = conn.execute(
        "SELECT current_setting('server_version_num')::int, version(), current_database(),"
        " pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype"
        " FROM pg_database d WHERE d.datname = current_database()"
    ).fetchone()
    assert row is not None
    version_num, version, dbname, owner, encoding, collate, ctype = row
    return {
        "major": version_num // 10000,
        "version": " ".join(version.split()[:2]),
        "database": dbname,
        "owner": owner,
        "encoding": encoding,
        "collate": collate,
        "ctype": ctype,
    }


def check_dump_version(pg_dump: str, server_major: int) -> str:
    major, text = tool_version(pg_dump)
    if major < server_major:
        raise SidecarError(
            f"{pg_dump} is version {major} but the server is PostgreSQL {server_major}; pg_dump cannot dump a newer server, "
            f"install postgresql-client-{server_major} or set PG_BIN_DIR"
        )
    return text
