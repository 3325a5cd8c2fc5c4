"""Pure parts of point-in-time recovery: WAL names and LSNs, gaps, targets, which base backup a restore starts from,
and the tar parser on a stream cut into odd pieces."""

from __future__ import annotations

import io
import os
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.embedded import Cluster
from sidecar.errors import NotFound, UsageError
from sidecar.physical import tar
from sidecar.physical.base import BaseBackup
from sidecar.physical.pitr import Target, choose_base, parse_target
from sidecar.physical.wal import format_lsn, gaps, parse_lsn, parse_segment, segment_name, segment_of


@pytest.mark.parametrize("size", [1 << 20, 16 << 20, 1 << 30])
def test_segment_names_follow_postgresql_across_a_log_id(size: int) -> None:
    per = 0x100000000 // size
    assert segment_name(1, per - 1, size) == f"00000001{0:08X}{per - 1:08X}"
    assert segment_name(3, per, size) == "000000030000000100000000"
    for segno in (0, 1, per - 1, per, 5 * per + 7):
        assert parse_segment(segment_name(2, segno, size), size) == (2, segno)


def test_lsns_parse_and_map_to_their_segment() -> None:
    assert parse_lsn("0/3000028") == 0x3000028 and format_lsn(0x1_0000_0028) == "1/28"
    assert segment_name(1, segment_of(parse_lsn("0/700100"), 1 << 20), 1 << 20) == "000000010000000000000007"
    with pytest.raises(ValueError):
        parse_lsn("0-3000028")


def test_gaps_are_the_missing_runs() -> None:
    assert gaps([1, 2, 3]) == [] and gaps([]) == []
    assert gaps([1, 3, 4, 9]) == [(2, 2), (5, 8)]


def test_a_target_is_exactly_one_of_time_lsn_latest_and_a_time_needs_a_zone() -> None:
    assert parse_target("2026-11-26T14:32:05Z", None, False).time == datetime(2026, 11, 26, 14, 32, 5, tzinfo=UTC)
    assert parse_target("2026-11-26T15:32:05+01:00", None, False).time == datetime(2026, 11, 26, 14, 32, 5, tzinfo=UTC)
    assert parse_target(None, "0/3000028", False).lsn == 0x3000028
    assert parse_target(None, None, True).kind == "latest"
    for args in [(None, None, False), ("2026-11-26T14:32:05Z", None, True)]:
        with pytest.raises(UsageError, match="exactly one"):
            parse_target(*args)
    with pytest.raises(UsageError, match="time zone"):
        parse_target("2026-11-26T14:32:05", None, False)
    with pytest.raises(UsageError, match="not a time"):
        parse_target("yesterday", None, False)


def _base(backup_id: str, finished: str, end_lsn: str, status: str = "ok") -> BaseBackup:
    return BaseBackup(backup_id, status, "", {"id": backup_id, "finishedAt": finished, "endLsn": end_lsn})


def test_a_restore_starts_from_the_newest_good_base_backup_that_ends_before_the_target() -> None:
    backups = [_base("c", "2026-11-26T12:00:00.000Z", "0/9000000", "waiting-for-wal"),
               _base("b", "2026-11-26T10:00:00.000Z", "0/5000000"),
               _base("a", "2026-11-26T08:00:00.000Z", "0/3000000")]
    assert choose_base(backups, Target("latest")).id == "b"
    assert choose_base(backups, parse_target("2026-11-26T11:00:00Z", None, False)).id == "b"
    assert choose_base(backups, parse_target("2026-11-26T09:00:00Z", None, False)).id == "a"
    assert choose_base(backups, parse_target(None, "0/4000000", False)).id == "a"
    with pytest.raises(NotFound, match="no base backup ends before time 2026-11-26T07:00:00.000Z"):
        choose_base(backups, parse_target("2026-11-26T07:00:00Z", None, False))
    with pytest.raises(NotFound, match="c waits for WAL"):
        choose_base(backups[:1], Target("latest"))


