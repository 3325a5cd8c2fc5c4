"""Faults, part three: SIGKILL of the sidecar at random points of a restore, swap window included."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from sidecar.embedded import Cluster
from tests.conftest import MAJORS, backup_id, cli, of_major

TRIALS = 12


@pytest.fixture(name="cluster", params=MAJORS)
def each_major(request: pytest.FixtureRequest) -> Cluster:
    """On PostgreSQL 15 and on 18 (ids pg15/pg18)."""
    return of_major(request)


def test_sigkill_during_a_restore_leaves_the_old_or_the_new_database_never_none(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 200000) g", db)
    bid = backup_id(env)
    cluster.psql("DELETE FROM t WHERE g > 100", db)  # live: 100 rows; the backup: 200000
    started = time.monotonic()
    cli(env, "restore", bid)
    full = time.monotonic() - started
    cluster.psql("DELETE FROM t WHERE g > 100", db)
    rng = random.Random(7)
    seen = set()
    for _ in range(TRIALS):
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "restore", bid], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(full * 0.5, full * 1.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        count = cluster.psql("SELECT count(*) FROM t", db)  # the live database exists, whole
        assert count in ("100", "200000"), count
        seen.add(count)
        if count == "200000":  # swapped: put the small one back for the next trial
            cluster.psql("DELETE FROM t WHERE g > 100", db)
    # the next restore drops what the killed ones left behind and succeeds
    cli(env, "restore", bid)
    assert cluster.psql("SELECT count(*) FROM t", db) == "200000"
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_restore%'") == "0"
    assert "100" in seen
    print(f"restore kill trials: {TRIALS}, live database states seen: {sorted(seen)}, full restore {full:.2f}s")


def test_sigkill_during_a_restore_into_a_new_database_never_leaves_it_partly_loaded(cluster: Cluster, db: str, env: dict[str, str]) -> None:
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 200000) g", db)
    cluster.psql("CREATE TABLE u AS SELECT g FROM generate_series(1, 200000) g", db)
    bid = backup_id(env)
    target = f"{db}_new"
    started = time.monotonic()
    cli(env, "restore", bid, "--target-db", target)
    full = time.monotonic() - started
    cluster.psql(f"DROP DATABASE {target}")
    rng = random.Random(11)
    seen = set()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "restore", bid, "--target-db", target], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(full * 0.3, full * 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{target}'") == "1":  # renamed in: whole
            assert cluster.psql("SELECT (SELECT count(*) FROM t) + (SELECT count(*) FROM u)", target) == "400000"
            cluster.psql(f"DROP DATABASE {target}")
            seen.add("whole")
        else:
            seen.add("absent")
    assert "absent" in seen
    cli(env, "restore", bid, "--target-db", target)  # drops what the killed ones left and creates it
    assert cluster.psql("SELECT (SELECT count(*) FROM t) + (SELECT count(*) FROM u)", target) == "400000"
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{target}\\_\\_restore%'") == "0"


def test_a_new_database_is_renamed_in_past_a_session_on_it_and_never_over_one_created_meanwhile(cluster: Cluster, db: str) -> None:
    """The restored copy's last step: a tool connected to every database (a monitoring agent) is ended; a database
    created under the target name during the restore is left alone, the copy dropped, one line."""
    import psycopg

    from sidecar.errors import SidecarError
    from sidecar.logical.restore import _rename_new

    scratch, target = f"{db}__restore_1", f"{db}_renamed"
    cluster.psql(f"CREATE DATABASE {scratch}")
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as admin:
        agent = psycopg.connect(cluster.url(scratch), autocommit=True)
        _rename_new(admin, scratch, target)
        with pytest.raises(psycopg.OperationalError):  # the agent's session was ended
            agent.execute("SELECT 1")
        agent.close()
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname IN ('{scratch}', '{target}')") == "1"
    assert cluster.psql("SELECT current_database()", target) == target
    cluster.psql(f"CREATE DATABASE {scratch}")
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as admin, pytest.raises(SidecarError, match="created by someone else"):
        _rename_new(admin, scratch, target)
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{scratch}'") == "0"
