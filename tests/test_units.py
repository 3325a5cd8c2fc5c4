"""Pure parts without I/O: config, ids, retention."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.age import generate_identity
from sidecar.config import load_config
from sidecar.errors import ConfigError, NotFound
from sidecar.repository import Entry, choose_latest, format_id, new_id, parse_id
from sidecar.retention import Policy, classify
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


def test_the_retention_tiers_are_read_from_the_environment() -> None:
    config = load_config(None, {"DATABASE_URL": URL, "BACKUP_KEEP_LAST": "3", "BACKUP_KEEP_DAILY": "7", "BACKUP_KEEP_WEEKLY": "4", "BACKUP_KEEP_MONTHLY": "6"})
    assert (config.keep_last, config.keep_daily, config.keep_weekly, config.keep_monthly) == (3, 7, 4, 6)
    assert load_config(None, {"DATABASE_URL": URL}).keep_daily == 0


def test_dumps_kept_by_tiers_alone_still_let_old_base_backups_and_wal_go() -> None:
    """BACKUP_RETENTION_DAYS=0 with tiers: the base backups' days follow the daily tier (it meant 'keep all WAL' before)."""
    def days(**env: str) -> int:
        return load_config(None, {"DATABASE_URL": URL, **env}).base_backup_retention_days

    assert days(BACKUP_RETENTION_DAYS="0", BACKUP_KEEP_DAILY="10", BACKUP_KEEP_MONTHLY="12") == 10
    assert days(BACKUP_RETENTION_DAYS="0", BACKUP_KEEP_WEEKLY="4") == 7
    assert days(BACKUP_RETENTION_DAYS="0") == 0  # no rule at all: keep everything, as the dumps
    assert days(BACKUP_RETENTION_DAYS="0", BACKUP_KEEP_DAILY="10", BASE_BACKUP_RETENTION_DAYS="0") == 0  # said explicitly
    assert days() == 30 and days(BACKUP_RETENTION_DAYS="14", BACKUP_KEEP_DAILY="3") == 14


def test_validate_config_warns_about_unknown_variables_naming_the_likely_one_and_still_passes() -> None:
    env = {"DATABASE_URL": URL, "PATH": "/usr/bin:/bin", "BACKUP_RETENTION_DAY": "3", "DRILL_AFTER_BACKUPS": "false", "SIDECAR_WHATEVER": "1",
           # what Kubernetes adds for a Service named sidecar-db: not ours, not warned about
           "SIDECAR_DB_SERVICE_HOST": "10.0.0.7", "SIDECAR_DB_PORT": "tcp://10.0.0.7:9188", "SIDECAR_DB_PORT_9188_TCP_ADDR": "10.0.0.7"}
    result = cli(env, "validate-config")
    assert result.stdout == "configuration is valid\n"
    assert result.stderr.splitlines() == [
        "warning: BACKUP_RETENTION_DAY is not a pg-backup-sidecar setting and is ignored; did you mean BACKUP_RETENTION_DAYS?",
        "warning: DRILL_AFTER_BACKUPS is not a pg-backup-sidecar setting and is ignored; did you mean DRILL_AFTER_BACKUP?",
        "warning: SIDECAR_WHATEVER is not a pg-backup-sidecar setting and is ignored; see the README's configuration table",
    ]


def test_validate_config_prints_with_the_password_masked_and_exits_2_on_errors() -> None:
    _, public = generate_identity()
    good = cli({"DATABASE_URL": URL, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public, "PATH": "/usr/bin:/bin"}, "validate-config", "--print")
    assert "password=pw" not in good.stdout and ":pw@" not in good.stdout and "password=****" in good.stdout  # (a random age key may hold "pw")
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


def entry(moment: datetime, good: bool = True, keep: bool = False, readable: bool = True, drill: bool | None = None) -> Entry:
    """drill: None never drilled, True passed, False failed (the `verified` record `drill` writes)."""
    backup_id = format_id(moment)
    if not readable:
        return Entry(backup_id, None, "unreadable-metadata", "broken")
    metadata: dict[str, object] = {"id": backup_id, "keep": keep}
    if drill is not None:
        metadata["verified"] = {"at": format_id(moment + timedelta(minutes=5)), "ok": drill, "findings": [] if drill else ["t: 1 rows, backup had 2"]}
    return Entry(backup_id, metadata, "ok" if good else "missing-file")


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


