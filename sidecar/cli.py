"""Argument parsing and exit codes only; every operation is a call into sidecar.api.

Exit codes: 0 success; 1 a check found a problem; 2 usage or configuration error; 3 the operation failed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sidecar import __version__, api, logs
from sidecar.config import Config, load_config, unknown_variables
from sidecar.daemon import DAEMON_PID_VARIABLE
from sidecar.errors import ConfigError, SidecarError, UsageError

OK, FOUND_PROBLEM, USAGE, FAILED = 0, 1, 2, 3


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def print_table(backups: list[api.Backup]) -> None:
    if not backups:
        print("no backups yet")
        return
    rows = [("ID", "TIMESTAMP", "SIZE", "COMPRESSION", "ENCRYPTED", "DRILL", "VALIDATION", "STATUS")]
    for b in backups:
        status = b.status + (" (pinned)" if b.keep else "") + (f": {b.problem}" if b.problem else "")
        rows.append((b.id, b.timestamp, human_size(b.size), b.compression or "-",
                     "-" if b.encrypted is None else ("yes" if b.encrypted else "no"),
                     b.drill if b.metadata else "-", b.validation if b.metadata else "-", status))
        databases = (b.metadata or {}).get("databases")
        for item in databases if isinstance(databases, list) else []:  # a whole server's set: one line per database
            findings = len((item.get("validation") or {}).get("findings") or [])
            rows.append(("  " + str(item.get("name")), "", human_size(item.get("size")), "", "", "",
                         "not run" if item.get("validation") is None else f"{findings} findings" if findings else "clean", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


def emit(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pg-backup-sidecar", description="PostgreSQL backups that provably restore.")
    p.add_argument("--config", help="config.yaml path (default: $SIDECAR_CONFIG)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"pg-backup-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("backup", help="take a backup now (then prune)")
    b.add_argument("--label", help="free text stored in the metadata")
    b.add_argument("--keep", action="store_true", help="pin it: retention never deletes it (e.g. before a migration)")
    b.add_argument("--json", action="store_true", help="print the metadata instead of the id")

    ls = sub.add_parser("list", help="list backups, newest first")
    ls.add_argument("--remote", action="store_true", help="the backups in the remote store (BACKUP_REMOTE_URL) instead of the volume")
    ls.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="check checksums and that a backup decodes to its end")
    v.add_argument("id", metavar="ID|latest")
    v.add_argument("--remote", action="store_true", help="read back every object of the remote copy and check its sha256 and size")
    v.add_argument("--json", action="store_true")

    cp = sub.add_parser("copy", help="copy backups to the remote store: every pending one (default), or one by id")
    cp.add_argument("id", nargs="?", default="pending", metavar="ID|latest|pending")
    cp.add_argument("--json", action="store_true")

    r = sub.add_parser("restore", help="restore a backup (with no id: list backups)")
    r.add_argument("id", nargs="?", metavar="ID|latest")
    r.add_argument("--target-db", help="restore into this database instead of the one in DATABASE_URL")
    r.add_argument("--database", metavar="NAME", help="of a whole server's backup set (BACKUP_DATABASES), restore only this database")
    r.add_argument("--in-place", action="store_true", help="drop and recreate objects in the live database (not atomic)")
    r.add_argument("--force", action="store_true", help="swap in the restored database even if its row counts differ")
    r.add_argument("--from-remote", action="store_true", help="stream the backup straight from the remote store (BACKUP_REMOTE_URL), not the volume")
    r.add_argument("--json", action="store_true")

    pv = sub.add_parser("previous", help="the <db>__pre_restore_* databases earlier restores kept, and which restore.keep_previous_* gives up")
    pv.add_argument("--prune", action="store_true", help="drop the ones restore.keep_previous_count / keep_previous_days give up")
    pv.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="delete backups older than the retention period")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--json", action="store_true")

    un = sub.add_parser("unpin", help="release a pinned backup to retention")
    un.add_argument("id", metavar="ID")
    un.add_argument("--base", action="store_true", help="ID is a base backup (the default when it names one)")
    pin = sub.add_parser("pin", help="pin a backup so retention never deletes it")
    pin.add_argument("id", metavar="ID|latest")
    pin.add_argument("--base", action="store_true", help="ID|latest is a base backup (and the WAL from its start): retention keeps them")

    sub.add_parser("run", help="the daemon: schedule, metrics, health and the HTTP API (the container's main process)")

    dr = sub.add_parser("drill", help="restore drill: restore into a scratch database, validate, drop it, record the outcome")
    dr.add_argument("id", nargs="?", default="latest", metavar="ID|latest")
    dr.add_argument("--from-remote", action="store_true", help="stream the backup from the remote store (as DRILL_FROM_REMOTE=true): proves the off-site copy restores")
    dr.add_argument("--pitr", action="store_true", help="a point-in-time recovery drill: a restore point with the row counts at it, restored "
                    "from base backup + archived WAL into a scratch server, the counts compared (needs WAL archiving)")
    dr.add_argument("--json", action="store_true")

    rr = sub.add_parser("restore-request", help="ask a running sidecar to restore (the Kubernetes restore Job's command)")
    rr.add_argument("id", nargs="?", metavar="ID|latest", help="the backup to restore; leave it out with a point-in-time target (--to-*)")
    rr.add_argument("--target-db")
    _restore_target_options(rr)
    rr.add_argument("--from-remote", action="store_true", help="the sidecar streams the backup from its remote store (BACKUP_REMOTE_URL), not the volume")
    rr.add_argument("--server", required=True, help="the sidecar's URL, e.g. http://db-0.db:9188")
    rr.add_argument("--request-id", help="idempotency key (default: $RESTORE_REQUEST_ID, else random)")
    rr.add_argument("--wait", action="store_true", help="follow the restore and exit 0 only if it succeeded")
    rr.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                    help="while the sidecar is busy (a backup, drill or restore runs), ask again with backoff this long before giving up (default 3600)")

    rj = sub.add_parser("restore-job", help="print a Kubernetes restore Job manifest for kubectl apply -f -")
    rj.add_argument("id", nargs="?", metavar="ID|latest", help="the backup to restore; leave it out with a point-in-time target (--to-*)")
    rj.add_argument("--namespace", default="default")
    rj.add_argument("--release", default="pg-backup-sidecar", help="the Helm release name")
    rj.add_argument("--target-db")
    _restore_target_options(rj)
    rj.add_argument("--from-remote", action="store_true", help="restore from the sidecar's remote store (BACKUP_REMOTE_URL), not the volume")
    rj.add_argument("--image", default=None, help="the sidecar image (default: this version's)")
    rj.add_argument("--request-id", help="names the Job and is its idempotency key (default: the current UTC time); the same id never restores twice")

    va = sub.add_parser("validate", help="check data consistency now (exit 1 with findings)")
    va.add_argument("--json", action="store_true")

    vc = sub.add_parser("validate-config", help="check the configuration's syntax (warns on unknown variables) and that the remote store, if any, is usable")
    vc.add_argument("--print", action="store_true", help="print the effective configuration, secrets masked")

    # --- physical: base backups, WAL archiving, point-in-time restore (issue 13) ---
    bb = sub.add_parser("base-backup", help="take a base backup (pg_basebackup) for point-in-time recovery; good once its WAL is archived")
    bb.add_argument("--json", action="store_true")
    kind = bb.add_mutually_exclusive_group()
    kind.add_argument("--incremental", action="store_true", default=None,
                      help="PostgreSQL 17+ (summarize_wal = on): only the blocks changed since the newest base backup")
    kind.add_argument("--full", dest="incremental", action="store_false", help="a full one whatever BASE_BACKUP_FULL_EVERY says")
    sub.add_parser("wal-receive", help="stream WAL (pg_receivewal, replication slot) into the archive until stopped (foreground)")
    wf = sub.add_parser("wal-fetch", help="restore_command helper: an archived WAL file into DEST (exit 1: not archived; 126: damaged)")
    wf.add_argument("segment", metavar="SEGMENT")
    wf.add_argument("dest", metavar="DEST")
    wf.add_argument("--backup-dir", help="the backup volume (default: $BACKUP_DIR, else ./backups)")
    wf.add_argument("--system-id", help="the system identifier whose WAL to read (needed when the archive holds several)")
    wf.add_argument("--identity-file", help="age secret key file for encrypted WAL (default: $BACKUP_ENCRYPTION_IDENTITY_FILE)")
    wf.add_argument("--spool-dir", help="the receiver's spool, read for a segment not archived yet (default: $WAL_SPOOL_DIR, else BACKUP_DIR/wal/spool)")
    r.add_argument("--to-time", metavar="T", help="point-in-time restore to T (ISO 8601 with a time zone, e.g. 2026-11-26T14:32:05Z)")
    r.add_argument("--to-lsn", metavar="LSN", help="point-in-time restore to this WAL position (e.g. 0/3000028)")
    r.add_argument("--to-latest", action="store_true", help="point-in-time restore to the end of the archived WAL")
    r.add_argument("--to-restore-point", metavar="NAME", help="point-in-time restore to a restore point made with pg_create_restore_point(NAME)")
    r.add_argument("--to-xid", metavar="N", help="point-in-time restore to the end of transaction N (txid_current() modulo 2^32)")
    r.add_argument("--exclusive", action="store_true", help="stop just before the --to-time/--to-lsn/--to-xid target (default: just after, as PostgreSQL)")
    r.add_argument("--timeline", metavar="N|latest|current", help="the timeline to recover along (default latest; current: the base backup's)")
    r.add_argument("--into-data-dir", metavar="DIR", help="write a data directory (new or empty) that recovers to the target when a server starts on it")
    r.add_argument("--stage-wal", action=argparse.BooleanOptionalAction, default=None,
                   help="copy the WAL recovery needs into DIR/pg_wal (self-contained; default when running as root) instead of restore_command = wal-fetch")
    r.add_argument("--table", action="append", metavar="SCHEMA.NAME",
                   help="restore only this table (repeat for more), beside the live one under a new name (--as-suffix), from the backup ID "
                        "(of a whole server's set: with --database NAME, into that database) or as it was at the --to-* target; with "
                        "--from-remote read from the remote store alone")
    r.add_argument("--as-suffix", metavar="SUFFIX", help="with --table: the restored tables' names get this suffix (default _pitr for a "
                                                         "point in time, _restored for a backup; none with --target-db)")
    pt = sub.add_parser("pitr", help="point-in-time recovery helpers: find the moment to restore to")
    pts = pt.add_subparsers(dest="pitr_command", required=True, metavar="SUBCOMMAND")
    fd = pts.add_parser("find", help="the transaction that dropped, emptied or last wrote to a table, from the archived WAL, and the "
                                     "restore command that stops just before it (exit 1: not found)")
    what = fd.add_mutually_exclusive_group(required=True)
    what.add_argument("--dropped-table", metavar="SCHEMA.NAME", help="the transaction that dropped it")
    what.add_argument("--truncated-table", metavar="SCHEMA.NAME", help="the newest transaction that emptied it (TRUNCATE) or rewrote its files")
    what.add_argument("--last-write-to", metavar="SCHEMA.NAME", help="the newest committed transaction that wrote to it (with --before T)")
    fd.add_argument("--before", metavar="T", help="only transactions committed before T (ISO 8601 with a time zone)")
    fd.add_argument("--existed-at", metavar="T", help="--dropped-table: a moment the table existed (default: the end of the newest base "
                                                      "backup that has it)")
    fd.add_argument("--json", action="store_true")
    ls.add_argument("--base", action="store_true", help="base backups (point-in-time recovery) and whether their WAL is archived")
    ls.add_argument("--wal", action="store_true", help="the WAL archive per system and timeline: first and last segment, gaps")
    v.add_argument("--base", action="store_true", help="ID|latest is a base backup: sha256, then every file against its backup_manifest")

    ck = sub.add_parser("check", help="check the setup works: connection, rights, pg_dump, volume, encryption keys (exit 1 on a problem)")
    ck.add_argument("--json", action="store_true")
    return p


def _restore_target_options(p: argparse.ArgumentParser) -> None:
    """restore-request's and restore-job's options beyond the backup id: what `restore` takes, asked of the daemon."""
    p.add_argument("--database", metavar="NAME", help="of a whole server's backup set (BACKUP_DATABASES), restore only this database")
    p.add_argument("--to-time", metavar="T", help="point-in-time restore (into --target-db) to T, ISO 8601 with a time zone")
    p.add_argument("--to-lsn", metavar="LSN", help="point-in-time restore to this WAL position")
    p.add_argument("--to-latest", action="store_true", help="point-in-time restore to the end of the archived WAL")
    p.add_argument("--to-restore-point", metavar="NAME", help="point-in-time restore to a restore point (pg_create_restore_point)")
    p.add_argument("--to-xid", metavar="N", help="point-in-time restore to the end of transaction N")
    p.add_argument("--exclusive", action="store_true", help="stop just before the --to-time/--to-lsn/--to-xid target")
    p.add_argument("--timeline", metavar="N|latest|current", help="the timeline to recover along (default latest)")


def _requested_target(args: argparse.Namespace) -> dict[str, Any]:
    """The point-in-time target restore-request and restore-job were given, by the API's field names."""
    return {key: getattr(args, key) for key in ("to_time", "to_lsn", "to_latest", "to_restore_point", "to_xid", "exclusive", "timeline")
            if getattr(args, key) not in (None, False)}


