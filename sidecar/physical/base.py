"""Base backups: pg_basebackup (tar to stdout, no WAL, fast checkpoint, manifest with SHA-256) through our stages
into BACKUP_DIR/base/. A base backup is good only once the WAL from its start to its end LSN is archived.

    base/<id>.tar.zst[.age]      the tar stream pg_basebackup wrote (backup_manifest inside, at its end)
    base/<id>.metadata.json      kind "base", LSNs, timeline, system identifier, server version, sha256/size"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import __version__, age, streams
from sidecar.config import Config
from sidecar.errors import ChecksumMismatch, NotFound, SidecarError, UsageError
from sidecar.physical import tar
from sidecar.physical.server import identify, require_replication
from sidecar.physical.wal import WalArchive, format_lsn, parse_lsn, record_segment_size, segment_name, segment_of
from sidecar.postgres import Child, child_env, find_tool, tool_version
from sidecar.repository import METADATA_SUFFIX, Repository, iso_timestamp, new_id, parse_id, write_atomically
from sidecar.retention import BaseFacts, classify_base, copied_only, wal_cutoffs, wal_to_delete

BASE_DIR = "base"
log = logging.getLogger(__name__)


def base_dir(config: Config) -> Path:
    return config.backup_dir / BASE_DIR


MANIFEST_SUFFIX = ".manifest"  # the backup_manifest of each base backup, beside it: the parent an incremental names
INCREMENTAL_MAJOR = 17


def manifest_path(config: Config, backup_id: str) -> Path:
    return base_dir(config) / (backup_id + MANIFEST_SUFFIX)


def _summarize_wal_problem(config: Config) -> str | None:
    """Asked over the replication protocol (SHOW), as the role that takes the base backup: a dedicated replication role
    (WAL_REPLICATION_URL) may have a pg_hba line for replication only."""
    import psycopg

    from sidecar.physical.server import _replication_connection

    try:
        conn = _replication_connection(config)
        try:
            value = (conn.pgconn.exec_(b"SHOW summarize_wal").get_value(0, 0) or b"").decode()  # the simple protocol a walsender takes
        finally:
            conn.close()
    except psycopg.Error as exc:
        raise SidecarError(f"cannot ask the server whether summarize_wal is on: {exc}") from None
    if value != "on":
        return "summarize_wal is off: ALTER SYSTEM SET summarize_wal = on, then SELECT pg_reload_conf() (incremental base backups need it)"
    return None


def choose_parent(backups: list[BaseBackup], system: str, timeline: int, has_manifest: Any) -> BaseBackup | None:
    """The base backup an incremental builds on (pure but for `has_manifest`): the newest usable one (ok or waiting for
    its WAL) of the same system and timeline, whose backup_manifest is kept beside it."""
    for backup in backups:
        meta = backup.metadata
        if backup.status in ("ok", "waiting-for-wal") and str(meta.get("systemIdentifier")) == system \
                and int(meta.get("timeline", 0)) == timeline and has_manifest(backup.id):
            return backup
    return None


def chain_of(backups: list[BaseBackup], backup: BaseBackup) -> tuple[list[BaseBackup], str]:
    """The base backups a restore of `backup` combines, full first, and a problem ('' when every link is there and
    usable). An incremental's metadata names its parent; the chain ends at a full one."""
    by_id = {b.id: b for b in backups}
    chain = [backup]
    while chain[0].metadata.get("parent"):
        parent_id = str(chain[0].metadata["parent"])
        parent = by_id.get(parent_id)
        if parent is None:
            return chain, f"base backup {parent_id}, which incremental {chain[0].id} builds on, is missing; restore an older full chain or take a full base backup"
        if parent.status not in ("ok", "waiting-for-wal"):
            return chain, f"base backup {parent_id}, which incremental {chain[0].id} builds on, is {parent.status}: {parent.problem}"
        if parent in chain:
            return chain, f"base backup {parent_id} is its own ancestor in the chain; its metadata is damaged"
        chain.insert(0, parent)
    return chain, ""