DRILLS = st.sampled_from([None, True, False])


def test_latest_skips_a_newer_backup_whose_drill_failed_and_says_so() -> None:
    failed, passed, older = entry(NOW - timedelta(hours=1), drill=False), entry(NOW - timedelta(days=1), drill=True), entry(NOW - timedelta(days=2))
    chosen, note = choose_latest([failed, passed, older], NOW)
    assert chosen == passed
    assert note == (f"latest: {passed.id} (newest good backup that has not failed a restore drill, drill passed); "
                    f"skipped {failed.id} whose drill failed on {format_id(NOW - timedelta(minutes=55))}")
    chosen, note = choose_latest([passed, older], NOW)
    assert (chosen, note) == (passed, f"latest: {passed.id} (newest good backup, drill passed)")


def test_when_every_good_backup_failed_its_drill_latest_is_still_the_newest_and_says_so() -> None:
    newest, older = entry(NOW - timedelta(hours=1), drill=False), entry(NOW - timedelta(days=1), drill=False)
    chosen, note = choose_latest([newest, older, entry(NOW, good=False)], NOW)
    assert chosen == newest and "every good backup failed its drill" in note
    assert choose_latest([entry(NOW, good=False)], NOW)[0] is None


@given(st.lists(st.tuples(st.integers(0, 2000), st.booleans(), DRILLS), max_size=20), st.integers(-500, 3000))
def test_latest_is_never_a_failed_drill_while_another_good_backup_has_not_failed(spec: list[tuple[int, bool, bool | None]], clock_offset: int) -> None:
    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    entries = sorted({e.id: e for e in (entry(base - timedelta(hours=h), good, drill=d) for h, good, d in spec)}.values(), key=lambda e: e.id, reverse=True)
    now = base + timedelta(hours=clock_offset)
    chosen, note = choose_latest(entries, now)
    good = [e for e in entries if e.good]
    assert (chosen is None) == (not good)
    if chosen is None:
        return
    assert chosen.good and note.startswith(f"latest: {chosen.id} ")
    not_failed = [e for e in good if e.drill != "failed"]
    assert (chosen.drill != "failed") == bool(not_failed)
    current = [e for e in not_failed if e.timestamp <= now + timedelta(minutes=5)]
    if current:  # the newest such backup the clock does not call future
        assert chosen == current[0]
        skipped = [e for e in good if e.drill == "failed" and chosen.id < e.id <= format_id(now + timedelta(minutes=5))]
        assert all(e.id in note for e in skipped[:3])


def test_retention_keeps_the_newest_backup_whose_drill_passed_even_when_it_is_old() -> None:
    failed, passed = entry(NOW - timedelta(days=1), drill=False), entry(NOW - timedelta(days=40), drill=True)
    decisions = classify([failed, passed, entry(NOW - timedelta(days=50), drill=True)], 30, NOW)
    assert [(d.action, d.reason) for d in decisions] == [("keep", "newest good backup; younger than 30 days"),
                                                        ("keep", "newest backup whose restore drill passed"),
                                                        ("delete", "older than 30 days")]


def daily_backups(first: datetime, last: datetime, hour: int = 2) -> list[Entry]:
    days = (last - first).days
    return [entry(first + timedelta(days=d, hours=hour)) for d in range(days, -1, -1)]


