"""Pure parts without I/O: config, ids, retention."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.age import generate_identity
from sidecar.config import load_config
from sidecar.errors import ConfigError, NotFound
from sidecar.repository import Entry, format_id, new_id, parse_id
from sidecar.retention import classify
from tests.conftest import cli

URL = "postgresql://app:pw@db:5432/app"


def test_the_environment_overrides_config_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("database:\n  url: postgresql://a@h/x\nbackup:\n  dir: /from/yaml\n  retention_days: 7\n  compression: gzip\n")
    config = load_config(path, {"BACKUP_RETENTION_DAYS": "90"})
    assert (config.database_name, str(config.backup_dir), config.retention_days, config.compression) == ("x", "/from/yaml", 90, "gzip")
    assert load_config(None, {"DATABASE_URL": URL}).compression == "zstd"


@pytest.mark.parametrize(("value", "expected"), [("true", "zstd"), ("false", "none"), ("zstd", "zstd"), ("gzip", "gzip"), ("GZIP", "gzip")])
def test_backup_compression_accepts_the_spec_values_and_explicit_algorithms(value: str, expected: str) -> None:
    assert load_config(None, {"DATABASE_URL": URL, "BACKUP_COMPRESSION": value}).compression == expected


def test_every_bad_key_is_reported_at_once_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"DATABASE_URL": "not a url at all ===", "BACKUP_RETENTION_DAYS": "-3", "BACKUP_COMPRESSION": "lz4",
                           "BACKUP_ENCRYPTION": "maybe", "BACKUP_ENCRYPTION_RECIPIENTS": "age1notakey"})
    problems = caught.value.problems
    assert [p.split("=")[0] for p in problems] == ["DATABASE_URL", "BACKUP_RETENTION_DAYS", "BACKUP_COMPRESSION", "BACKUP_ENCRYPTION", "BACKUP_ENCRYPTION_RECIPIENTS"]
    assert "accepted values: true, false, zstd, gzip" in problems[2]


def test_unknown_keys_and_encryption_without_recipients_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("backup:\n  retension_days: 3\nencryption:\n  enabled: true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"DATABASE_URL": URL})
    assert "backup.retension_days" in caught.value.problems[0] and "unknown key" in caught.value.problems[0]
    assert "no recipients" in caught.value.problems[1]


def test_validate_config_prints_with_the_password_masked_and_exits_2_on_errors() -> None:
    _, public = generate_identity()
    good = cli({"DATABASE_URL": URL, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public, "PATH": "/usr/bin:/bin"}, "validate-config", "--print")
    assert "pw" not in good.stdout.replace("pg", "") and "****" in good.stdout
    bad = cli({"BACKUP_RETENTION_DAYS": "soon", "PATH": "/usr/bin:/bin"}, "validate-config", check=False)
    assert bad.returncode == 2
    assert bad.stderr.count("config error:") == 2  # DATABASE_URL missing, retention not an integer


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc)))
def test_ids_round_trip_to_the_millisecond(moment: datetime) -> None:
    assert parse_id(format_id(moment)) == moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@given(st.text(max_size=60))
def test_anything_that_is_not_an_id_is_rejected(text: str) -> None:
    try:
        parsed = parse_id(text)
    except NotFound:
        return
    assert format_id(parsed) == text


def test_two_backups_in_the_same_millisecond_get_different_ids() -> None:
    now = datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=timezone.utc)
    first = new_id(now, set())
    assert first == "backup_2024-01-15T10-30-00-123Z"
    assert new_id(now, {first}) == "backup_2024-01-15T10-30-00-124Z"


def entry(moment: datetime, good: bool = True, keep: bool = False, readable: bool = True) -> Entry:
    backup_id = format_id(moment)
    if not readable:
        return Entry(backup_id, None, "unreadable-metadata", "broken")
    return Entry(backup_id, {"id": backup_id, "keep": keep}, "ok" if good else "missing-file")


NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)


def test_retention_deletes_old_backups_but_keeps_young_pinned_unreadable_and_the_newest_good() -> None:
    entries = [entry(NOW - timedelta(days=d)) for d in (1, 40, 50)] + [entry(NOW - timedelta(days=60), keep=True),
                                                                      entry(NOW - timedelta(days=70), readable=False)]
    actions = [d.action for d in classify(entries, 30, NOW)]
    assert actions == ["keep", "delete", "delete", "keep", "report"]


def test_retention_never_deletes_the_only_good_backup_however_old() -> None:
    entries = [entry(NOW - timedelta(days=400)), entry(NOW - timedelta(days=1), good=False)]
    decisions = classify(entries, 30, NOW)
    assert [(d.action, d.reason) for d in decisions] == [("keep", "younger than 30 days"), ("keep", "newest good backup")]


def test_after_a_clock_jump_back_retention_keeps_the_real_newest_backup() -> None:
    # taken a year ago by a clock a year ahead, then nothing for 40 days: the 40-day-old one is the newest data
    from_the_future, real = entry(NOW + timedelta(days=325)), entry(NOW - timedelta(days=40))
    decisions = classify([from_the_future, real], 30, NOW)
    assert [(d.entry.id, d.action, d.reason) for d in decisions] == [(from_the_future.id, "keep", "younger than 30 days"),
                                                                      (real.id, "keep", "newest good backup")]


@given(st.lists(st.tuples(st.integers(0, 10_000), st.booleans(), st.booleans(), st.booleans()), max_size=30),
       st.integers(0, 100), st.integers(-5000, 20000))
def test_retention_keeps_the_newest_good_backup_for_any_set_and_clock(spec: list[tuple[int, bool, bool, bool]], days: int, clock_offset: int) -> None:
    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    entries = list({e.id: e for e in (entry(base - timedelta(hours=h), good, keep, readable) for h, good, keep, readable in spec)}.values())
    decisions = classify(entries, days, base + timedelta(hours=clock_offset))
    deleted = {d.entry.id for d in decisions if d.action == "delete"}
    good = [e.id for e in entries if e.good]
    if good:
        assert max(good) not in deleted
    now = base + timedelta(hours=clock_offset)
    current = [e.id for e in entries if e.good and e.timestamp <= now + timedelta(minutes=5)]
    if current:  # the newest backup the clock does not call future: the real newest after a clock jump back
        assert max(current) not in deleted
    assert not any(e.id in deleted for e in entries if e.metadata is None or (e.metadata or {}).get("keep"))


def test_progress_lines_give_bytes_so_far_share_and_rate(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sidecar.streams import Progress

    caplog.set_level(logging.INFO, logger="sidecar.progress")
    progress = Progress("restore (x.dump.zst)", total=4 << 20, every=0)
    progress.add(1 << 20)
    assert "restore (x.dump.zst) in progress: 1 MiB of 4 MiB (25%)" in caplog.text and "MiB/s" in caplog.text


def test_the_daemon_remembers_the_newest_runs_only() -> None:
    from sidecar.scheduler import REMEMBERED, _forget_oldest

    records = {f"run-{i}": {"id": f"run-{i}", "request_id": f"r{i}"} for i in range(REMEMBERED + 5)}
    forgotten = _forget_oldest(records)
    assert [r["id"] for r in forgotten] == [f"run-{i}" for i in range(5)]
    assert len(records) == REMEMBERED and "run-5" in records and f"run-{REMEMBERED + 4}" in records
    assert _forget_oldest(records) == []
