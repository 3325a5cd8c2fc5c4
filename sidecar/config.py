"""Typed configuration: defaults < config.yaml < environment, validated all at once."""

from __future__ import annotations

import difflib
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sidecar.errors import ConfigError
from sidecar.storage.remote import KEYS as REMOTE_KEYS
from sidecar.storage.remote import RemoteConfig, cross_checks, masked_value
from sidecar.values import Parser
from sidecar.values import boolean as _bool
from sidecar.values import int_at_least as _int_at_least
from sidecar.values import text as _text

COMPRESSIONS = ("zstd", "gzip", "none")
DEFAULT_COMPRESSION = "zstd"
DEFAULT_LEVELS = {"zstd": 1, "gzip": 1, "none": 0}
LEVEL_RANGES = {"zstd": (1, 19), "gzip": (1, 9), "none": (0, 0)}


@dataclass(frozen=True)
class Config:
    database_url: str
    backup_dir: Path = Path("./backups")
    retention_days: int = 30
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    compression: str = DEFAULT_COMPRESSION
    compression_level: int = DEFAULT_LEVELS[DEFAULT_COMPRESSION]
    encryption: bool = False
    recipients: tuple[str, ...] = ()
    identity_file: Path | None = None
    keep_previous_database: bool = True
    pg_bin_dir: Path | None = None
    validation_enabled: bool = True
    validation_block_backup: bool = False
    validation_timeout_seconds: int = 60
    validation_disabled: tuple[str, ...] = ()
    validation_amcheck: bool = False
    validation_checks: tuple[tuple[str, str], ...] = ()
    schedule_cron: str = "0 2 * * *"
    schedule_timezone: str = "UTC"
    run_on_start: bool = False
    listen: str = "0.0.0.0:9188"
    drill_after_backup: bool = True
    drill_cron: str | None = None
    retry_seconds: int = 120
    password_file: Path | None = None
    drill_database_url: str | None = None
    keep_previous_count: int = 2
    keep_previous_days: int = 7
    restore_jobs: int = 2  # restore.jobs: connections loading a restore's data and building its indexes at once
    data_dir: Path | None = None
    group_readable: bool = False
    remote: RemoteConfig | None = None  # the off-site object store (remote.* / BACKUP_REMOTE_*), None: no off-site copies
    drill_from_remote: bool = False  # drills restore from the remote copy (drill.from_remote / DRILL_FROM_REMOTE)
    volume: bool = True  # False (BACKUP_VOLUME=false): no backup volume, backups stream to `remote`; backup_dir is then the state directory
    # --- WAL archiving and point-in-time recovery (sidecar/physical) ---
    wal_archiving: bool = False
    wal_slot_name: str = "pg_backup_sidecar"
    wal_spool_dir: Path | None = None  # default BACKUP_DIR/wal/spool
    wal_replication_url: str | None = None  # the role for replication connections (pg_receivewal, pg_basebackup, the slot); None: DATABASE_URL's
    wal_replication_password_file: Path | None = None  # its password, read at each connection (a mounted Secret)
    # --- a whole server (issue 14, sidecar/logical/server.py) ---
    databases: tuple[str, ...] = ()  # backup.databases: () = DATABASE_URL's database only (as before); ("*",) = all; else the list
    parallel: int = 1  # backup.parallel: dumps of a set's databases at once
    base_retention_days: int | None = None  # days to keep base backups (and the WAL they need); None: retention_days
    base_backup_cron: str = "0 3 * * 0"  # the daemon's base backups when WAL archiving is on (weekly, Sunday 03:00)
    pitr_drill_cron: str | None = None  # the daemon's PITR drills (drill.pitr_cron / PITR_DRILL_SCHEDULE); None: none scheduled
    base_full_every: int = 1  # a full base backup every N (the others incremental, PostgreSQL 17+); 1: every one is full

    @property
    def base_backup_retention_days(self) -> int:
        """BASE_BACKUP_RETENTION_DAYS; unset: BACKUP_RETENTION_DAYS, or, when that is 0 because the dumps are kept by tiers
        (BACKUP_KEEP_*), the daily tier's days (7 without one): a point-in-time window as long as the daily dumps reach,
        not every WAL segment forever."""
        if self.base_retention_days is not None:
            return self.base_retention_days
        if self.retention_days == 0 and (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly):
            return self.keep_daily or 7
        return self.retention_days

    def conninfo(self) -> dict[str, str]:
        """Connection parameters, password included (for libpq only, never for output)."""
        params = {k: str(v) for k, v in conninfo_to_dict(self.database_url).items() if v is not None}
        if self.password_file:
            params["password"] = self.password_file.read_text().strip()
        return params

    @property
    def database_name(self) -> str:
        return self.conninfo().get("dbname", "")

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for printing."""
        return {
            "database.url": mask_url(self.database_url),
            "backup.dir": str(self.backup_dir),
            "backup.retention_days": self.retention_days,
            "backup.keep_last": self.keep_last,
            "backup.keep_daily": self.keep_daily,
            "backup.keep_weekly": self.keep_weekly,
            "backup.keep_monthly": self.keep_monthly,
            "backup.compression": self.compression,
            "backup.compression_level": self.compression_level,
            "encryption.enabled": self.encryption,
            "encryption.recipients": list(self.recipients),
            "encryption.identity_file": str(self.identity_file) if self.identity_file else None,
            "restore.keep_previous_database": self.keep_previous_database,
            "postgres.bin_dir": str(self.pg_bin_dir) if self.pg_bin_dir else None,
            "validation.enabled": self.validation_enabled,
            "validation.block_backup_on_failure": self.validation_block_backup,
            "validation.statement_timeout_seconds": self.validation_timeout_seconds,
            "validation.disabled_checks": list(self.validation_disabled),
            "validation.amcheck": self.validation_amcheck,
            "validation.checks": dict(self.validation_checks),
            "schedule.cron": self.schedule_cron,
            "schedule.timezone": self.schedule_timezone,
            "schedule.run_on_start": self.run_on_start,
            "http.listen": self.listen,
            "drill.after_backup": self.drill_after_backup,
            "drill.cron": self.drill_cron,
            "drill.pitr_cron": self.pitr_drill_cron,
            "schedule.retry_seconds": self.retry_seconds,
            "database.password_file": str(self.password_file) if self.password_file else None,
            "drill.database_url": mask_url(self.drill_database_url) if self.drill_database_url else None,
            "restore.keep_previous_count": self.keep_previous_count,
            "restore.keep_previous_days": self.keep_previous_days,
            "restore.jobs": self.restore_jobs,
            "postgres.data_dir": str(self.data_dir) if self.data_dir else None,
            "backup.group_readable": self.group_readable,
            "backup.volume": self.volume,
            **(self.remote.masked() if self.remote else {"remote.url": None}),
            "drill.from_remote": self.drill_from_remote,
            "wal.enabled": self.wal_archiving,
            "wal.slot_name": self.wal_slot_name,
            "wal.spool_dir": str(self.wal_spool_dir) if self.wal_spool_dir else None,
            "wal.replication_url": mask_url(self.wal_replication_url) if self.wal_replication_url else None,
            "wal.replication_password_file": str(self.wal_replication_password_file) if self.wal_replication_password_file else None,
            "backup.databases": ("all" if self.databases == ALL_DATABASES else ",".join(self.databases)) or None,
            "backup.parallel": self.parallel,
            "base_backup.retention_days": self.base_backup_retention_days,
            "base_backup.schedule": self.base_backup_cron,
            "base_backup.full_every": self.base_full_every,
        }

    def replication(self) -> Config:
        """This configuration with WAL_REPLICATION_URL as the connection (its role streams WAL, takes base backups and makes the
        slot), or itself when none is set (DATABASE_URL's role does it all)."""
        if not self.wal_replication_url or (self.database_url == self.wal_replication_url and self.password_file == self.wal_replication_password_file):
            return self
        return replace(self, database_url=self.wal_replication_url, password_file=self.wal_replication_password_file)

    def drill_server(self) -> Config:
        """Where drills restore: the server of drill.database_url, else the live database's own server."""
        return replace(self, database_url=self.drill_database_url, password_file=None, data_dir=None) if self.drill_database_url else self

    def with_database(self, dbname: str) -> Config:
        params = self.conninfo()
        params["dbname"] = dbname
        return replace(self, database_url=make_conninfo(**params))


# libpq's secret connection parameters (those PQconndefaults() marks "*", and the SCRAM keys it marks
# for debugging only): never printed, logged, or put in a child's argv
SECRET_PARAMETERS = ("password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key")


def mask_url(url: str) -> str:
    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "<unparseable>"
    for key in SECRET_PARAMETERS:
        if params.get(key):
            params[key] = "****"
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


# key in config.yaml -> (environment variable, parser)


def _compression(value: Any) -> str:
    if isinstance(value, bool):
        return DEFAULT_COMPRESSION if value else "none"
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return DEFAULT_COMPRESSION
    if text in ("false", "0", "no", "off", "none"):
        return "none"
    if text in COMPRESSIONS:
        return text
    raise ValueError("accepted values: true, false, zstd, gzip")


def _recipients(value: Any) -> tuple[str, ...]:
    from sidecar.age import parse_recipient

    items = value if isinstance(value, list) else str(value).split(",")
    keys = tuple(str(item).strip() for item in items if str(item).strip())
    for key in keys:
        parse_recipient(key)
    return keys


def _url(value: Any) -> str:
    url = _text(value)
    try:
        params = conninfo_to_dict(url)
    except Exception:
        raise ValueError("is not a PostgreSQL connection URL (postgresql://user:password@host:5432/dbname)") from None
    if not params.get("dbname"):
        raise ValueError("names no database (postgresql://user:password@host:5432/dbname)")
    return url


def _replication_url(value: Any) -> str:
    """A connection URL for replication connections: no database needed (a physical replication connection has none)."""
    url = _text(value)
    try:
        conninfo_to_dict(url)
    except Exception:
        raise ValueError("is not a PostgreSQL connection URL (postgresql://replicator:password@host:5432/postgres)") from None
    return url


CHECK_NAMES = ("foreign_keys", "check_constraints", "invalid_indexes", "btree_indexes", "sequences", "user_checks")


def _check_names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    names = tuple(str(item).strip() for item in items if str(item).strip())
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r}; accepted values: {', '.join(CHECK_NAMES)}")
    return names