def run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "validate-config":
        if config.remote:  # usable, not only well-formed: bad URL, missing bucket, credentials, unreachable endpoint
            api.check_remote(config)
        if args.print:
            emit(config.masked())
        else:
            print("configuration is valid")
        return OK
    if args.command == "check":
        setup = api.check_setup(config)
        if args.json:
            emit({**asdict(setup), "ok": setup.ok})
        else:
            for line in setup.lines():
                print(line)
        return OK if setup.ok else (FAILED if not setup.connected else FOUND_PROBLEM)
    if args.command == "run":
        from sidecar.daemon.run import run_daemon

        return run_daemon(config, args.config)
    if args.command == "drill" and args.pitr:
        if args.id != "latest" or args.from_remote:
            raise UsageError("drill --pitr restores to a restore point it creates now, from the base backups and WAL on the volume; "
                             "leave out the backup id and --from-remote")
        pitr = api.pitr_drill(config)
        if args.json:
            emit(asdict(pitr))
        else:
            verdict = "PASSED" if pitr.ok else "FAILED"
            print(f"PITR drill {verdict} in {pitr.duration_seconds:.1f}s: restore point {pitr.restore_point} ({pitr.restore_point_lsn or '-'}, "
                  f"segment {pitr.segment or '-'}), base backup {pitr.base_backup or '-'}, {pitr.tables} tables, {pitr.rows} rows"
                  + (" restored with identical counts" if pitr.ok else ""))
            if pitr.error:
                print(f"  {pitr.error}")
            for line in pitr.mismatches[1:]:
                print(f"  {line}")
        return OK if pitr.ok else FOUND_PROBLEM
    if args.command == "drill":
        drilled = api.drill_backup(args.id, config, from_remote=True if args.from_remote else None)
        if args.json:
            emit(asdict(drilled))
        else:
            verdict = "FAILED" if not drilled.ok else "SKIPPED" if drilled.skipped else "PASSED"
            where = "" if drilled.source == "volume" else f" from {drilled.source}"
            print(f"{drilled.backup_id}: restore drill{where} {verdict} in {drilled.duration_seconds:.1f}s" + (f": {drilled.skipped}" if drilled.skipped else ""))
            for line in drilled.findings:
                print(f"  {line}")
            if drilled.preexisting_findings:
                print(f"  already present when the backup was taken (not caused by the restore): {len(drilled.preexisting_findings)}")
                for line in drilled.preexisting_findings:
                    print(f"    {line}")
        return OK if drilled.ok else FOUND_PROBLEM
    if args.command == "validate":
        checked = api.validate_data_consistency(config)
        if args.json:
            emit(checked.to_json())
        else:
            print("data is consistent" if checked.is_valid else f"{len(checked.findings)} problems found")
            for finding in checked.findings:
                print(f"  {finding.check}: {finding.message}" + (f"  e.g. {', '.join(finding.sample[:3])}" if finding.sample else ""))
            print("checks took " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in checked.timings.items()))
        return OK if checked.is_valid else FOUND_PROBLEM
    if args.command == "backup":
        created = api.create_backup(config, label=args.label, keep=args.keep)
        if args.json:
            emit(created.to_json())
        else:
            print(created.id)
        return OK
    if args.command == "copy":
        copied = api.copy_offsite(args.id, config)
        if args.json:
            emit({**asdict(copied), "ok": copied.ok})
        else:
            for done in copied.copied:
                print(f"{done.id}: " + ("already complete off-site" if done.already_complete
                                          else f"copied off-site ({len(done.uploaded)} objects, {human_size(done.bytes)} written)"))
            if not copied.copied and not copied.failed:
                print("nothing to copy: every good backup is off-site" if args.id == "pending" else "nothing to copy")
        if copied.failed:
            for backup_id, error in copied.failed.items():
                print(f"error: {backup_id} not copied: {error}", file=sys.stderr)
            print(f"error: {len(copied.failed)} backups not copied, {copied.left} still pending", file=sys.stderr)
            return FAILED
        return OK
    tables = _run_tables(args, config)
    if tables is not None:
        return tables
    physical = _run_physical(args, config)
    if physical is not None:
        return physical
    if args.command == "list" or (args.command == "restore" and not args.id):
        backups = api.list_backups(config, remote=getattr(args, "remote", False) or getattr(args, "from_remote", False))
        if getattr(args, "json", False):
            emit([b.to_json() for b in backups])
        else:
            print_table(backups)
        return OK
    if args.command == "verify":
        report = api.verify_backup(args.id, config, remote=args.remote)
        if args.json:
            emit(asdict(report))
        else:
            print(f"{report.backup_id}: {'OK' if report.ok else 'BAD'}")
            for line in report.problems + report.notes:
                print(f"  {line}")
        return OK if report.ok else FOUND_PROBLEM
    if args.command == "restore":
        result = api.restore_backup(args.id, config, target_db=args.target_db, in_place=args.in_place, force=args.force, from_remote=args.from_remote,
                                    database=args.database)
        if isinstance(result, api.SetRestoreReport):
            if args.json:
                emit(asdict(result))
            else:
                for one in result.restored:
                    print(f"restored {result.backup_id} database {one.database} ({one.mode}, {one.duration_seconds:.1f}s, "
                          f"row counts of {one.tables_checked} tables {'checked' if not one.mismatches else 'DIFFER'})"
                          + (f"; the previous database is kept as {one.previous_database}" if one.previous_database else ""))
                print(f"restored {len(result.restored)} databases of {result.backup_id} in {result.duration_seconds:.1f}s")
            return OK
        if args.json:
            emit(asdict(result))
        else:
            known = len(result.preexisting_findings)
            findings = f"{len(result.new_findings)} new validation findings" + (f", {known} already present at backup time" if known else "")
            print(f"restored {result.backup_id} into {result.database} ({result.mode}, {result.duration_seconds:.1f}s, "
                  f"row counts of {result.tables_checked} tables {'checked' if not result.mismatches else 'DIFFER'}, "
                  f"{'validation off' if result.validation is None else findings})")
            for line in result.new_findings:
                print(f"  new: {line}")
            for line in result.preexisting_findings:
                print(f"  already present when the backup was taken (not caused by the restore): {line}")
            if result.ended_sessions:
                from sidecar.logical.restore import _summary

                print(f"ended {len(result.ended_sessions)} sessions on {result.database} to swap: {_summary(result.ended_sessions)}")
            if result.previous_database:
                print(f"the previous database is kept as {result.previous_database}")
        return OK
    if args.command == "previous":
        from sidecar.logical.restore import manage_previous

        previous = manage_previous(config, prune=args.prune)
        if args.json:
            emit([asdict(item) for item in previous])
        elif not previous:
            print("no previous databases kept")
        for item in [] if args.json else previous:
            verb = ("dropped" if args.prune else "would drop") if item.action == "drop" else "kept"
            print(f"{item.name}  replaced {item.replaced_at}  {human_size(item.size)}  {verb}")
        return OK
    if args.command == "prune":
        pruned = api.prune_backups(config, dry_run=args.dry_run)
        if args.json:
            emit(asdict(pruned))
        else:
            verb = "would delete" if args.dry_run else "deleted"
            actions = {"delete": verb, "keep": "keep", "report": "not deleted"}
            if pruned.volume:
                print(f"{verb} {len(pruned.deleted)}, kept {len(pruned.kept)}")
                for decision in pruned.decisions:
                    if args.dry_run or decision["action"] != "keep":  # a dry run shows why each backup stays or goes
                        print(f"  {actions[decision['action']]}: {decision['id']}: {decision['reason']}")
            if pruned.remote is not None and pruned.remote.error is None:  # the remote side, when one is configured
                remote = pruned.remote
                locked = f", {len(remote.kept_by_lock)} kept by lock" if remote.kept_by_lock else ""
                leftovers = f", {len(remote.leftovers)} leftover objects {'to remove' if args.dry_run else 'removed'}" if remote.leftovers else ""
                print(f"remote {remote.store}: {verb} {len(remote.deleted)}, kept {len(remote.kept)}{locked}{leftovers}")
                for decision in remote.decisions:
                    if decision["id"] in remote.kept_by_lock and decision["id"] not in remote.deleted:
                        print(f"  kept by lock: {decision['id']}: {remote.kept_by_lock[decision['id']]}")
                    elif args.dry_run or decision["action"] != "keep":
                        print(f"  {actions[decision['action']]}: {decision['id']}: {decision['reason']}")
                for name in remote.leftovers:
                    print(f"  {'would remove' if args.dry_run else 'removed'} leftover: {name}")
        if pruned.physical is not None and not args.json:
            _print_physical_prune(pruned.physical, args.dry_run)
        failed = pruned.remote is not None and pruned.remote.error is not None
        if pruned.remote is not None and pruned.remote.error is not None:
            print(f"error: remote not pruned: {pruned.remote.error}", file=sys.stderr)
        remote_physical = pruned.physical.remote if pruned.physical is not None else None
        if remote_physical is not None and remote_physical.error is not None and args.json:  # said in the text above otherwise
            print(f"error: base backups and WAL on the remote not pruned: {remote_physical.error}", file=sys.stderr)
        return FAILED if failed or (remote_physical is not None and remote_physical.error is not None) else OK
    if args.command in ("pin", "unpin") and (args.base or api.is_base_backup(args.id, config)):
        base = api.set_base_pinned(args.id, args.command == "pin", config)
        print(f"base backup {base['id']} {'pinned' if base.get('keep') else 'unpinned'}")
        return OK
    if args.command in ("pin", "unpin"):
        changed = api.set_pinned(args.id, args.command == "pin", config)
        print(f"{changed.id} {'pinned' if changed.keep else 'unpinned'}")
        return OK
    raise UsageError(f"unknown command {args.command}")


