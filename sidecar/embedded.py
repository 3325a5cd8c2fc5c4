"""A throwaway local PostgreSQL cluster: initdb into a temp dir, Unix socket only, fsync off.

Used by the test suite and by `python -m sidecar.embedded` (the README's run command without DATABASE_URL).
As root, initdb/pg_ctl run as the `postgres` user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sidecar.postgres import base_env, find_tool

HBA = """\
local all pwuser scram-sha-256
local all all trust
"""


class Cluster:
    def __init__(self, base: Path | None = None, port: int = 5432) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pgsc-", dir=base))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.port = port
        self.user = "postgres"
        self._as_user: str | None = None
        if os.geteuid() == 0:
            self._as_user = "postgres"
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o755)

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, user=self._as_user, capture_output=True, text=True, check=False, cwd="/",
                                env=base_env())  # initdb, pg_ctl and the server: never the sidecar's secrets
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> Cluster:
        self._run([find_tool("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        (self.data / "pg_hba.conf").write_text(HBA)
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -c port={self.port}"
                   " -c fsync=off -c full_page_writes=off -c synchronous_commit=off")
        self._run([find_tool("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start"])

    def stop(self, mode: str = "immediate") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([find_tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop("fast")
        self._pg_ctl_start()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        auth = (user or self.user) + (f":{password}" if password else "")
        return f"postgresql://{auth}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def psql(self, sql: str, dbname: str = "postgres", *extra: str) -> str:
        result = subprocess.run(
            [find_tool("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(dbname), *extra],
            input=sql, capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.destroy()


SAMPLE = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers, total numeric(10,2), placed_at timestamptz DEFAULT now());
INSERT INTO customers (name, email) SELECT 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, 1000) g;
INSERT INTO orders (customer_id, total) SELECT 1 + g % 1000, (g % 977) / 3.0 FROM generate_series(1, 20000) g;
"""


def demo(daemon: bool = False) -> int:
    """Start a throwaway PostgreSQL with a sample database; take a backup, verify it and list it, or
    (daemon=True) run the daemon against it until SIGINT/SIGTERM. The cluster is removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="pg-backup-sidecar-demo-"))
    with Cluster() as cluster:
        cluster.psql("CREATE DATABASE app")
        cluster.psql(SAMPLE, "app")
        env = {**os.environ, "DATABASE_URL": cluster.url("app"), "BACKUP_DIR": os.environ.get("BACKUP_DIR", str(workdir / "backups"))}
        print(f"embedded PostgreSQL at {cluster.socket_dir} (database 'app'); backups in {env['BACKUP_DIR']}", flush=True)
        if daemon:
            env.setdefault("BACKUP_ON_START", "true")
            child = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env)
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGTERM)
                return child.wait()
        for args in (["backup", "--label", "demo"], ["verify", "latest"], ["list"]):
            print(f"$ pg-backup-sidecar {' '.join(args)}", flush=True)
            code = subprocess.run([sys.executable, "-m", "sidecar", *args], env=env, check=False).returncode
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(demo(daemon="--daemon" in sys.argv))
