"""The backup volume: ids, file names, metadata JSON, listing, atomic commit, lock, delete."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from sidecar.errors import LockHeld, NotFound, SidecarError
from sidecar.streams import disk_error, fsync_dir, remove_quietly

ID_PATTERN = re.compile(r"backup_(\d{4})-(\d{2})-(\d{2})T(\d{2})-(\d{2})-(\d{2})-(\d{3})Z")
METADATA_SUFFIX = ".metadata.json"
PARTIAL_SUFFIX = ".partial"
LOCK_NAME = ".lock"
RESTORES_DIR = ".restores"  # the daemon's restore records (sidecar/daemon/scheduler.py)
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


# --- ids (pure) -----------------------------------------------------------------------------------

def format_id(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    return "backup_" + moment.strftime("%Y-%m-%dT%H-%M-%S-") + f"{moment.microsecond // 1000:03d}Z"


def parse_id(text: str) -> datetime:
    """The UTC time of a backup id; NotFound for anything that is not exactly an id."""
    match = ID_PATTERN.fullmatch(text) if isinstance(text, str) and text.isascii() else None
    if not match:
        shown = text[:60].encode("unicode_escape").decode() if isinstance(text, str) else repr(text)
        raise NotFound(f"'{shown}' is not a backup id (backup_YYYY-MM-DDTHH-MM-SS-mmmZ); run 'pg-backup-sidecar list'")
    year, month, day, hour, minute, second, milli = (int(g) for g in match.groups())
    try:
        return datetime(year, month, day, hour, minute, second, milli * 1000, tzinfo=UTC)
    except ValueError:
        raise NotFound(f"'{text}' is not a valid backup id (no such date); run 'pg-backup-sidecar list'") from None


def new_id(now: datetime, taken: set[str]) -> str:
    """An id for `now`, moved forward by a millisecond until it is not taken."""
    moment = now.astimezone(UTC).replace(microsecond=now.microsecond // 1000 * 1000)
    while format_id(moment) in taken:
        moment += timedelta(milliseconds=1)
    return format_id(moment)


def iso_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def dump_extension(fmt: str, compression: str, encrypted: bool) -> str:
    from sidecar.streams import EXTENSIONS

    return (".sql" if fmt == "plain" else ".dump") + EXTENSIONS[compression] + (".age" if encrypted else "")


def globals_extension(compression: str, encrypted: bool) -> str:
    from sidecar.streams import EXTENSIONS

    return ".globals.sql" + EXTENSIONS[compression] + (".age" if encrypted else "")


# --- file names (pure) ----------------------------------------------------------------------------

def shown(name: object) -> str:
    """A name as it can be printed on one line: control characters escaped, long names cut."""
    return name[:80].encode("unicode_escape").decode() if isinstance(name, str) else repr(name)[:80]


def is_plain_name(name: object) -> bool:
    """A name that stays inside the directory it is joined to: no separator, no NUL, not . or .."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def is_own_file_name(backup_id: str, name: object) -> bool:
    """A data file of `backup_id`: `<id>.<extension>`, plain, not the metadata file, not a leftover."""
    return (isinstance(name, str) and name.isascii() and re.fullmatch(re.escape(backup_id) + r"\.[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None
            and not name.endswith((METADATA_SUFFIX, PARTIAL_SUFFIX, ".tmp")))


def file_names(backup_id: str, metadata: object) -> list[str]:
    """The names of a backup's files from its metadata, each checked to be a file of that backup and
    nothing else (never a path, never another backup's file); ValueError naming what is wrong."""
    files = metadata.get("files") if isinstance(metadata, dict) else None
    if not isinstance(files, dict) or not any(isinstance(v, dict) for k, v in files.items() if k == "dump" or str(k).startswith("dump:")):
        raise ValueError("has no files.dump entry")  # a whole server's set has files.dump:<n>, one per database
    names: list[str] = []
    for kind, item in files.items():
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not is_own_file_name(backup_id, name):
            raise ValueError(f"files.{shown(kind)} names '{shown(name)}', which is not a file of this backup ({backup_id}.<extension>)")
        size, checksum = item.get("size"), item.get("checksum")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"files.{shown(kind)}.size is {shown(size)}, not a byte count")
        if not isinstance(checksum, str) or not SHA256_PATTERN.fullmatch(checksum):
            raise ValueError(f"files.{shown(kind)}.checksum is '{shown(checksum)}', not a sha256")
        names.append(name)
    return names