def _print_physical_prune(report: Any, dry_run: bool) -> None:
    """The base backups and WAL part of `prune` (point-in-time recovery)."""
    verb = "would delete" if dry_run else "deleted"
    kept = sum(1 for d in report.decisions if d["action"] == "keep")
    wal = sum(report.wal_deleted.values())
    if report.busy:
        print(f"base backups and WAL: not pruned this time ({report.busy}); the next prune will")
    else:
        print(f"base backups: {verb} {len(report.deleted)}, kept {kept}; WAL: {verb} {wal} segments")
    for decision in report.decisions:
        if dry_run or decision["action"] != "keep":
            print(f"  {verb if decision['action'] == 'delete' else decision['action']}: base {decision['id']}: {decision['reason']}")
    for system, segment in report.wal_kept_from.items():
        print(f"  WAL of system {system} kept from segment {segment} on (the start of its oldest base backup kept)")
    for line in report.not_removed:
        print(f"warning: not removed: {line}", file=sys.stderr)
    remote = report.remote
    if remote is not None:
        locked = f", {len(remote.kept_by_lock)} objects kept by lock" if remote.kept_by_lock else ""
        print(f"remote base backups: {verb} {len(remote.deleted)}, kept {len(remote.kept)}; WAL: {verb} {remote.wal_deleted} segments{locked}")
        for name in remote.leftovers:
            print(f"  {'would remove' if dry_run else 'removed'} leftover: {name}")
        if remote.error:
            print(f"error: base backups and WAL on the remote not pruned: {remote.error}", file=sys.stderr)