def test_tiers_keep_the_newest_backup_of_the_last_days_iso_weeks_and_months() -> None:
    entries = daily_backups(datetime(2025, 3, 1, tzinfo=timezone.utc), datetime(2025, 6, 1, tzinfo=timezone.utc))
    decisions = classify(entries, Policy(days=0, daily=3, weekly=2, monthly=3), datetime(2025, 6, 1, 12, tzinfo=timezone.utc))
    kept = {d.entry.timestamp.strftime("%m-%d"): d.reason for d in decisions if d.action == "keep"}
    assert kept == {
        "06-01": "newest good backup; daily (2025-06-01); weekly (2025-W22); monthly (2025-06)",
        "05-31": "daily (2025-05-31); monthly (2025-05)",
        "05-30": "daily (2025-05-30)",
        "05-25": "weekly (2025-W21)",  # Sunday, the end of ISO week 21
        "04-30": "monthly (2025-04)",
    }
    assert {d.reason for d in decisions if d.action == "delete"} == {
        "not the daily backup kept for its period, not the weekly backup kept for its period, not the monthly backup kept for its period"}


def test_keep_last_and_days_are_a_union() -> None:
    entries = daily_backups(datetime(2025, 5, 1, tzinfo=timezone.utc), datetime(2025, 6, 1, tzinfo=timezone.utc))
    now = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)
    kept = [d for d in classify(entries, Policy(days=3, last=5), now) if d.action == "keep"]
    assert [d.reason for d in kept] == ["newest good backup; one of the last 5 good backups; younger than 3 days"] + \
        ["one of the last 5 good backups; younger than 3 days"] * 2 + ["one of the last 5 good backups"] * 2
    assert all(d.action == "keep" and d.reason == "retention disabled" for d in classify(entries, Policy(days=0), now)[1:])


def test_tier_periods_follow_the_schedule_time_zone() -> None:
    # 21:00 and 22:30 UTC on May 31 are 23:00 on May 31 and 00:30 on June 1 in Berlin (UTC+2)
    late, early = entry(datetime(2025, 5, 31, 22, 30, tzinfo=timezone.utc)), entry(datetime(2025, 5, 31, 21, tzinfo=timezone.utc))
    now = datetime(2025, 6, 10, tzinfo=timezone.utc)
    assert [d.action for d in classify([late, early], Policy(days=0, daily=2), now)] == ["keep", "delete"]
    assert [d.action for d in classify([late, early], Policy(days=0, daily=2, timezone="Europe/Berlin"), now)] == ["keep", "keep"]


def test_a_tier_keeps_the_newest_backup_of_its_day_that_has_not_failed_a_drill() -> None:
    evening, noon, morning = (entry(datetime(2025, 5, 20, h, tzinfo=timezone.utc), drill=d) for h, d in ((20, False), (12, None), (8, True)))
    decisions = classify([entry(NOW), evening, noon, morning], Policy(days=0, daily=2), NOW)
    assert [(d.entry.id, d.action) for d in decisions][1:] == [(evening.id, "delete"), (noon.id, "keep"), (morning.id, "keep")]
    assert decisions[3].reason == "newest backup whose restore drill passed"


MOSTLY_TRUE, MOSTLY_FALSE = st.sampled_from([True, True, True, False]), st.sampled_from([False, False, False, True])
ZONES = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Pacific/Kiritimati"])


# backups within 100 days (several a day, weeks and months apart), every rule, several time zones and clocks
@settings(max_examples=200)
@example([(0, True, False, True, True), (50, True, False, True, False), (60, True, False, True, None)], (0, 0, 2, 0, 0), "UTC", 0)
@given(st.lists(st.tuples(st.integers(0, 24 * 100), MOSTLY_TRUE, MOSTLY_FALSE, MOSTLY_TRUE, DRILLS), max_size=40),
       st.tuples(st.integers(0, 60), st.integers(0, 5), st.integers(0, 10), st.integers(0, 6), st.integers(0, 4)), ZONES,
       st.integers(-500, 24 * 60))