def _incremental_due(config: Config, ident: dict[str, Any]) -> bool:
    """With BASE_BACKUP_FULL_EVERY=N (N > 1), a base backup is incremental while the newest chain has fewer than N
    backups; a server before 17, or with summarize_wal off, gets a full one (and a warning saying why)."""
    if config.base_full_every <= 1:
        return False
    if ident["major"] < INCREMENTAL_MAJOR:
        log.warning("BASE_BACKUP_FULL_EVERY=%d: incremental base backups need PostgreSQL %d+ (this is %d); taking a full one",
                    config.base_full_every, INCREMENTAL_MAJOR, ident["major"], extra={"event": "base_backup_full_fallback"})
        return False
    try:
        problem = _summarize_wal_problem(config)
    except SidecarError as exc:
        problem = str(exc)
    if problem:
        log.warning("BASE_BACKUP_FULL_EVERY=%d: %s; taking a full one", config.base_full_every, problem, extra={"event": "base_backup_full_fallback"})
        return False
    backups = list_base_backups(config)
    parent = choose_parent(backups, str(ident["systemIdentifier"]), int(ident["timeline"]), lambda i: manifest_path(config, i).is_file())
    if parent is None:
        return False
    links, broken = chain_of(backups, parent)
    return not broken and len(links) < config.base_full_every


class _IncrementalFailed(SidecarError):
    """pg_basebackup --incremental failed where BASE_BACKUP_FULL_EVERY chose it (e.g. the server's WAL summaries of the
    parent are gone: older than wal_summary_keep_time)."""


def create_base_backup(config: Config, incremental: bool | None = None) -> dict[str, Any]:
    """A base backup: full, incremental (PostgreSQL 17+, on the newest base backup), or None: as BASE_BACKUP_FULL_EVERY says
    (an incremental chosen that way that fails is taken again as a full one: a schedule never fails on it for good)."""
    try:
        return _create_base_backup(config, incremental)
    except _IncrementalFailed as exc:
        log.warning("incremental base backup failed (%s); taking a full one", exc, extra={"event": "base_backup_full_fallback"})
        return _create_base_backup(config, False)