def _pitr_requested(args: argparse.Namespace) -> bool:
    return args.command == "restore" and bool(args.to_time or args.to_lsn or args.to_latest or args.into_data_dir or args.stage_wal is not None
                                              or args.to_restore_point or args.to_xid or args.exclusive or args.timeline)


def _window_line(w: dict[str, Any]) -> str:
    if not w.get("earliest"):
        return "not recoverable: no good base backup reaches this timeline's WAL (take one: pg-backup-sidecar base-backup)"
    if not w.get("latest"):
        latest = f"the end of {w['latestSegment']} (no commit found in its newest segments; --to-latest)"
    elif w.get("latestBasis") == "archived-at":
        latest = f"at most {w['latest']} (when {w['latestSegment']} was archived; its commit times cannot be read here)"
    else:
        latest = f"{w['latest']} (the last commit archived, in {w['latestSegment']}: --to-time reaches moments before it, --to-latest it)"
    return f"recoverable from {w['earliest']} (end of base backup {w['earliestBaseBackup']}) to {latest}"


def _pitr_target(args: argparse.Namespace) -> dict[str, Any]:
    return {"to_restore_point": args.to_restore_point, "to_xid": args.to_xid, "exclusive": args.exclusive, "timeline": args.timeline}


def _run_physical(args: argparse.Namespace, config: Config) -> int | None:
    """The commands of point-in-time recovery (issue 13); None for every other command."""
    if args.command == "base-backup":
        meta = api.create_base_backup(config, incremental=args.incremental)
        if args.json:
            emit(meta)
        else:
            print(meta["id"])
        return OK
    if args.command == "wal-receive":
        return api.receive_wal(config)
    if args.command == "list" and args.wal:
        timelines = api.wal_timelines(config)
        windows = {(w["systemIdentifier"], w["timeline"]): w for w in api.recovery_window(config)}
        for t in timelines:
            w = windows.get((t["systemIdentifier"], t["timeline"]), {})
            t["recoveryWindow"] = {k: w.get(k) for k in ("earliest", "earliestBaseBackup", "latest", "latestBasis", "latestSegment")}
        if args.json:
            emit(timelines)
        elif not timelines:
            print("no WAL archived yet")
        for t in [] if args.json else timelines:
            gaps = f"  GAP: {', '.join(t['gaps'])} missing" if t["gaps"] else ""
            print(f"system {t['systemIdentifier']} timeline {t['timeline']}: {t['segments']} segments {t['first']}..{t['last']}{gaps}")
            print("  " + _window_line(t["recoveryWindow"]))
        return OK
    if args.command == "list" and args.base:
        backups = api.list_base_backups(config)
        if args.json:
            emit(backups)
        elif not backups:
            print("no base backups yet")
        for b in [] if args.json else backups:
            status = b["status"] + (" (pinned)" if b.get("keep") else "") + (f": {b['problem']}" if b["problem"] else "")
            print(f"{b['id']}  {human_size(b.get('size'))}  LSN {b.get('startLsn', '-')}..{b.get('endLsn', '-')} timeline {b.get('timeline', '-')}  {status}")
        return OK
    if args.command == "verify" and (args.base or api.is_base_backup(args.id, config)):
        report = api.verify_base_backup(args.id, config)
        if args.json:
            emit(asdict(report))
        else:
            print(f"{report.backup_id}: {'OK' if report.ok else 'BAD'}")
            for line in report.problems + report.notes:
                print(f"  {line}")
        return OK if report.ok else FOUND_PROBLEM
    if _pitr_requested(args):
        if args.id or args.in_place or args.force or args.database:
            raise UsageError("--to-time/--to-lsn/--to-restore-point/--to-xid/--to-latest restore DATABASE_URL's database from base backups "
                             "and WAL; leave out the backup id, --database, --in-place and --force")
        if args.from_remote and args.stage_wal is False:
            raise UsageError("--from-remote stages the WAL into the data directory (the server cannot read the bucket); leave out --no-stage-wal")
        if args.target_db is not None:
            if args.into_data_dir or args.stage_wal is not None:
                raise UsageError("--target-db and --into-data-dir are two kinds of point-in-time restore; give one")
            restored = api.restore_to_point_in_database(config, args.to_time, args.to_lsn, args.to_latest, args.target_db,
                                                        from_remote=args.from_remote, **_pitr_target(args))
            if args.json:
                emit(asdict(restored))
            else:
                point = args.to_time or args.to_lsn or (args.to_restore_point and f"restore point {args.to_restore_point}") or (
                    args.to_xid and f"transaction {args.to_xid}") or "the latest WAL"
                print(f"restored {config.database_name} as of {point} into {restored.database} "
                      f"({restored.mode}, {restored.duration_seconds:.1f}s, row counts of {restored.tables_checked} tables checked)")
                if restored.previous_database:
                    print(f"the previous database is kept as {restored.previous_database}")
            return OK
        if not args.into_data_dir:
            raise UsageError("point-in-time restore needs --into-data-dir DIR (a new or empty directory) or --target-db NAME")
        from pathlib import Path

        result = api.restore_to_point(config, args.to_time, args.to_lsn, args.to_latest, Path(args.into_data_dir), args.stage_wal,
                                      from_remote=args.from_remote, **_pitr_target(args))
        if args.json:
            emit(result)
        else:
            from sidecar.physical.pitr import start_hint

            print(f"wrote {result['dataDir']} from base backup {result['baseBackup']} with {result['walSegments']} WAL segments"
                  f"{' (staged in pg_wal)' if result['walStaged'] else ''}, recovering to {result['target']}")
            print(start_hint(result))
        return OK
    return None


