"""Advisory locks (flock) on the volume between the physical operations that would otherwise race:

- `reading`: a point-in-time restore reads base backups and WAL from the volume for minutes (a shared lock: several
  restores at once are fine); `prune` takes the exclusive one, and when a restore holds it, prunes no base backup or
  WAL this time (the next prune does), so a restore never loses the segment it is about to replay.
- `copying`: one off-site copier of base backups at a time (the `base-backup` command copies its own at once while the
  daemon's copier runs every few seconds): the second waits, then finds the backup copied and skips it.
- `recording`: the PITR drill record (wal/.pitr-drill.json) is read, updated and written under it, so a hand-run drill
  ending beside the daemon's loses neither outcome nor count."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READERS = ".physical.lock"
COPIER = ".offsite.lock"
RECORDING = ".pitr-drill.lock"


@contextmanager
def _flock(path: Path, exclusive: bool, wait: bool, mode: int = 0o600) -> Iterator[bool]:
    """Yields True with the lock held; False when `wait` is off and another process holds it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextmanager
def reading(backup_dir: Path) -> Iterator[None]:
    """Held by a point-in-time restore for as long as it reads the volume's base backups and WAL."""
    with _flock(backup_dir / READERS, exclusive=False, wait=True):
        yield


@contextmanager
def pruning(backup_dir: Path) -> Iterator[bool]:
    """True: no restore is reading, base backups and WAL may go; False: one is, leave them this time."""
    with _flock(backup_dir / READERS, exclusive=True, wait=False) as held:
        yield held


@contextmanager
def copying(directory: Path, wait: bool) -> Iterator[bool]:
    with _flock(directory / COPIER, exclusive=True, wait=wait) as held:
        yield held


@contextmanager
def recording(directory: Path) -> Iterator[None]:
    with _flock(directory / RECORDING, exclusive=True, wait=True):
        yield
