"""What a restore request may ask for (sidecar/daemon/restores.py) and how the daemon hands it to its `restore` child:
pure functions, checked through the CLI's own argument parser."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.cli import parser
from sidecar.daemon.restores import check
from sidecar.daemon.scheduler import restore_args
from sidecar.errors import UsageError
from tests.conftest import cli
from tests.test_helm import render

RECORDS: list[dict[str, Any]] = [
    {"backup": "latest", "target": None, "target_db": None, "database": None, "from_remote": False},
    {"backup": "backup_2024-01-15T10-30-00-000Z", "target": None, "target_db": None, "database": "billing", "from_remote": True},
    {"backup": None, "target": {"to_time": "2026-11-26T14:32:05Z", "exclusive": True, "timeline": "2"}, "target_db": "app_then",
     "database": None, "from_remote": False},
    {"backup": None, "target": {"to_xid": "1234567"}, "target_db": "app", "database": None, "from_remote": False},
    {"backup": None, "target": {"to_latest": True}, "target_db": "app_then", "database": None, "from_remote": True},
    {"backup": None, "target": {"to_restore_point": "before migration"}, "target_db": "x", "database": None, "from_remote": False},
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: str(r["backup"] or r["target"]))
def test_the_daemon_asks_its_restore_child_for_exactly_what_the_request_asked(record: dict[str, Any]) -> None:
    parsed = parser().parse_args([*restore_args(record), "--json"])
    assert parsed.command == "restore" and parsed.json
    assert parsed.id == record["backup"] and parsed.target_db == record["target_db"] and parsed.database == record["database"]
    assert parsed.from_remote == record["from_remote"]
    target = record["target"] or {}
    for key in ("to_time", "to_lsn", "to_restore_point", "to_xid", "timeline"):
        assert getattr(parsed, key) == target.get(key)
    assert parsed.to_latest == bool(target.get("to_latest")) and parsed.exclusive == bool(target.get("exclusive"))


@pytest.mark.parametrize(("backup", "target", "target_db", "database", "from_remote", "api_words", "cli_words"), [
    ("latest", {"to_time": "2026-11-26T14:32:05Z"}, "x", None, False, "backup 'latest' and to_time", "a backup id 'latest' and --to-time"),
    (None, {}, None, None, False, "give backup (a backup id or latest), or a point-in-time target: to_time", "give a backup id (or latest)"),
    (None, {"to_time": "2026-11-26 14:32"}, "x", None, False, "to_time '2026-11-26 14:32' has no time zone", "--to-time '2026-11-26 14:32' has no"),
    (None, {"to_restore_point": "p", "exclusive": True}, "x", None, False, "exclusive stops just before", "--exclusive stops just before"),
    (None, {"to_latest": True}, None, None, False, "add target_db", "add --target-db"),
    ("latest", {}, "x", "shop", False, "leave out target_db", "leave out --target-db"),
])
def test_a_request_the_sidecar_cannot_take_is_one_line_in_the_api_s_terms_and_the_cli_s(backup: str | None, target: dict[str, Any],
                                                                                        target_db: str | None, database: str | None,
                                                                                        from_remote: bool, api_words: str, cli_words: str) -> None:
    for api_terms, words in ((True, api_words), (False, cli_words)):
        with pytest.raises(UsageError) as refused:
            check(backup, target, target_db, database, from_remote, api_terms=api_terms)
        assert words in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
        assert ("--" in str(refused.value)) != api_terms


def test_restore_job_prints_the_charts_point_in_time_job() -> None:
    import yaml

    out = cli({"PATH": "/usr/bin:/bin"}, "restore-job", "--to-xid", "1234567", "--exclusive", "--target-db", "app_then", "--request-id", "r1",
              "--release", "rel", "--namespace", "db")
    job = yaml.safe_load(out.stdout)
    [charts] = [d for d in render({"restore": {"enabled": True, "requestId": "r1", "toXid": 1234567, "exclusive": True, "targetDb": "app_then"}})
                if d["kind"] == "Job"]
    assert job["metadata"]["name"] == charts["metadata"]["name"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == charts["spec"]["template"]["spec"]["containers"][0]["args"]
    refused = cli({"PATH": "/usr/bin:/bin"}, "restore-job", "latest", "--to-latest", "--target-db", "x", check=False)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        "error: a backup id 'latest' and --to-latest: a backup id restores that dump, a point-in-time target restores from base backups and WAL; "
        "give one (leave out the backup for a point-in-time restore)"]
