"""One root exception type; the CLI alone maps them to exit codes."""

from typing import Any


class SidecarError(Exception):
    """An operation failed (exit code 3). The message says what happened and what to do."""


class ConfigError(SidecarError):
    """The configuration is invalid (exit code 2). One line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class PartlyFailed(SidecarError):
    """Part of an operation succeeded and part failed (exit code 3); `details` says which, as JSON-ready data (with
    --json the CLI prints it beside the error, and the daemon's restore record shows it)."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


class UsageError(SidecarError):
    """The command line asked for something impossible (exit code 2)."""


class NotFound(UsageError):
    """A backup id that is malformed or does not exist."""


class ChecksumMismatch(SidecarError):
    """A stored file does not match the checksum recorded in its metadata."""


class LockHeld(SidecarError):
    """Another backup or restore holds the repository lock."""
