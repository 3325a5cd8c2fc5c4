"""One root exception type; the CLI alone maps them to exit codes."""


class SidecarError(Exception):
    """An operation failed (exit code 3). The message says what happened and what to do."""


class ConfigError(SidecarError):
    """The configuration is invalid (exit code 2). One line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UsageError(SidecarError):
    """The command line asked for something impossible (exit code 2)."""


class NotFound(UsageError):
    """A backup id that is malformed or does not exist."""


class ChecksumMismatch(SidecarError):
    """A stored file does not match the checksum recorded in its metadata."""


class LockHeld(SidecarError):
    """Another backup or restore holds the repository lock."""