def _create_base_backup(config: Config, incremental: bool | None) -> dict[str, Any]:
    automatic = incremental is None
    repo = Repository(config.backup_dir, group_readable=config.group_readable)
    directory = base_dir(config)
    with repo.lock("base-backup"):
        repo.make_dir(directory)
        _cleanup(directory)
        require_replication(config)
        ident = identify(config)
        tool = find_tool("pg_basebackup", config.pg_bin_dir)
        major, tool_text = tool_version(tool)
        if major < ident["major"]:
            raise SidecarError(f"{tool} is version {major} but the server is PostgreSQL {ident['major']}; install postgresql-client-{ident['major']} or set PG_BIN_DIR")
        parent: BaseBackup | None = None
        if incremental is None:  # BASE_BACKUP_FULL_EVERY: incremental unless the chain is due for a new full one
            incremental = _incremental_due(config, ident)
        if incremental:
            if ident["major"] < INCREMENTAL_MAJOR or major < INCREMENTAL_MAJOR:
                raise UsageError(f"--incremental needs PostgreSQL {INCREMENTAL_MAJOR}+ (server {ident['major']}, pg_basebackup {major}); take a full base backup")
            problem = _summarize_wal_problem(config)
            if problem:
                raise SidecarError(problem)
            parent = choose_parent(list_base_backups(config), str(ident["systemIdentifier"]), int(ident["timeline"]),
                                   lambda i: manifest_path(config, i).is_file())
            if parent is None:
                raise UsageError("no base backup of this server and timeline to build an incremental on (its .manifest kept beside it); "
                                 "take a full one with 'pg-backup-sidecar base-backup'")
        taken = {p.name.split(".", 1)[0] for p in directory.iterdir()}
        backup_id = new_id(datetime.now(UTC), taken)
        name = backup_id + ".tar" + streams.EXTENSIONS[config.compression] + (".age" if config.encryption else "")
        partial = directory / (name + ".partial")
        manifest_tmp = directory / f".{backup_id}.manifest.tmp"
        conninfo, env = child_env(config)
        argv = [tool, "-D", "-", "-Ft", "-X", "none", "--checkpoint=fast", "--manifest-checksums=SHA256", "--no-password",
                "--label", f"pg-backup-sidecar {backup_id}", "-d", conninfo]
        if parent is not None:
            argv.insert(1, f"--incremental={manifest_path(config, parent.id)}")
        started = time.monotonic()
        out = streams.HashingFile(partial)
        keeper = tar.Keeper(manifest_tmp)
        parser = tar.TarParser(keeper)
        child = Child(argv, env)
        try:
            assert child.proc.stdout is not None
            source = _Tee(child.proc.stdout, parser)
            streams.encode(source, out, config.compression, config.compression_level, config.recipients if config.encryption else None)
            child.check("base backup")
            parser.close()
            checksum = out.close()
            wal_range = tar.manifest_wal_range(manifest_tmp)
        except BaseException as exc:
            child.terminate()
            out.abort()
            streams.remove_quietly(manifest_tmp)
            if automatic and parent is not None and isinstance(exc, SidecarError):
                raise _IncrementalFailed(str(exc)) from None
            raise
        finished = datetime.now(UTC)
        label = tar.label_fields(keeper.label)
        start_lsn, end_lsn = parse_lsn(wal_range["Start-LSN"]), parse_lsn(wal_range["End-LSN"])
        timeline = int(wal_range["Timeline"])
        size = ident["segmentSize"]
        metadata = {
            "id": backup_id, "kind": "base", "timestamp": iso_timestamp(parse_id(backup_id)), "finishedAt": iso_timestamp(finished),
            "startLsn": format_lsn(start_lsn), "endLsn": format_lsn(end_lsn), "timeline": timeline,
            "startWal": segment_name(timeline, segment_of(start_lsn, size), size),
            "endWal": segment_name(timeline, segment_of(end_lsn - 1 if end_lsn % size == 0 else end_lsn, size), size),
            "systemIdentifier": ident["systemIdentifier"], "serverVersion": ident["version"], "serverMajor": ident["major"],
            "walSegmentSize": size, "pgBasebackupVersion": tool_text, "startTime": label.get("START TIME"),
            "files": {"base": {"name": name, "size": out.size, "checksum": checksum}},
            "size": out.size, "checksum": checksum, "compression": config.compression, "compressionLevel": config.compression_level,
            "encrypted": config.encryption, "members": parser.members, "durationSeconds": round(time.monotonic() - started, 3),
            "sidecarVersion": __version__,
        }
        if parent is not None:
            metadata["parent"] = parent.id
            metadata["chain"] = [*parent.metadata.get("chain", [parent.id]), backup_id]
        record_segment_size(WalArchive(config.backup_dir, repo.file_mode, repo.dir_mode), ident["systemIdentifier"], size)
        write_atomically(directory / (backup_id + METADATA_SUFFIX), json.dumps(metadata, indent=2, sort_keys=True).encode() + b"\n", repo.file_mode)
        if ident["major"] >= INCREMENTAL_MAJOR:  # the next incremental names it; file names and checksums, no data
            os.chmod(manifest_tmp, repo.file_mode)
            os.rename(manifest_tmp, manifest_path(config, backup_id))
        else:
            streams.remove_quietly(manifest_tmp)
        os.chmod(partial, repo.file_mode)
        os.rename(partial, directory / name)
        streams.fsync_dir(directory)
        log.info("base backup %s: %d bytes, WAL %s..%s on timeline %d", backup_id, out.size, metadata["startLsn"], metadata["endLsn"], timeline,
                 extra={"event": "base_backup_created", "backup_id": backup_id})
        return metadata