def _run_tables(args: argparse.Namespace, config: Config) -> int | None:
    """`restore --table` (from a backup or a point in time) and `pitr find` (issue 16); None for every other command."""
    if args.command == "pitr":
        table = args.dropped_table or args.truncated_table or args.last_write_to
        kind = "dropped" if args.dropped_table else "truncated" if args.truncated_table else "last-write"
        if args.existed_at and kind != "dropped":
            raise UsageError("--existed-at goes with --dropped-table (the table of the others is in the live database)")
        if kind == "last-write" and not args.before:
            raise UsageError("--last-write-to needs --before T: the newest write before T")
        from sidecar.physical.find import NothingFound

        try:
            moment = api.find_moment(config, table, kind, args.before, args.existed_at)
        except NothingFound as exc:
            return _fail(args, FOUND_PROBLEM, [f"not found: {exc}"])
        if args.json:
            emit(moment.to_json())
        else:
            print(f"transaction {moment.xid} {moment.what}: committed at {moment.committed_at} (LSN {moment.lsn}, WAL segment {moment.segment})")
            print(f"recovery target just before it: --to-xid {moment.xid} --exclusive")
            print(f"  {moment.restore_command()}")
            if not moment.archived:
                print(f"note: segment {moment.segment} is the receiver's newest, not archived yet: a restore reaches it once it is; complete it "
                      "with SELECT pg_switch_wal() on the server, and see 'list --wal'")
        return OK
    if args.command != "restore" or not (args.table or args.as_suffix is not None):
        return None
    if not args.table:
        raise UsageError("--as-suffix goes with --table schema.name")
    if args.in_place or args.force or args.into_data_dir or args.stage_wal is not None:
        raise UsageError("--table restores tables beside the live ones: leave out --in-place, --force, --into-data-dir and --stage-wal")
    point = bool(args.to_time or args.to_lsn or args.to_latest or args.to_restore_point or args.to_xid)
    if not args.id and not point:
        raise UsageError("--table needs a backup id (restore ID --table ...) or a point in time (--to-time T, --to-xid N ...)")
    if point and args.database:
        raise UsageError("--to-* restores tables of DATABASE_URL's database (the one the base backups were taken with); leave out --database "
                         "(it picks one database of a whole server's backup set: restore ID --database NAME --table S.T)")
    restored = api.restore_tables(config, args.table, args.id, suffix=args.as_suffix, target_db=args.target_db, to_time=args.to_time,
                                  to_lsn=args.to_lsn, to_latest=args.to_latest, to_restore_point=args.to_restore_point, to_xid=args.to_xid,
                                  exclusive=args.exclusive, timeline=args.timeline, from_remote=args.from_remote, database=args.database)
    if args.json:
        emit(asdict(restored))
        return OK
    for asked, name in restored.tables.items():
        print(f"restored {asked} as of {restored.source} into {restored.database} as {name} ({restored.rows[name]} rows)")
    for line in restored.left_out:
        print(f"  left out: {line}")
    for line in restored.created:
        print(f"  created: {line}")
    return OK