def _user_checks(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of check name to SQL query that must return no rows")
    checks = []
    for name, query in value.items():
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"check {name!r} must be a non-empty SQL query")
        checks.append((str(name), query))
    return tuple(checks)


def _cron(value: Any) -> str:
    from cronsim import CronSim, CronSimError

    text = _text(value)
    try:
        CronSim(text, datetime.now())
    except CronSimError as exc:
        raise ValueError(f"is not a cron expression ({exc}); e.g. '0 2 * * *' for 2 AM daily") from None
    return text


def _timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = _text(value)
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("is not a time zone name (e.g. UTC, Europe/Berlin)") from None
    return text


def _listen(value: Any) -> str:
    text = _text(value)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:9188")
    return text


def _readable_file(value: Any) -> Path:
    path = Path(_text(value))
    try:
        path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    return path


def _path(value: Any) -> Path:
    return Path(_text(value))


ALL_DATABASES = ("*",)  # Config.databases for BACKUP_DATABASES=all


def _databases(value: Any) -> tuple[str, ...]:
    """`all`, or a comma list of database names (each 1 to 63 bytes, none twice)."""
    items = [str(item) for item in value] if isinstance(value, list) else _text(value).split(",")
    names = [item.strip() for item in items]
    if names == ["all"]:
        return ALL_DATABASES
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"item {i + 1} is empty; give 'all' or database names separated by commas (app,billing)")
        if len(name.encode()) > 63 or "\0" in name:
            raise ValueError(f"{name[:70]!r} is not a database name (at most 63 bytes)")
        if names.index(name) != i:
            raise ValueError(f"{name!r} is listed twice")
    return tuple(names)


