"""Physical backups: WAL archiving (pg_receivewal), base backups (pg_basebackup) and point-in-time restore."""
