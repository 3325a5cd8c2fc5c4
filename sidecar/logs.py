"""Log set-up: JSON lines for the container (python-json-logger), readable lines for a terminal.

Every line carries the time with milliseconds and its time zone. Structured fields go in `extra=`:
`event` (what happened: backup_completed, backup_failed, restore_completed, drill_completed, retry,
lock_wait...), `backup_id`, `duration_seconds`, `attempt`, `next_try_seconds`; in JSON they are keys of
the line, in the terminal format they are appended as key=value."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

FIELDS = ("event", "backup_id", "duration_seconds", "attempt", "next_try_seconds", "size_bytes", "sessions", "blocker")


def timestamp(created: float) -> str:
    """2026-11-26T12:00:00.123+00:00"""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class JsonLines(JsonFormatter):
    """{"time": ..., "level": "info", "logger": ..., "message": ..., <structured fields>}"""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = timestamp(record.created)
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)


class Lines(logging.Formatter):
    """2026-11-26T12:00:00.123+00:00 INFO sidecar.logical.backup: message event=backup_completed backup_id=..."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None) is not None)
        line = f"{timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}" + (f"  [{fields}]" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(json_lines: bool, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else Lines())
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