def _slot_name(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"[a-z0-9_]{1,63}", text):
        raise ValueError("must be a replication slot name: 1 to 63 lower-case letters, digits or underscores")
    return text


KEYS: dict[str, tuple[str, Parser]] = {
    "database.url": ("DATABASE_URL", _url),
    "backup.dir": ("BACKUP_DIR", _path),
    "backup.retention_days": ("BACKUP_RETENTION_DAYS", _int_at_least(0)),
    "backup.keep_last": ("BACKUP_KEEP_LAST", _int_at_least(0)),
    "backup.keep_daily": ("BACKUP_KEEP_DAILY", _int_at_least(0)),
    "backup.keep_weekly": ("BACKUP_KEEP_WEEKLY", _int_at_least(0)),
    "backup.keep_monthly": ("BACKUP_KEEP_MONTHLY", _int_at_least(0)),
    "backup.compression": ("BACKUP_COMPRESSION", _compression),
    "backup.compression_level": ("BACKUP_COMPRESSION_LEVEL", _int_at_least(0, 19)),
    "encryption.enabled": ("BACKUP_ENCRYPTION", _bool),
    "encryption.recipients": ("BACKUP_ENCRYPTION_RECIPIENTS", _recipients),
    "encryption.identity_file": ("BACKUP_ENCRYPTION_IDENTITY_FILE", _path),
    "restore.keep_previous_database": ("RESTORE_KEEP_PREVIOUS_DATABASE", _bool),
    "postgres.bin_dir": ("PG_BIN_DIR", _path),
    "validation.enabled": ("VALIDATION_ENABLED", _bool),
    "validation.block_backup_on_failure": ("VALIDATION_BLOCK_BACKUP_ON_FAILURE", _bool),
    "validation.statement_timeout_seconds": ("VALIDATION_STATEMENT_TIMEOUT_SECONDS", _int_at_least(1)),
    "validation.disabled_checks": ("VALIDATION_DISABLED_CHECKS", _check_names),
    "validation.amcheck": ("VALIDATION_AMCHECK", _bool),
    "validation.checks": ("", _user_checks),
    "schedule.cron": ("BACKUP_SCHEDULE", _cron),
    "schedule.timezone": ("BACKUP_SCHEDULE_TIMEZONE", _timezone),
    "schedule.run_on_start": ("BACKUP_ON_START", _bool),
    "http.listen": ("SIDECAR_LISTEN", _listen),
    "drill.after_backup": ("DRILL_AFTER_BACKUP", _bool),
    "drill.cron": ("DRILL_SCHEDULE", _cron),
    "schedule.retry_seconds": ("BACKUP_RETRY_SECONDS", _int_at_least(0, 86400)),
    "database.password_file": ("DATABASE_PASSWORD_FILE", _readable_file),
    "drill.database_url": ("DRILL_DATABASE_URL", _url),
    "restore.keep_previous_count": ("RESTORE_KEEP_PREVIOUS_COUNT", _int_at_least(0)),
    "restore.keep_previous_days": ("RESTORE_KEEP_PREVIOUS_DAYS", _int_at_least(0)),
    "postgres.data_dir": ("POSTGRES_DATA_DIR", _path),
    "backup.group_readable": ("BACKUP_GROUP_READABLE", _bool),
    "drill.from_remote": ("DRILL_FROM_REMOTE", _bool),
    "backup.volume": ("BACKUP_VOLUME", _bool),
    "backup.state_dir": ("SIDECAR_STATE_DIR", _path),
    **REMOTE_KEYS,  # remote.url, remote.endpoint, ...: sidecar/storage/remote.py
    # WAL archiving and point-in-time recovery (sidecar/physical)
    "wal.enabled": ("WAL_ARCHIVING", _bool),
    "wal.slot_name": ("WAL_SLOT_NAME", _slot_name),
    "wal.spool_dir": ("WAL_SPOOL_DIR", _path),
    "wal.replication_url": ("WAL_REPLICATION_URL", _replication_url),
    "wal.replication_password_file": ("WAL_REPLICATION_PASSWORD_FILE", _readable_file),
    # a whole server (sidecar/logical/server.py)
    "backup.databases": ("BACKUP_DATABASES", _databases),
    "backup.parallel": ("BACKUP_PARALLEL", _int_at_least(1, 16)),
    "restore.jobs": ("RESTORE_JOBS", _int_at_least(1, 16)),
    "base_backup.retention_days": ("BASE_BACKUP_RETENTION_DAYS", _int_at_least(0)),
    "base_backup.schedule": ("BASE_BACKUP_SCHEDULE", _cron),
    "drill.pitr_cron": ("PITR_DRILL_SCHEDULE", _cron),
    "base_backup.full_every": ("BASE_BACKUP_FULL_EVERY", _int_at_least(1, 1000)),
}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name not in KEYS:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read config.yaml (if given or named by SIDECAR_CONFIG), then the environment; report every bad key."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    raw: dict[str, tuple[str, Any]] = {}  # key -> (where it came from, value)
    config_path = path or env.get("SIDECAR_CONFIG")
    if config_path:
        try:
            document = yaml.safe_load(Path(config_path).read_text()) or {}
        except OSError as exc:
            raise ConfigError([f"config file {config_path}: cannot read it ({exc.strerror}); check --config / SIDECAR_CONFIG"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file {config_path}: not valid YAML ({str(exc).splitlines()[0]})"]) from None
        if not isinstance(document, Mapping):
            raise ConfigError([f"config file {config_path}: must be a mapping of sections (database:, backup:, ...)"])
        for key, value in _flatten(document).items():
            if key not in KEYS:
                problems.append(f"{key} (in {config_path}): unknown key; accepted keys: {', '.join(KEYS)}")
            elif value is not None:
                raw[key] = (f"{key} (in {config_path})", value)
    for key, (variable, _parser) in KEYS.items():
        if variable and env.get(variable, "") != "":
            raw[key] = (variable, env[variable])

    values: dict[str, Any] = {}
    for key, (where, value) in raw.items():
        try:
            values[key] = KEYS[key][1](value)
        except ValueError as exc:
            shown = "****" if key in ("database.url", "drill.database_url", "wal.replication_url") else repr(masked_value(value) if isinstance(value, str) else value)
            problems.append(f"{where}={shown}: {exc}")

    if "database.url" not in values and "database.url" not in raw:
        problems.append("DATABASE_URL: not set; set it (or database.url in config.yaml) to postgresql://user:password@host:5432/dbname")
    compression = values.get("backup.compression", DEFAULT_COMPRESSION)
    level = values.get("backup.compression_level", DEFAULT_LEVELS[compression])
    low, high = LEVEL_RANGES[compression]
    if "backup.compression_level" in values and not low <= level <= high:
        where = raw["backup.compression_level"][0]
        problems.append(f"{where}={level!r}: must be between {low} and {high} for {compression} compression")
    recipients_reported = "encryption.recipients" in raw and "encryption.recipients" not in values  # a bad key, said above
    if values.get("encryption.enabled") and not values.get("encryption.recipients") and not recipients_reported:
        problems.append(
            "BACKUP_ENCRYPTION=true: no recipients; set BACKUP_ENCRYPTION_RECIPIENTS to one or more age public keys (age1...)"
        )
    remote_fields = {key.split(".", 1)[1]: value for key, value in values.items() if key.startswith("remote.")}
    remote_names = {key.split(".", 1)[1]: raw[key][0].removesuffix(f" (in {config_path})") if key in raw else variable
                    for key, (variable, _parser) in REMOTE_KEYS.items()}
    problems += cross_checks(remote_fields, remote_names, "remote.url" in raw)
    if values.get("drill.from_remote") and not remote_fields.get("url") and "remote.url" not in raw:
        problems.append(f"{raw['drill.from_remote'][0]}=true: drills from the remote copy need a remote store; set BACKUP_REMOTE_URL "
                        "(remote.url in config.yaml), or leave drills on the volume")
    volume = values.get("backup.volume", True)
    backup_dir = values.get("backup.dir", Path("./backups"))
    if not volume:  # backups go straight to the remote; the lock and the daemon's records need a private directory
        where = raw["backup.volume"][0]
        if not remote_fields.get("url"):
            problems.append(f"{where}=false needs a remote store: set BACKUP_REMOTE_URL (backups then go straight to the object store), "
                            "or set BACKUP_VOLUME=true and BACKUP_DIR")
        if "backup.dir" in raw:
            problems.append(f"{raw['backup.dir'][0]} is set but {where}=false (no backup volume): remove BACKUP_DIR, "
                            "or set SIDECAR_STATE_DIR for the sidecar's own small state")
        if not problems:
            backup_dir = state_directory(values.get("backup.state_dir"), raw.get("backup.state_dir", ("SIDECAR_STATE_DIR", None))[0], problems)
    elif "backup.state_dir" in values:
        problems.append(f"{raw['backup.state_dir'][0]} applies only without a volume (BACKUP_VOLUME=false); with a volume the state is kept in BACKUP_DIR")
    if not volume and values.get("wal.enabled"):
        problems.append(f"{raw['wal.enabled'][0]}=true needs a backup volume (the spool and the WAL archive live there; the off-site copy is made from it): "
                        "set BACKUP_VOLUME=true and BACKUP_DIR, or WAL_ARCHIVING=false")
    if values.get("drill.pitr_cron") and not values.get("wal.enabled"):
        problems.append(f"{raw['drill.pitr_cron'][0]} schedules point-in-time recovery drills, which restore from the WAL archive: "
                        "set WAL_ARCHIVING=true (wal.enabled) too, or leave PITR_DRILL_SCHEDULE unset")
    if "wal.replication_password_file" in values and "wal.replication_url" not in raw:
        problems.append(f"{raw['wal.replication_password_file'][0]} is the password of WAL_REPLICATION_URL's role: set WAL_REPLICATION_URL "
                        "too (postgresql://replicator@host/postgres), or remove it")
    if problems:
        raise ConfigError(problems)
    return Config(
        database_url=values["database.url"],
        backup_dir=backup_dir,
        volume=volume,
        retention_days=values.get("backup.retention_days", 30),
        keep_last=values.get("backup.keep_last", 0),
        keep_daily=values.get("backup.keep_daily", 0),
        keep_weekly=values.get("backup.keep_weekly", 0),
        keep_monthly=values.get("backup.keep_monthly", 0),
        compression=compression,
        compression_level=level,
        encryption=values.get("encryption.enabled", False),
        recipients=values.get("encryption.recipients", ()),
        identity_file=values.get("encryption.identity_file"),
        keep_previous_database=values.get("restore.keep_previous_database", True),
        pg_bin_dir=values.get("postgres.bin_dir"),
        validation_enabled=values.get("validation.enabled", True),
        validation_block_backup=values.get("validation.block_backup_on_failure", False),
        validation_timeout_seconds=values.get("validation.statement_timeout_seconds", 60),
        validation_disabled=values.get("validation.disabled_checks", ()),
        validation_amcheck=values.get("validation.amcheck", False),
        validation_checks=values.get("validation.checks", ()),
        schedule_cron=values.get("schedule.cron", "0 2 * * *"),
        schedule_timezone=values.get("schedule.timezone", "UTC"),
        run_on_start=values.get("schedule.run_on_start", False),
        listen=values.get("http.listen", "0.0.0.0:9188"),
        drill_after_backup=values.get("drill.after_backup", True),
        drill_cron=values.get("drill.cron"),
        retry_seconds=values.get("schedule.retry_seconds", 120),
        password_file=values.get("database.password_file"),
        drill_database_url=values.get("drill.database_url"),
        keep_previous_count=values.get("restore.keep_previous_count", 2),
        keep_previous_days=values.get("restore.keep_previous_days", 7),
        restore_jobs=values.get("restore.jobs", 2),
        data_dir=values.get("postgres.data_dir"),
        group_readable=values.get("backup.group_readable", False),
        remote=RemoteConfig(**remote_fields) if remote_fields.get("url") else None,
        drill_from_remote=values.get("drill.from_remote", False),
        wal_archiving=values.get("wal.enabled", False),
        wal_slot_name=values.get("wal.slot_name", "pg_backup_sidecar"),
        wal_spool_dir=values.get("wal.spool_dir"),
        wal_replication_url=values.get("wal.replication_url"),
        wal_replication_password_file=values.get("wal.replication_password_file"),
        databases=values.get("backup.databases", ()),
        parallel=values.get("backup.parallel", 1),
        base_retention_days=values.get("base_backup.retention_days"),
        base_backup_cron=values.get("base_backup.schedule", "0 3 * * 0"),
        pitr_drill_cron=values.get("drill.pitr_cron"),
        base_full_every=values.get("base_backup.full_every", 1),
    )


def state_directory(path: Path | None, where: str, problems: list[str]) -> Path:
    """The private directory (0700, ours, not a link) that holds the lock and the daemon's restore records when there is no
    backup volume: SIDECAR_STATE_DIR, else `pg-backup-sidecar-<uid>` in the temporary directory ($TMPDIR). Created if missing."""
    directory = path or Path(tempfile.gettempdir()) / f"pg-backup-sidecar-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, parents=path is not None)
    except FileExistsError:
        pass
    except OSError as exc:
        problems.append(f"{where}={str(directory)!r}: cannot create it ({exc.strerror}); point SIDECAR_STATE_DIR at a writable directory (an emptyDir)")
        return directory
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        problems.append(f"{where}={str(directory)!r}: not a directory (a link?); remove it or set SIDECAR_STATE_DIR")
    elif path is not None:  # chosen by the user (an emptyDir is root's 0777 with fsGroup): it only has to be writable
        if not os.access(directory, os.W_OK | os.X_OK):
            problems.append(f"{where}={str(directory)!r}: not writable by this user; fix its permissions or point SIDECAR_STATE_DIR elsewhere")
    elif info.st_uid != os.getuid():  # a predictable name in a shared /tmp: it must be ours and private
        problems.append(f"{where}={str(directory)!r}: owned by uid {info.st_uid}, not this user ({os.getuid()}); set SIDECAR_STATE_DIR")
    elif stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    return directory


# Variables read outside KEYS; a prefix below that is neither here nor in KEYS is probably a typo.
OTHER_VARIABLES = ("SIDECAR_CONFIG", "SIDECAR_API_TOKEN", "SIDECAR_API_TOKEN_FILE", "SIDECAR_LOG_FORMAT", "SIDECAR_DAEMON_PID",
                   "RESTORE_REQUEST_ID")
OUR_PREFIXES = ("BACKUP_", "SIDECAR_", "DRILL_", "VALIDATION_", "RESTORE_", "WAL_", "BASE_BACKUP_", "PITR_")
# what Kubernetes adds for every Service of the namespace (a Service named sidecar-... gives SIDECAR_..._PORT)
SERVICE_LINK = re.compile(r".+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)")
SERVICE_URL = re.compile(r"(tcp|udp|sctp)://\S+")


def _service_link(name: str, value: str) -> bool:
    return bool(SERVICE_LINK.fullmatch(name) or (name.endswith("_PORT") and SERVICE_URL.fullmatch(value)))


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per environment variable that looks like ours (BACKUP_*, SIDECAR_*, DRILL_*,
    VALIDATION_*, RESTORE_*, WAL_*) but is not read by anything, with the closest known name. Set, it is ignored:
    a typo in BACKUP_RETENTION_DAYS would otherwise silently keep the default."""
    env = os.environ if environ is None else environ
    known = sorted({variable for variable, _ in KEYS.values() if variable} | set(OTHER_VARIABLES))
    warnings = []
    for name in sorted(env):
        if not name.startswith(OUR_PREFIXES) or name in known or _service_link(name, env[name]):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else "see the README's configuration table"
        warnings.append(f"{name} is not a pg-backup-sidecar setting and is ignored; {hint}")
    return warnings