# --- listing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """What the volume holds for one backup id."""

    id: str
    metadata: dict[str, Any] | None
    status: str  # ok | missing-file | size-mismatch | unreadable-metadata | missing-metadata
    problem: str = ""

    @property
    def good(self) -> bool:
        return self.status == "ok"

    @cached_property
    def timestamp(self) -> datetime:  # parsed once: retention and 'latest' look at it many times per backup
        return parse_id(self.id)

    @property
    def drill(self) -> str:
        """The last restore drill (metadata `verified`): passed | failed | never | skipped (it could not run,
        e.g. no identity to decrypt with: `verified.skipped`, or `ok` neither true nor false)."""
        verified = (self.metadata or {}).get("verified")
        if not isinstance(verified, dict):
            return "never"
        if verified.get("skipped") or verified.get("ok") not in (True, False):
            return "skipped"
        return "passed" if verified["ok"] else "failed"

    @property
    def drill_at(self) -> str | None:
        verified = (self.metadata or {}).get("verified")
        return str(verified.get("at")) if isinstance(verified, dict) and verified.get("at") else None

    @property
    def validation(self) -> str:
        """The consistency checks taken before the backup: clean | N findings | not run."""
        checked = (self.metadata or {}).get("validation")
        if not isinstance(checked, dict):
            return "not run"
        findings = checked.get("findings") or []
        if not findings and checked.get("ok", True):
            return "clean"
        return f"{len(findings)} finding{'' if len(findings) == 1 else 's'}" if findings else "not clean"


FUTURE_TOLERANCE = timedelta(minutes=5)


def _by_preference(entries: list[Entry], now: datetime, include_future: bool = True) -> list[Entry]:
    """The good backups of `entries` (newest first), newest first, except that those stamped more than
    FUTURE_TOLERANCE ahead of `now` come last (they were taken while the clock was ahead, so they are
    older than they say), or not at all with include_future=False."""
    limit = now + FUTURE_TOLERANCE
    current: list[Entry] = []
    future: list[Entry] = []
    for entry in entries:
        if entry.good:
            (current if entry.timestamp <= limit else future).append(entry)
    return current + future if include_future else current


def newest_good(entries: list[Entry], now: datetime, include_future: bool = True) -> Entry | None:
    """The newest good backup of `entries` (newest first). One stamped in the future (see _by_preference)
    is the answer only if no other backup is good, and never with include_future=False."""
    return next(iter(_by_preference(entries, now, include_future)), None)


def newest_drill_passed(entries: list[Entry], now: datetime) -> Entry | None:
    """The newest good backup whose restore drill passed (same clock rule as newest_good)."""
    return next((e for e in _by_preference(entries, now) if e.drill == "passed"), None)


def _on(entry: Entry) -> str:
    return f" on {entry.drill_at}" if entry.drill_at else ""


def choose_latest(entries: list[Entry], now: datetime) -> tuple[Entry | None, str]:
    """What 'latest' means, and why, in one line: the newest good backup that has not failed its restore
    drill. If every good backup failed its drill, still the newest good one, saying so."""
    ordered = _by_preference(entries, now)
    if not ordered:
        return None, "latest: no good backup"
    pick = next((e for e in ordered if e.drill != "failed"), None)
    if pick is None:
        newest = ordered[0]
        return newest, (f"latest: {newest.id} (newest good backup) although its restore drill failed{_on(newest)}: "
                        f"every good backup failed its drill; run 'pg-backup-sidecar list' and look at the drill findings")
    skipped = ordered[:ordered.index(pick)]
    why = "newest good backup" if not skipped else "newest good backup that has not failed a restore drill"
    note = f"latest: {pick.id} ({why}, drill {pick.drill})"
    if skipped:
        shown = ", ".join(f"{e.id} whose drill failed{_on(e)}" for e in skipped[:3])
        note += f"; skipped {shown}" + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    return pick, note