def test_retention_with_tiers_keeps_exactly_what_the_rules_keep_and_is_idempotent(
        spec: list[tuple[int, bool, bool, bool, bool | None]], rules: tuple[int, int, int, int, int], zone: str, clock_offset: int) -> None:
    from zoneinfo import ZoneInfo

    base = datetime(2030, 1, 1, tzinfo=timezone.utc)
    entries = list({e.id: e for e in (entry(base - timedelta(hours=h), good, keep, readable, d) for h, good, keep, readable, d in spec)}.values())
    days, last, daily, weekly, monthly = rules
    policy = Policy(days, last, daily, weekly, monthly, zone)
    now = base + timedelta(hours=clock_offset)
    decisions = classify(entries, policy, now)
    kept = {d.entry.id for d in decisions if d.action != "delete"}
    deleted = {d.entry.id for d in decisions if d.action == "delete"}
    assert kept | deleted == {e.id for e in entries} and not kept & deleted
    good = sorted((e for e in entries if e.good), key=lambda e: e.id, reverse=True)
    current = [e for e in good if e.timestamp <= now + timedelta(minutes=5)]
    must_keep = {e.id for e in entries if e.metadata is None or (e.metadata or {}).get("keep")}  # unreadable, pinned
    must_keep |= {e.id for e in (current or good)[:1]}  # the newest good backup
    must_keep |= {e.id for e in [e for e in current + [e for e in good if e not in current] if e.drill == "passed"][:1]}  # ... whose drill passed
    if days:
        must_keep |= {e.id for e in entries if e.metadata is not None and e.timestamp >= now - timedelta(days=days)}
    must_keep |= {e.id for e in good[:last]}
    for count, period in ((daily, "%Y-%m-%d"), (weekly, "%G-W%V"), (monthly, "%Y-%m")):
        periods: dict[str, list[Entry]] = {}
        for e in good:
            periods.setdefault(e.timestamp.astimezone(ZoneInfo(zone)).strftime(period), []).append(e)
        for key in sorted(periods, reverse=True)[:count]:
            must_keep.add(next((e for e in periods[key] if e.drill != "failed"), periods[key][0]).id)
    if not any(rules):
        must_keep = {e.id for e in entries}
    assert kept == must_keep  # exactly what the rules keep: their union, nothing more
    survivors = [e for e in entries if e.id in kept]
    assert not [d for d in classify(survivors, policy, now) if d.action == "delete"]  # pruning again deletes nothing more


def test_progress_lines_give_bytes_so_far_share_and_rate(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sidecar.streams import Progress

    caplog.set_level(logging.INFO, logger="sidecar.progress")
    progress = Progress("restore (x.dump.zst)", total=4 << 20, every=0)
    progress.add(1 << 20)
    assert "restore (x.dump.zst) in progress: 1 MiB of 4 MiB (25%)" in caplog.text and "MiB/s" in caplog.text


def test_the_daemon_remembers_the_newest_runs_only() -> None:
    from sidecar.daemon.scheduler import REMEMBERED, _forget_oldest

    records = {f"run-{i}": {"id": f"run-{i}", "request_id": f"r{i}"} for i in range(REMEMBERED + 5)}
    forgotten = _forget_oldest(records)
    assert [r["id"] for r in forgotten] == [f"run-{i}" for i in range(5)]
    assert len(records) == REMEMBERED and "run-5" in records and f"run-{REMEMBERED + 4}" in records
    assert _forget_oldest(records) == []


def test_a_read_ahead_hands_over_the_source_in_order_with_bounded_memory_and_its_failure_to_every_later_read() -> None:
    import io
    import threading
    import time

    from sidecar.streams import CHUNK_SIZE, Prefetch

    data = bytes(range(256)) * 40_000  # about 10 MiB
    with Prefetch(io.BytesIO(data)) as ahead:
        out = []
        while chunk := ahead.read(CHUNK_SIZE):
            out.append(chunk)
    assert b"".join(out) == data

    class Endless:  # a source faster than its reader: read ahead at most `depth` reads
        reads = 0

        def read(self, size: int = -1) -> bytes:
            self.reads += 1
            return b"x" * size

    source = Endless()
    ahead = Prefetch(source, depth=3)
    time.sleep(0.3)
    assert source.reads <= 3 + 1  # three queued, one waiting to be
    ahead.close()
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]  # stopped, though the source never ended

    class Failing:
        def read(self, size: int = -1) -> bytes:
            raise OSError("pipe broke")

    failing = Prefetch(Failing())
    for _ in range(2):  # never mistaken for the end of the stream
        with pytest.raises(OSError, match="pipe broke"):
            failing.read()
    failing.close()
