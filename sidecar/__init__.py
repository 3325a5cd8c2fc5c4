"""pg-backup-sidecar: PostgreSQL backups that provably restore."""

__version__ = "0.1.0"