def _wal_fetch(args: argparse.Namespace) -> int:
    """restore_command: 0 restored, 1 not archived (recovery ends there cleanly), 126 damaged and 128 any other failure
    (PostgreSQL stops recovery on an exit code above 125 instead of taking it for 'not found')."""
    from pathlib import Path

    from sidecar.errors import ChecksumMismatch, NotFound

    backup_dir = Path(args.backup_dir or os.environ.get("BACKUP_DIR") or "./backups")
    identity = args.identity_file or os.environ.get("BACKUP_ENCRYPTION_IDENTITY_FILE")
    spool = args.spool_dir or os.environ.get("WAL_SPOOL_DIR")
    try:
        source = api.fetch_wal(backup_dir, args.segment, Path(args.dest), args.system_id, Path(identity) if identity else None,
                               Path(spool) if spool else None)
        if source != "archive":  # PostgreSQL's log shows it: WAL that has no sha256 on record went into this recovery
            what = "flushed so far (.partial)" if source == "spool-partial" else "completed, not archived yet"
            print(f"wal-fetch: {args.segment} is not archived; served the receiver's copy from its spool ({what}; its page header "
                  "checked for this system, timeline and position, no sha256 recorded)", file=sys.stderr)
    except NotFound as exc:
        print(f"wal-fetch: {exc}", file=sys.stderr)
        return FOUND_PROBLEM
    except ChecksumMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return WAL_DAMAGED
    except (SidecarError, OSError) as exc:
        print(f"error: wal-fetch {args.segment}: {exc}", file=sys.stderr)
        return WAL_FETCH_FAILED
    return OK