# Parsed metadata by directory and id, with the (inode, mtime, size) it was read at: a daemon lists the
# volume on every scrape and API call, and re-reading hundreds of JSON files each time made a listing
# cost 28 ms at 720 backups (and grew the daemon's memory under load). Never mutate what it holds.
_parsed: dict[str, dict[str, tuple[tuple[int, int, int], Any]]] = {}
# (directory, problem) of entries whose metadata names a file that is not theirs, logged once per process
_warned: set[tuple[str, str]] = set()


class Repository:
    def __init__(self, directory: Path, group_readable: bool = False) -> None:
        """`group_readable`: files 0640 and directories 0750 (a group such as Kubernetes' fsGroup must read
        the volume) instead of 0600 and 0700. Modes are set explicitly, so the umask does not matter."""
        self.dir = directory
        self.file_mode = 0o640 if group_readable else 0o600
        self.dir_mode = 0o750 if group_readable else 0o700

    def ensure(self) -> None:
        try:
            self.dir.mkdir(parents=True)
        except FileExistsError:
            if not self.dir.is_dir():
                raise SidecarError(f"cannot create backup directory {self.dir} (File exists); set BACKUP_DIR to a writable directory") from None
        except OSError as exc:
            raise SidecarError(f"cannot create backup directory {self.dir} ({exc.strerror}); set BACKUP_DIR to a writable directory") from None
        else:
            os.chmod(self.dir, self.dir_mode)  # only a directory we created: a mounted volume keeps its own mode
        if os.statvfs(self.dir).f_flag & os.ST_RDONLY:
            raise SidecarError(f"backup directory {self.dir} is on a read-only file system; mount the backup volume read-write")
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise SidecarError(f"backup directory {self.dir} is not writable by this user; fix its permissions or set BACKUP_DIR")

    def make_dir(self, path: Path) -> None:
        """A directory of ours inside the volume (`.restores/`), with the volume's directory mode."""
        path.mkdir(exist_ok=True)
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):  # a link is not followed out of the volume
            raise NotADirectoryError(errno.ENOTDIR, "not a directory (a link?); remove it", str(path))
        if stat.S_IMODE(info.st_mode) != self.dir_mode:
            os.chmod(path, self.dir_mode)

    def path(self, name: str) -> Path:
        """A file in the backup directory; a name that could lead outside it is refused."""
        if not is_plain_name(name):
            raise SidecarError(f"refusing the file name '{shown(name)}': not a plain file name inside {self.dir}")
        return self.dir / name

    def metadata_path(self, backup_id: str) -> Path:
        return self.dir / (backup_id + METADATA_SUFFIX)

    def _scan(self) -> dict[str, os.DirEntry[str]]:
        try:
            with os.scandir(self.dir) as listing:
                return {item.name: item for item in listing}
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise SidecarError(f"cannot list backup directory {self.dir} ({exc.strerror})") from None

    def entries(self) -> list[Entry]:
        """Every backup on the volume, newest first; incomplete commits are not listed."""
        names = self._scan()
        ids: set[str] = set()
        for name in names:
            stem = name.split(".", 1)[0]
            if ID_PATTERN.fullmatch(stem) and not name.endswith((PARTIAL_SUFFIX, ".tmp")):
                ids.add(stem)
        cache = _parsed.get(str(self.dir), {})
        fresh: dict[str, tuple[tuple[int, int, int], Any]] = {}
        entries = [e for e in (self._entry(i, names, cache, fresh) for i in ids) if e is not None]
        _parsed[str(self.dir)] = fresh  # only what is on the volume now
        return sorted(entries, key=lambda e: e.id, reverse=True)

    def _entry(self, backup_id: str, names: dict[str, os.DirEntry[str]], cache: dict[str, tuple[tuple[int, int, int], Any]],
               fresh: dict[str, tuple[tuple[int, int, int], Any]]) -> Entry | None:
        meta_name = backup_id + METADATA_SUFFIX
        if meta_name not in names:
            return Entry(backup_id, None, "missing-metadata", f"{meta_name} is missing")
        try:
            info = names[meta_name].stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                return Entry(backup_id, None, "unreadable-metadata", f"{meta_name} is not a regular file (a link or a directory); check it by hand")
            key = (info.st_ino, info.st_mtime_ns, info.st_size)  # metadata is replaced by rename: a new inode
            hit = cache.get(backup_id)
            metadata = hit[1] if hit and hit[0] == key else json.loads(Path(names[meta_name].path).read_bytes())
            fresh[backup_id] = (key, metadata)
            if not isinstance(metadata, dict) or metadata.get("id") != backup_id:
                described = metadata.get("id") if isinstance(metadata, dict) else type(metadata).__name__
                return Entry(backup_id, None, "unreadable-metadata", f"{meta_name} describes {described!r}, not this backup")
        except (OSError, ValueError) as exc:
            return Entry(backup_id, None, "unreadable-metadata", f"{meta_name} cannot be read ({exc})")
        try:
            files = file_names(backup_id, metadata)
        except ValueError as exc:
            # a file name that is not this backup's own (a path, another backup's file): such an entry is
            # never read nor deleted, only reported
            problem = f"{meta_name} {exc}; nothing of this backup is read or deleted, check it by hand"
            if (str(self.dir), problem) not in _warned:
                _warned.add((str(self.dir), problem))
                log.warning("%s", problem)
            return Entry(backup_id, None, "unreadable-metadata", problem)
        for name, item in zip(files, metadata["files"].values(), strict=True):
            try:
                info = names[name].stat(follow_symlinks=False)
            except (KeyError, OSError):  # not listed, or deleted since (a prune running now)
                if name + PARTIAL_SUFFIX in names:
                    return None  # a commit that was interrupted; cleaned up by the next backup
                return Entry(backup_id, metadata, "missing-file", f"{name} is missing")
            if not stat.S_ISREG(info.st_mode):
                return Entry(backup_id, metadata, "missing-file", f"{name} is not a regular file (a link or a directory); it is never read")
            if info.st_size != item["size"]:
                return Entry(backup_id, metadata, "size-mismatch", f"{name} is {info.st_size} bytes, metadata says {item['size']}")
        return Entry(backup_id, metadata, "ok")

    def get(self, ref: str) -> Entry:
        """Resolve an id or 'latest' (see choose_latest: the newest good backup that has not failed a drill)."""
        if ref == "latest":
            entry, note = choose_latest(self.entries(), datetime.now(UTC))
            if entry:
                (log.warning if entry.drill == "failed" else log.info)("%s", note)
                return entry
            raise NotFound(f"no good backup in {self.dir}; take one with 'pg-backup-sidecar backup'")
        parse_id(ref)
        for entry in self.entries():
            if entry.id == ref:
                return entry
        raise NotFound(f"no backup {ref} in {self.dir}; run 'pg-backup-sidecar list' to see the ids")

    # --- writing ----------------------------------------------------------------------------------

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        write_atomically(self.metadata_path(metadata["id"]), json.dumps(metadata, indent=2, sort_keys=True).encode() + b"\n", self.file_mode)

    def commit(self, metadata: dict[str, Any]) -> None:
        """Metadata first, then each `.partial` renamed to its final name, then the directory fsynced.

        A crash in between leaves metadata beside a `.partial`, which is not listed and is cleaned up."""
        self.write_metadata(metadata)
        for item in metadata["files"].values():
            final = self.path(item["name"])
            partial = final.with_name(final.name + PARTIAL_SUFFIX)
            os.chmod(partial, self.file_mode)
            os.rename(partial, final)
        fsync_dir(self.dir)

    def cleanup(self) -> list[str]:
        """Remove leftovers of interrupted backups (call with the lock held). Returns what was removed."""
        names = set(self._scan())
        removed = []
        for name in sorted(names):
            stem = name.split(".", 1)[0]
            if name.endswith((PARTIAL_SUFFIX, ".tmp")) and (ID_PATTERN.fullmatch(stem) or name.startswith(".")):
                remove_quietly(self.path(name))
                removed.append(name)
                meta = stem + METADATA_SUFFIX
                if name.endswith(PARTIAL_SUFFIX) and meta in names and meta not in removed:
                    remove_quietly(self.path(meta))
                    removed.append(meta)
        if removed:
            fsync_dir(self.dir)
        changed = self.fix_modes(names)
        if changed:
            log.info("set the mode of %d files and directories on the backup volume to %o/%o", changed, self.file_mode, self.dir_mode)
        return removed

    def fix_modes(self, names: set[str]) -> int:
        """Bring what an older version (or the other BACKUP_GROUP_READABLE) left on the volume to the
        configured modes: backup files, metadata, the lock, restore records. Links are never followed."""
        files = [self.dir / n for n in names if ID_PATTERN.fullmatch(n.split(".", 1)[0]) or n == LOCK_NAME]
        directories = []
        restores = self.dir / RESTORES_DIR
        if restores.is_dir() and not restores.is_symlink():
            directories.append(restores)
            files += list(restores.iterdir())
        changed = 0
        for path, mode, kind in [*((f, self.file_mode, stat.S_ISREG) for f in files), *((d, self.dir_mode, stat.S_ISDIR) for d in directories)]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a link is not followed: ELOOP
            except OSError:
                continue  # gone since, a link, or not ours to read
            try:
                info = os.fstat(fd)
                if kind(info.st_mode) and stat.S_IMODE(info.st_mode) != mode:
                    os.fchmod(fd, mode)
                    changed += 1
            except OSError:
                pass  # another user's: not ours to change
            finally:
                os.close(fd)
        return changed

    def delete(self, entry: Entry) -> bool:
        """Remove a backup's files and metadata. Only names that are this backup's own files are removed;
        an entry whose metadata names anything else is left alone (logged, False returned)."""
        try:
            parse_id(entry.id)
            names = file_names(entry.id, entry.metadata)
        except (NotFound, ValueError) as exc:
            log.warning("not deleting %s: its metadata %s; check it by hand", shown(entry.id), exc if isinstance(exc, ValueError) else "has no valid id")
            return False
        for name in names:
            remove_quietly(self.path(name))
        remove_quietly(self.metadata_path(entry.id))
        fsync_dir(self.dir)
        return True

    @contextmanager
    def lock(self, operation: str) -> Iterator[None]:
        """Only one backup or restore at a time on one volume."""
        self.ensure()
        path = self.path(LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, self.file_mode)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != self.file_mode:
                try:
                    os.fchmod(fd, self.file_mode)
                except PermissionError:
                    pass  # another user's lock file: it still locks
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise LockHeld(f"another operation holds {path} ({holder}); wait for it to finish and retry") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{operation} by pid {os.getpid()}".encode(), 0)
            yield
        finally:
            os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temporary name, fsync, rename, fsync the directory. `mode` (whatever the umask): by
    default 0600, 0640 if the directory is readable by its group (a `Repository.make_dir` directory)."""
    if mode is None:
        try:
            mode = 0o600 | (path.parent.stat().st_mode & 0o040)
        except OSError as exc:
            raise disk_error(exc, path) from None
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "wb") as handle:
            os.fchmod(fd, mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise disk_error(exc, path) from None
    fsync_dir(path.parent)