class _Seen:
    def __init__(self) -> None:
        self.members: list[tuple[str, str, bytes]] = []

    def begin(self, member: tar.Member) -> None:
        self.members.append((member.name, member.kind, b""))

    def data(self, chunk: bytes) -> None:
        name, kind, data = self.members[-1]
        self.members[-1] = (name, kind, data + chunk)

    def end(self) -> None:
        pass


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("base")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        for name, data in files.items():
            item = tarfile.TarInfo(name)
            item.size = len(data)
            archive.addfile(item, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("piece", [1, 7, 511, 512, 513, 1 << 20])
def test_the_tar_parser_sees_every_member_whatever_the_pieces(piece: int) -> None:
    files = {"base/1/1259": bytes(range(256)) * 40, "PG_VERSION": b"15\n", "empty": b"", "backup_manifest": b"{}"}
    stream = _tar(files)
    seen = _Seen()
    parser = tar.TarParser(seen)
    for at in range(0, len(stream), piece):
        parser.write(stream[at:at + piece])
    parser.close()
    assert seen.members == [("base", "dir", b"")] + [(n, "file", d) for n, d in files.items()]


def test_a_truncated_or_damaged_tar_stream_is_an_error() -> None:
    stream = _tar({"PG_VERSION": b"15\n"})
    parser = tar.TarParser(_Seen())
    parser.write(stream[:700])
    with pytest.raises(tar.TarError, match="truncated"):
        parser.close()
    damaged = bytearray(stream)
    damaged[10] ^= 1
    with pytest.raises(tar.TarError, match="checksum"):
        tar.TarParser(_Seen()).write(bytes(damaged))


def test_a_wal_segment_whose_off_site_copy_conflicted_is_not_counted_as_off_site(tmp_path: Path) -> None:
    """Another object under a segment's name is an alarm, not a copy: retention must keep that segment on the volume."""
    import json

    from sidecar.config import load_config
    from sidecar.physical.offsite import STATE, copied_marks

    env = {"DATABASE_URL": "postgresql://u@h/db", "BACKUP_DIR": str(tmp_path), "BACKUP_REMOTE_URL": "s3://bucket/p",
           "BACKUP_REMOTE_ENDPOINT": "http://127.0.0.1:9", "BACKUP_REMOTE_ALLOW_HTTP": "true"}
    config = load_config(None, env)
    assert config.remote is not None
    system = tmp_path / "wal" / "7"
    system.mkdir(parents=True)
    (system / "segment_size").write_text(f"{1 << 20}\n")
    state = {"url": config.remote.url, "endpoint": config.remote.endpoint, "copied": {"00000001": 10, "00000002": 12},
             "conflicts": ["000000010000000000000005", "00000002.history"], "history": []}
    (system / STATE).write_text(json.dumps(state))
    _, marks = copied_marks(config)
    assert marks == {("7", 1): 4, ("7", 2): 12}


def test_a_point_in_time_restore_refuses_database_rather_than_ignoring_it(tmp_path: Path) -> None:
    from tests.conftest import cli

    env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://u@h/db", "BACKUP_DIR": str(tmp_path / "b"),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = cli(env, "restore", "--to-latest", "--target-db", "copy", "--database", "billing", check=False)
    assert result.returncode == 2 and "leave out the backup id, --database" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_retention_keeps_every_base_backup_a_kept_incremental_builds_on_and_drops_a_chain_whole() -> None:
    from sidecar.retention import BaseFacts, classify_base, wal_cutoffs

    now = datetime(2026, 3, 30, tzinfo=UTC)

    def facts(backup_id: str, day: int, parent: str = "") -> BaseFacts:
        return BaseFacts(backup_id, "ok", datetime(2026, 3, day, tzinfo=UTC), "7", day, parent=parent)

    # an old chain (full 1, incrementals 2 and 3); a newer one (full 20, incrementals 24, 27, 29); 5-day retention: 24 is
    # the newest good one from before the window, and it needs 20
    backups = [facts("backup_01", 1), facts("backup_02", 2, "backup_01"), facts("backup_03", 3, "backup_02"), facts("backup_20", 20),
               facts("backup_24", 24, "backup_20"), facts("backup_27", 27, "backup_24"), facts("backup_29", 29, "backup_27")]
    actions = {d.id: (d.action, d.reason) for d in classify_base(backups, 5, now)}
    assert [actions[i][0] for i in ("backup_29", "backup_27", "backup_24")] == ["keep"] * 3
    assert actions["backup_20"] == ("keep", "incremental backup_24 builds on it (a chain is kept whole)")
    assert [actions[i][0] for i in ("backup_01", "backup_02", "backup_03")] == ["delete"] * 3
    assert wal_cutoffs(backups, classify_base(backups, 5, now)) == {"7": 20}


def _record_outcomes(backup_dir: str, ok: bool, times: int) -> None:
    from sidecar.config import load_config
    from sidecar.physical.drill import PitrDrillReport, record

    config = load_config(None, {"DATABASE_URL": "postgresql://u@localhost/db", "BACKUP_DIR": backup_dir})
    for _ in range(times):
        record(config, PitrDrillReport(ok=ok, at="2026-11-27T00:00:00Z"))


def test_two_pitr_drills_ending_at_once_both_count_in_the_record(tmp_path: Path) -> None:
    """A hand-run `drill --pitr` beside the daemon's: each outcome is counted (the record is read and written under a lock)."""
    import multiprocessing

    from sidecar.physical.drill import read_record

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_outcomes, args=(str(tmp_path), ok, 150)) for ok in (True, False)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    data = read_record(tmp_path)
    assert (data["passed"], data["failed"]) == (150, 150)
    assert oct((tmp_path / "wal" / ".pitr-drill.lock").stat().st_mode & 0o777) == "0o600"


def test_a_pitr_drill_keeps_writers_waiting_at_most_its_lock_timeout_for_all_tables_together(cluster: Cluster, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tables, each written by a transaction that ends 2.5 s after the other: waiting for each in turn (3 s each) would
    hold the first table's writers for 5 s; the drill gives up after 3 s for both and tries again later."""
    import threading

    import psycopg

    from sidecar.config import load_config
    from sidecar.physical import drill

    cluster.psql("CREATE TABLE w1 (i int); CREATE TABLE w2 (i int)", db)
    config = load_config(None, {"DATABASE_URL": cluster.url(db), "BACKUP_DIR": "/nonexistent"})
    monkeypatch.setattr(drill, "LOCK_TIMEOUT", "3s")
    writers = [psycopg.connect(cluster.url(db)) for _ in range(2)]
    for table, conn in zip(("w1", "w2"), writers, strict=True):
        conn.execute(f"INSERT INTO {table} VALUES (1)")  # open transactions holding ROW EXCLUSIVE
    timers = [threading.Timer(seconds, conn.commit) for seconds, conn in zip((2.5, 5.0), writers, strict=True)]
    for timer in timers:
        timer.start()
    try:
        with pytest.raises((psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)):
            drill._capture_once(config, "unit_drill_point", [db])
    finally:
        for timer in timers:
            timer.join()
        for conn in writers:
            conn.close()