WAL_DAMAGED, WAL_FETCH_FAILED = 126, 128

PR_SET_PDEATHSIG = 1


def _interrupt(signum: int, frame: object) -> None:
    # once: a second SIGTERM must not cut short the clean-up the first one started (a killed daemon's
    # parent-death signal comes again as each of its threads exits)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _die_with_the_daemon() -> None:
    """An operation the daemon started gets SIGTERM (and so cleans up) if the daemon is killed, even by
    SIGKILL: it would otherwise run on unseen, holding the volume lock, after the daemon restarts."""
    parent = os.environ.pop(DAEMON_PID_VARIABLE, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the daemon died before prctl took effect
        raise SystemExit("error: the daemon that started this operation is gone")


def _refuse_empty(args: argparse.Namespace) -> None:
    """An empty value is never a default in disguise: `--target-db ""` must not mean the live database."""
    for name, value in vars(args).items():
        if isinstance(value, str) and not value.strip():
            option = "ID" if name == "id" else "--" + name.replace("_", "-")
            raise UsageError(f"{option} is empty; give a value or leave the option out")
    if (args.command == "restore" and not args.id and (args.target_db is not None or args.database is not None or args.in_place or args.force)
            and not _pitr_requested(args)):
        raise UsageError("restore options need a backup id: pg-backup-sidecar restore ID|latest [--target-db NAME] (with no id, restore lists the backups)")


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    try:
        sys.stdout.flush()  # inside the guard: a closed pipe (`list | head`) is no error
    except BrokenPipeError:
        _quiet_stdout()
    return code


def _quiet_stdout() -> None:
    """The reader of our stdout went away (`list | head`): it has what it wanted. Point stdout at /dev/null so
    the interpreter's own flush at exit stays quiet too."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: pg_dump's process group is terminated and the partial file removed
    signal.signal(signal.SIGTERM, _interrupt)
    _die_with_the_daemon()
    logs.setup(json_lines=args.command == "run" or os.environ.get("SIDECAR_LOG_FORMAT") == "json", debug=args.debug)
    try:
        _refuse_empty(args)
        if args.command == "restore-job":
            import yaml

            from sidecar.daemon.jobs import restore_job

            extra: dict[str, Any] = {"image": args.image} if args.image else {}
            if args.request_id:
                extra["request_id"] = args.request_id
            if args.from_remote:
                extra["from_remote"] = True
            job = restore_job(args.id, args.release, args.namespace, args.target_db, database=args.database, target=_requested_target(args), **extra)
            print(yaml.safe_dump(job, sort_keys=False), end="")
            return OK
        if args.command == "wal-fetch":
            return _wal_fetch(args)
        if args.command == "restore-request":
            from sidecar.daemon.client import restore_request

            return restore_request(args.server, args.id, args.target_db, args.request_id, args.wait, args.timeout, from_remote=args.from_remote,
                                   database=args.database, target=_requested_target(args))
        if args.command in ("validate-config", "check", "run"):
            for warning in unknown_variables():  # set but ignored: most likely a typo
                if args.command == "run":
                    logging.getLogger("sidecar.config").warning("%s", warning)
                else:
                    print(f"warning: {warning}", file=sys.stderr)
        config = load_config(args.config)
        return run(args, config)
    except ConfigError as exc:
        return _fail(args, USAGE, [f"config error: {problem}" for problem in exc.problems])
    except UsageError as exc:
        if args.debug:
            raise
        return _fail(args, USAGE, [f"error: {exc}"])
    except SidecarError as exc:
        if args.debug:
            raise
        return _fail(args, FAILED, [f"error: {exc}"], getattr(exc, "details", None))
    except BrokenPipeError:
        _quiet_stdout()
        return OK
    except OSError as exc:
        if args.debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(args, FAILED, [f"error: {exc.strerror or exc}{where}; check the backup volume and its permissions"])
    except KeyboardInterrupt:
        return _fail(args, FAILED, ["error: interrupted; nothing half-written is listed, the next backup cleans up"])


def _fail(args: argparse.Namespace, code: int, lines: list[str], details: dict[str, Any] | None = None) -> int:
    """One line per problem on stderr; with --json also a JSON object on stdout, so a script parsing stdout
    gets JSON whatever happened (with what did succeed of a partly failed operation: `details`)."""
    for line in lines:
        print(line, file=sys.stderr)
    if getattr(args, "json", False):
        try:
            emit({**(details or {}), "ok": False, "exitCode": code, "error": "; ".join(line.split(": ", 1)[1] for line in lines)})
        except BrokenPipeError:
            pass
    return code