class _Tee:
    """A reader that shows everything it reads to the tar parser."""

    def __init__(self, source: Any, parser: tar.TarParser) -> None:
        self._source = source
        self._parser = parser

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._source.read(streams.CHUNK_SIZE if size < 0 else size)
        if data:
            self._parser.write(data)
        return data


def _cleanup(directory: Path) -> None:
    """Leftovers of an interrupted base backup (called with the lock held)."""
    for path in directory.iterdir():
        if path.name.endswith((".partial", ".tmp")):
            streams.remove_quietly(path)
            meta = directory / (path.name.split(".", 1)[0].lstrip(".") + METADATA_SUFFIX)
            if path.name.endswith(".partial"):
                streams.remove_quietly(meta)


@dataclass(frozen=True)
class BaseBackup:
    id: str
    status: str  # ok | waiting-for-wal | missing-file | size-mismatch | unreadable-metadata
    problem: str
    metadata: dict[str, Any]

    @property
    def good(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {**self.metadata, "id": self.id, "status": self.status, "problem": self.problem}


def list_base_backups(config: Config) -> list[BaseBackup]:
    """Every base backup, newest first, with its status: `waiting-for-wal` until the WAL from its start to its end
    LSN is archived (and it names the first segment missing)."""
    directory = base_dir(config)
    if not directory.is_dir():
        return []
    archive = WalArchive(config.backup_dir)
    found = []
    for path in sorted(directory.glob("backup_*" + METADATA_SUFFIX), reverse=True):
        backup_id = path.name[: -len(METADATA_SUFFIX)]
        try:
            parse_id(backup_id)
            meta = json.loads(path.read_bytes())
            item = meta["files"]["base"]
            if not isinstance(meta, dict) or meta.get("id") != backup_id or not str(item["name"]).startswith(backup_id + ".tar") or "/" in item["name"]:
                raise ValueError("does not describe this base backup")
        except (OSError, ValueError, KeyError, TypeError, NotFound) as exc:
            found.append(BaseBackup(backup_id, "unreadable-metadata", f"{path.name} cannot be read ({exc})", {}))
            continue
        stored = directory / item["name"]
        if not stored.is_file() or stored.is_symlink():
            found.append(BaseBackup(backup_id, "missing-file", f"{item['name']} is missing", meta))
            continue
        if stored.stat().st_size != item["size"]:
            found.append(BaseBackup(backup_id, "size-mismatch", f"{item['name']} is {stored.stat().st_size} bytes, metadata says {item['size']}", meta))
            continue
        size = int(meta["walSegmentSize"])
        missing = archive.has_segments(meta["systemIdentifier"], int(meta["timeline"]), segment_of(parse_lsn(meta["startLsn"]), size),
                                       int(meta["endWal"][16:], 16) + int(meta["endWal"][8:16], 16) * (0x100000000 // size), size)
        if missing:
            found.append(BaseBackup(backup_id, "waiting-for-wal", f"WAL segment {missing} is not archived yet", meta))
        else:
            found.append(BaseBackup(backup_id, "ok", "", meta))
    return found


def get_base_backup(config: Config, ref: str) -> BaseBackup:
    backups = list_base_backups(config)
    if ref == "latest":
        for backup in backups:
            if backup.good:
                return backup
        raise NotFound(f"no good base backup in {base_dir(config)}; take one with 'pg-backup-sidecar base-backup' while 'wal-receive' runs")
    for backup in backups:
        if backup.id == ref:
            return backup
    raise NotFound(f"no base backup {ref[:60]} in {base_dir(config)}; run 'pg-backup-sidecar list --base'")


def identities(config: Config, meta: dict[str, Any]) -> age.Identities | None:
    if not meta.get("encrypted"):
        return None
    if not config.identity_file:
        raise SidecarError(f"base backup {meta['id']} is encrypted; set BACKUP_ENCRYPTION_IDENTITY_FILE to the age secret key file of one of its recipients")
    return age.parse_identities(config.identity_file)


def read_base(config: Config, backup: BaseBackup, handler: tar.Keeper, manifest_tmp: Path, source: Any | None = None) -> list[str]:
    """Stream a base backup (its file on the volume, or `source`: a reader of the stored bytes, e.g. from the remote
    store) through sha256, age, decompression and the tar parser into `handler`; problems found (sha256, truncation,
    files against the manifest), one line each."""
    meta = backup.metadata
    item = meta["files"]["base"]
    parser = tar.TarParser(handler)
    try:
        with streams.open_stored(base_dir(config) / item["name"]) if source is None else contextlib.nullcontext(source) as handle:
            tap = streams.ReadTap(handle, hashing=True)
            streams.decode(tap, parser, str(meta.get("compression", "none")), identities(config, meta))
        parser.close()
        if tap.hexdigest() != item["checksum"]:
            return [f"{item['name']}: sha256 {tap.hexdigest()} differs from the metadata's {item['checksum']}; the base backup is damaged"]
        if not manifest_tmp.exists():
            return ["the base backup has no backup_manifest"]
        return tar.check_against_manifest(manifest_tmp, handler.digests)
    finally:
        streams.remove_quietly(manifest_tmp)


class DamagedBase(ChecksumMismatch):
    """A base backup of a chain read back damaged (sha256, the tar, the manifest): `backup_id` names which."""

    def __init__(self, backup_id: str, message: str) -> None:
        super().__init__(message)
        self.backup_id = backup_id


def materialise(config: Config, backups: list[BaseBackup], backup: BaseBackup, directory: Path,
                source: Callable[[BaseBackup], Any] | None = None) -> None:
    """Write the data directory of `backup` into the empty `directory`: a full one is extracted from its tar; an
    incremental one's chain is extracted into a scratch directory beside it, each checked against its manifest (the
    backup_manifest inside its tar, which pg_combinebackup reads from each part), and combined with pg_combinebackup.
    `source(link)` reads a link's stored bytes from elsewhere (the remote store); by default the volume's file. Check
    chain_of first, before anything is written. A link read back damaged raises DamagedBase naming it."""
    chain, problem = chain_of(backups, backup)
    if problem:
        raise SidecarError(problem)
    for link in chain:  # a missing identity file stops here, before anything is written (not taken for damage)
        identities(config, link.metadata)
    if len(chain) == 1:
        _extract(config, backup, tar.Extractor(directory, None), directory / "backup_manifest", source, "")
        return
    tool = find_tool("pg_combinebackup", config.pg_bin_dir)
    scratch = Path(tempfile.mkdtemp(prefix=".combine-", dir=directory.parent))
    try:
        parts = []
        for link in chain:
            part = scratch / link.id
            part.mkdir(mode=0o700)
            checked = scratch / f"{link.id}.manifest"  # a copy to check against; the part keeps its backup_manifest for pg_combinebackup
            _extract(config, link, tar.Extractor(part, checked), checked, source, f" (of the chain of {backup.id})")
            tar.fix_modes(part)
            parts.append(str(part))
        directory.rmdir()  # pg_combinebackup makes the output directory
        child = Child([tool, *parts, "-o", str(directory)], {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"})
        try:
            assert child.proc.stdout is not None
            child.proc.stdout.read()
            child.check("pg_combinebackup")
        finally:
            directory.mkdir(mode=0o700, exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _extract(config: Config, link: BaseBackup, extractor: tar.Extractor, manifest: Path, source: Callable[[BaseBackup], Any] | None,
             of: str) -> None:
    from sidecar.storage.base import StorageError

    try:
        problems = read_base(config, link, extractor, manifest, source=None if source is None else source(link))
    except StorageError:
        raise  # the store failed (unreachable, credentials): not a damaged backup
    except SidecarError as exc:  # decryption, decompression, the tar stream
        problems = [str(exc)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedBase(link.id, f"base backup {link.id}{of} is damaged: {problems[0]}{more}")


def verify_base_backup(config: Config, ref: str) -> tuple[str, list[str], list[str]]:
    """(id, problems, notes): sha256 of the stored file, then every file in the tar against the manifest."""
    backup = get_base_backup(config, ref)
    if backup.status not in ("ok", "waiting-for-wal"):
        return backup.id, [f"{backup.status}: {backup.problem}"], []
    digest, _ = streams.file_sha256(base_dir(config) / backup.metadata["files"]["base"]["name"])
    if digest != backup.metadata["files"]["base"]["checksum"]:
        return backup.id, [f"{backup.metadata['files']['base']['name']}: sha256 differs from the metadata; the base backup is damaged"], []
    manifest_tmp = base_dir(config) / f".{backup.id}.verify.manifest.tmp"
    keeper = tar.Keeper(manifest_tmp, hashing=True)
    problems = read_base(config, backup, keeper, manifest_tmp)
    notes = [f"sha256 matches; {len(keeper.digests)} files checked against backup_manifest"] if not problems else []
    if backup.metadata.get("parent"):  # an incremental restores only with its chain: every link is there and usable
        links, broken = chain_of(list_base_backups(config), backup)
        if broken:
            problems.append(broken)
        else:
            notes.append(f"incremental: its chain {' <- '.join(link.id for link in links)} is there (verify each with 'verify --base ID')")
    if backup.status == "waiting-for-wal":
        notes.append(f"waiting for WAL: {backup.problem}")
    return backup.id, problems, notes


# --- retention of base backups and of the WAL they need (the decisions: sidecar.retention) ----------------------------

@dataclass
class PhysicalPruneReport:
    """What `prune` did (or, in a dry run, would do) to base backups and the WAL archive."""

    decisions: list[dict[str, str]] = field(default_factory=list)  # {id, action, reason}, newest first
    deleted: list[str] = field(default_factory=list)                # base backup ids
    wal_deleted: dict[str, int] = field(default_factory=dict)        # "<system>/<timeline>" -> segments deleted
    wal_kept_from: dict[str, str] = field(default_factory=dict)      # system -> the oldest segment kept (the cutoff)
    not_removed: list[str] = field(default_factory=list)            # "path: reason" for files that could not be removed
    remote: Any = None  # sidecar.physical.offsite.RemotePhysicalPrune, with a remote store
    busy: str | None = None  # why nothing was pruned this time (a point-in-time restore is reading the archive)

    @property
    def empty(self) -> bool:
        return not self.decisions and not self.wal_deleted


def base_facts(backup: BaseBackup) -> BaseFacts:
    """The retention facts of a listed base backup (pure)."""
    meta = backup.metadata
    if not meta:
        return BaseFacts(backup.id, backup.status)
    try:
        size = int(meta["walSegmentSize"])
        finished = datetime.fromisoformat(str(meta["finishedAt"]).replace("Z", "+00:00"))
        return BaseFacts(backup.id, backup.status, finished, str(meta["systemIdentifier"]), segment_of(parse_lsn(meta["startLsn"]), size),
                         bool(meta.get("keep")), str(meta.get("parent") or ""))
    except (KeyError, ValueError, TypeError):
        return BaseFacts(backup.id, "unreadable-metadata")


def chain_facts(backups: list[BaseBackup]) -> list[BaseFacts]:
    """The retention facts of listed base backups (on the volume or the remote), an incremental whose chain is broken there
    (a link missing or unusable) as `broken-chain`: not good, so it is never the newest good one that retention keeps
    in place of a full one that still restores."""
    facts = []
    for backup in backups:
        fact = base_facts(backup)
        if fact.good and backup.metadata.get("parent") and chain_of(backups, backup)[1]:
            fact = replace(fact, status="broken-chain")
        facts.append(fact)
    return facts


def _remove(path: Path, report: PhysicalPruneReport) -> bool:
    """Remove one file; a file that cannot be removed (read-only, immutable, busy) is reported, never fatal."""
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as exc:
        report.not_removed.append(f"{path}: {exc.strerror or exc}")
        log.warning("cannot remove %s (%s); remove it by hand", path, exc.strerror or exc, extra={"event": "prune_not_removed"})
        return False
    return True


def prune_physical(config: Config, dry_run: bool = False, now: datetime | None = None) -> PhysicalPruneReport:
    """Delete the base backups retention lets go (BASE_BACKUP_RETENTION_DAYS), then, per system, the WAL segments below the
    start of its oldest base backup kept. The caller holds the volume lock (base backups are taken under it); the
    receiver only ever adds segments above every cutoff, so it can run meanwhile."""
    moment = now or datetime.now(UTC)
    report = PhysicalPruneReport()
    directory = base_dir(config)
    backups = list_base_backups(config)
    facts = chain_facts(backups)
    hold: dict[str, str] = {}
    marks: dict[tuple[str, int], int] | None = None
    if config.remote is not None:  # nothing leaves the volume before it is off-site
        from sidecar.physical.offsite import copied_marks

        copied, marks = copied_marks(config)
        hold = {b.id: "not off-site yet" for b in backups if b.status in ("ok", "waiting-for-wal") and b.id not in copied}
    decisions = classify_base(facts, config.base_backup_retention_days, moment, hold)
    by_id = {b.id: b for b in backups}
    for decision in decisions:
        report.decisions.append({"id": decision.id, "action": decision.action, "reason": decision.reason})
        if decision.action != "delete":
            continue
        report.deleted.append(decision.id)
        if dry_run:
            continue
        meta = by_id[decision.id].metadata
        name = str(meta.get("files", {}).get("base", {}).get("name", ""))
        # the metadata first: from then on it is not listed, so an interrupted prune never leaves a half base backup listed
        if _remove(directory / (decision.id + METADATA_SUFFIX), report) and name.startswith(decision.id + ".tar") and "/" not in name:
            _remove(directory / name, report)
            _remove(directory / (decision.id + MANIFEST_SUFFIX), report)
        log.info("pruned base backup %s (%s)", decision.id, decision.reason, extra={"event": "base_backup_pruned", "backup_id": decision.id})
    if directory.is_dir() and not dry_run:  # data files whose metadata is gone: a prune interrupted between the two
        listed = {b.id for b in backups if b.id not in report.deleted}
        for path in [*directory.glob("backup_*.tar*"), *directory.glob("backup_*" + MANIFEST_SUFFIX)]:
            if not path.name.endswith((".partial", ".tmp")) and path.name.split(".", 1)[0] not in listed \
                    and not (directory / (path.name.split(".", 1)[0] + METADATA_SUFFIX)).exists():
                _remove(path, report)
    archive = WalArchive(config.backup_dir)
    timelines = archive.timelines()
    cutoffs = wal_cutoffs(facts, decisions)
    doomed = wal_to_delete({(t.system_id, t.timeline): t.segnos for t in timelines}, cutoffs)
    if marks is not None:
        doomed = copied_only(doomed, marks)
    sizes = {t.system_id: t.segment_size for t in timelines}
    for system, cutoff in cutoffs.items():
        if system in sizes and cutoff is not None:
            report.wal_kept_from[system] = segment_name(1, cutoff, sizes[system])[8:]  # the segment part: the same on every timeline
    for (system, timeline), segnos in sorted(doomed.items()):
        report.wal_deleted[f"{system}/{timeline:08X}"] = len(segnos)
        if dry_run:
            continue
        for segno in segnos:
            name = segment_name(timeline, segno, sizes[system])
            tli_dir = archive.directory(system, name)
            # the record first: without it the segment is not archived (a half-deleted segment is never served)
            if _remove(tli_dir / (name + ".json"), report):
                for path in tli_dir.glob(name + ".*"):
                    _remove(path, report)
        streams.fsync_dir(archive.root / system / f"{timeline:08X}")
        log.info("pruned %d WAL segments of system %s timeline %d below %s", len(segnos), system, timeline,
                 report.wal_kept_from.get(system, "?"), extra={"event": "wal_pruned"})
    return report
