"""What a restore request may ask for, checked the same way by the HTTP API (POST /v1/restores), `restore-request`
and `restore-job` before anything starts: a backup (an id or latest), or a point-in-time target as `restore --to-*`
takes it; into `target_db`; one `database` of a whole server's set; `from_remote`."""

from __future__ import annotations

from typing import Any

from sidecar import api
from sidecar.errors import UsageError

TARGETS = ("to_time", "to_lsn", "to_latest", "to_restore_point", "to_xid")  # exactly one, as `restore --to-*`
TARGET_OPTIONS = ("exclusive", "timeline")
FIELDS = (*TARGETS, *TARGET_OPTIONS, "target_db", "from_remote", "database", "backup")


def option(field: str) -> str:
    """The CLI option of an API field: to_time -> --to-time."""
    return "--" + field.replace("_", "-")


def in_api_terms(message: str) -> str:
    """A message naming CLI options (`--to-time ...`) in the API's field names (`to_time ...`)."""
    for field in sorted(FIELDS, key=len, reverse=True):
        message = message.replace(option(field), field)
    return message


def target_of(values: dict[str, Any]) -> dict[str, Any]:
    """The point-in-time target among request fields or parsed options: the target fields given (false and None are
    not given), in a fixed order."""
    return {k: values[k] for k in (*TARGETS, *TARGET_OPTIONS) if values.get(k) not in (None, False)}


def describe(backup: str | None, target: dict[str, Any] | None, database: str | None = None) -> str:
    """What a request restores, in words: `latest`, `ID database 'shop'`, `the point in time to_time=..., exclusive`."""
    if target:
        return "the point in time " + ", ".join(k if v is True else f"{k}={v}" for k, v in target.items())
    return str(backup) + (f" database {database!r}" if database else "")


def check(backup: str | None, target: dict[str, Any], target_db: str | None, database: str | None, from_remote: bool,
          api_terms: bool = False) -> None:
    """UsageError naming the first problem (in the API's field names with `api_terms`, else the CLI's options)."""
    name = (lambda f: f) if api_terms else option
    if backup is not None and target:
        given = ", ".join(name(k) for k in target)
        raise UsageError(f"{'backup' if api_terms else 'a backup id'} {backup!r} and {given}: a backup id restores that dump, a point-in-time "
                         f"target restores from base backups and WAL; give one (leave out the backup for a point-in-time restore)")
    if backup is None and not target:
        raise UsageError(f"give {'backup (a backup id or latest)' if api_terms else 'a backup id (or latest)'}, or a point-in-time target: "
                         + ", ".join(name(k) for k in TARGETS))
    if target:
        try:
            api.describe_point_in_time_target(target.get("to_time"), target.get("to_lsn"), bool(target.get("to_latest")),
                                              target.get("to_restore_point"), target.get("to_xid"), bool(target.get("exclusive")),
                                              target.get("timeline"), from_remote)
        except UsageError as exc:
            raise UsageError(in_api_terms(str(exc)) if api_terms else str(exc)) from None
        if database is not None:
            raise UsageError(f"{name('database')} picks one database of a whole server's backup set; a point-in-time restore brings back "
                             f"the database of DATABASE_URL: leave out {name('database')}")
        if not target_db:
            raise UsageError(f"a point-in-time restore goes into a database you name: add {name('target_db')} (a new name leaves the live "
                             "database alone; the live database's own name swaps the restored one in and keeps the old one)")
    elif database is not None and target_db:
        raise UsageError(f"a whole server's backup set restores each database under its own name: leave out {name('target_db')}")
