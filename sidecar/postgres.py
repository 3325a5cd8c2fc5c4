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

from sidecar.config import SECRET_PARAMETERS, Config
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
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False, env=base_env()).stdout.strip()
    match = re.search(r"\(PostgreSQL\) (\d+)(\.\d+)?", out)
    if not match:
        raise SidecarError(f"cannot tell the version of {path} ('{out}')")
    return int(match.group(1)), match.group(0).replace("(PostgreSQL) ", "").strip()


# What a pg tool sees of our environment (an allow-list): where programs and home are, locale and time
# zone, and libpq's own non-secret variables. Never DATABASE_URL, DATABASE_PASSWORD(_FILE), the API
# token, cloud credentials or anything else the sidecar was given.
PASSED_VARIABLES = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "KRB5CCNAME", "KRB5_CONFIG",
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS",
    "PGCONNECT_TIMEOUT", "PGCLIENTENCODING", "PGCHANNELBINDING", "PGREQUIREAUTH", "PGREQUIREPEER", "PGTARGETSESSIONATTRS",
    "PGLOADBALANCEHOSTS", "PGSSLMODE", "PGSSLNEGOTIATION", "PGSSLCOMPRESSION", "PGSSLCERT", "PGSSLKEY", "PGSSLCERTMODE",
    "PGSSLROOTCERT", "PGSSLCRL", "PGSSLCRLDIR", "PGSSLSNI", "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION",
    "PGMINPROTOCOLVERSION", "PGMAXPROTOCOLVERSION", "PGGSSENCMODE", "PGKRBSRVNAME", "PGGSSLIB", "PGGSSDELEGATION",
    "PGSYSCONFDIR", "PGLOCALEDIR", "PGTZ", "PGDATESTYLE", "PGGEQO",
})
SERVICE_NAME = "pg-backup-sidecar"


def base_env() -> dict[str, str]:
    """The allow-listed part of our environment, for any pg tool."""
    return {k: v for k, v in os.environ.items() if k in PASSED_VARIABLES or k.startswith("LC_")}


def child_env(config: Config) -> tuple[str, dict[str, str]]:
    """(conninfo for --dbname=, environment) for a pg tool: secrets never go into argv.

    The password goes in PGPASSWORD. libpq has no environment variable for the other secret parameters
    (sslpassword, oauth_client_secret, SCRAM keys): they go in a libpq service file that exists only in
    memory (a memfd, readable through /proc/self/fd by the child that inherits it, by no one else, and
    gone with the processes), named by PGSERVICEFILE and PGSERVICE."""
    params = config.conninfo()
    secrets = {key: params.pop(key) for key in SECRET_PARAMETERS if params.get(key)}
    env = base_env()
    env["PGAPPNAME"] = "pg-backup-sidecar"
    if "password" in secrets:
        env["PGPASSWORD"] = secrets.pop("password")
    if secrets:
        if params.get("service") or env.get("PGSERVICE"):
            raise SidecarError(f"{', '.join(secrets)} in DATABASE_URL cannot be combined with a libpq service (service=, PGSERVICE); "
                               "put it in the service file instead")
        env["PGSERVICEFILE"] = _service_file(secrets)
        env["PGSERVICE"] = SERVICE_NAME
    return make_conninfo(**params), env


# service files by content, each an open memfd kept for the life of this process (a few per operation)
_service_files: dict[str, int] = {}


def _service_file(secrets: dict[str, str]) -> str:
    """A libpq service file holding `secrets`, in memory only; its path for PGSERVICEFILE."""
    for key, value in secrets.items():
        if value != value.strip() or "\n" in value or "\r" in value:
            raise SidecarError(f"{key} in DATABASE_URL has leading or trailing blanks or a line break, which libpq cannot read from a service file")
    content = f"[{SERVICE_NAME}]\n" + "".join(f"{key}={value}\n" for key, value in sorted(secrets.items()))
    if content not in _service_files:
        fd = os.memfd_create(SERVICE_NAME, os.MFD_CLOEXEC)
        os.write(fd, content.encode())
        _service_files[content] = fd
    return f"/proc/self/fd/{_service_files[content]}"


def _inherited_fds(env: dict[str, str]) -> tuple[int, ...]:
    """The memfd a child's PGSERVICEFILE names, which it must inherit."""
    path = env.get("PGSERVICEFILE", "")
    return tuple(fd for fd in _service_files.values() if path == f"/proc/self/fd/{fd}")


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


SECRET_IN_TEXT = re.compile(r"\b(" + "|".join(SECRET_PARAMETERS) + r")(\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def describe(exc: BaseException) -> str:
    """A one-line description of a database error that never contains a secret connection parameter."""
    text = " ".join(str(exc).split())
    return SECRET_IN_TEXT.sub(r"\1\2****", text)[:400]


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
                 stdout: int | IO[bytes] | None = subprocess.PIPE, pass_fds: tuple[int, ...] = ()) -> None:
        self.name = Path(argv[0]).name
        try:
            self.proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, start_new_session=True,
                                         pass_fds=_inherited_fds(env) + pass_fds)
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
