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

from sidecar import __version__, api
from sidecar.config import Config, load_config
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
    rows = [("ID", "TIMESTAMP", "SIZE", "COMPRESSION", "ENCRYPTED", "STATUS")]
    for b in backups:
        status = b.status + (" (pinned)" if b.keep else "") + (f": {b.problem}" if b.problem else "")
        rows.append((b.id, b.timestamp, human_size(b.size), b.compression or "-",
                     "-" if b.encrypted is None else ("yes" if b.encrypted else "no"), status))
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
    ls.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="check checksums and that a backup decodes to its end")
    v.add_argument("id", metavar="ID|latest")
    v.add_argument("--json", action="store_true")

    r = sub.add_parser("restore", help="restore a backup (with no id: list backups)")
    r.add_argument("id", nargs="?", metavar="ID|latest")
    r.add_argument("--target-db", help="restore into this database instead of the one in DATABASE_URL")
    r.add_argument("--in-place", action="store_true", help="drop and recreate objects in the live database (not atomic)")
    r.add_argument("--force", action="store_true", help="swap in the restored database even if its row counts differ")
    r.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="delete backups older than the retention period")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--json", action="store_true")

    un = sub.add_parser("unpin", help="release a pinned backup to retention")
    un.add_argument("id", metavar="ID")
    pin = sub.add_parser("pin", help="pin a backup so retention never deletes it")
    pin.add_argument("id", metavar="ID|latest")

    sub.add_parser("run", help="the daemon: schedule, metrics, health and the HTTP API (the container's main process)")

    dr = sub.add_parser("drill", help="restore drill: restore into a scratch database, validate, drop it, record the outcome")
    dr.add_argument("id", nargs="?", default="latest", metavar="ID|latest")
    dr.add_argument("--json", action="store_true")

    rr = sub.add_parser("restore-request", help="ask a running sidecar to restore (the Kubernetes restore Job's command)")
    rr.add_argument("id", metavar="ID|latest")
    rr.add_argument("--target-db")
    rr.add_argument("--server", required=True, help="the sidecar's URL, e.g. http://db-0.db:9188")
    rr.add_argument("--request-id", help="idempotency key (default: $RESTORE_REQUEST_ID, else random)")
    rr.add_argument("--wait", action="store_true", help="follow the restore and exit 0 only if it succeeded")
    rr.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                    help="while the sidecar is busy (a backup, drill or restore runs), ask again with backoff this long before giving up (default 3600)")

    rj = sub.add_parser("restore-job", help="print a Kubernetes restore Job manifest for kubectl apply -f -")
    rj.add_argument("id", metavar="ID|latest")
    rj.add_argument("--namespace", default="default")
    rj.add_argument("--release", default="pg-backup-sidecar", help="the Helm release name")
    rj.add_argument("--target-db")
    rj.add_argument("--image", default=None, help="the sidecar image (default: this version's)")

    va = sub.add_parser("validate", help="check data consistency now (exit 1 with findings)")
    va.add_argument("--json", action="store_true")

    vc = sub.add_parser("validate-config", help="check the configuration")
    vc.add_argument("--print", action="store_true", help="print the effective configuration, secrets masked")
    return p


def run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "validate-config":
        if args.print:
            emit(config.masked())
        else:
            print("configuration is valid")
        return OK
    if args.command == "run":
        from sidecar.daemon import run_daemon

        return run_daemon(config, args.config)
    if args.command == "drill":
        drilled = api.drill_backup(args.id, config)
        if args.json:
            emit(asdict(drilled))
        else:
            print(f"{drilled.backup_id}: restore drill {'PASSED' if drilled.ok else 'FAILED'} in {drilled.duration_seconds:.1f}s")
            for line in drilled.findings:
                print(f"  {line}")
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
    if args.command == "list" or (args.command == "restore" and not args.id):
        backups = api.list_backups(config)
        if getattr(args, "json", False):
            emit([b.to_json() for b in backups])
        else:
            print_table(backups)
        return OK
    if args.command == "verify":
        report = api.verify_backup(args.id, config)
        if args.json:
            emit(asdict(report))
        else:
            print(f"{report.backup_id}: {'OK' if report.ok else 'BAD'}")
            for line in report.problems + report.notes:
                print(f"  {line}")
        return OK if report.ok else FOUND_PROBLEM
    if args.command == "restore":
        result = api.restore_backup(args.id, config, target_db=args.target_db, in_place=args.in_place, force=args.force)
        if args.json:
            emit(asdict(result))
        else:
            findings = len(result.validation["findings"]) if result.validation else 0
            print(f"restored {result.backup_id} into {result.database} ({result.mode}, {result.duration_seconds:.1f}s, "
                  f"row counts of {result.tables_checked} tables {'checked' if not result.mismatches else 'DIFFER'}, "
                  f"{'validation off' if result.validation is None else f'{findings} validation findings'})")
            if result.previous_database:
                print(f"the previous database is kept as {result.previous_database}")
        return OK
    if args.command == "prune":
        pruned = api.prune_backups(config, dry_run=args.dry_run)
        if args.json:
            emit(asdict(pruned))
        else:
            verb = "would delete" if args.dry_run else "deleted"
            print(f"{verb} {len(pruned.deleted)}, kept {len(pruned.kept)}")
            for line in pruned.deleted:
                print(f"  {verb}: {line}")
            for line in pruned.reported:
                print(f"  not deleted: {line}")
        return OK
    if args.command in ("pin", "unpin"):
        changed = api.set_pinned(args.id, args.command == "pin", config)
        print(f"{changed.id} {'pinned' if changed.keep else 'unpinned'}")
        return OK
    raise UsageError(f"unknown command {args.command}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for the container's log collector."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


DAEMON_PID_VARIABLE = "SIDECAR_DAEMON_PID"
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: pg_dump's process group is terminated and the partial file removed
    signal.signal(signal.SIGTERM, _interrupt)
    _die_with_the_daemon()
    handler = logging.StreamHandler(sys.stderr)
    if args.command == "run" or os.environ.get("SIDECAR_LOG_FORMAT") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler])
    try:
        if args.command == "restore-job":
            import yaml

            from sidecar.jobs import restore_job

            extra = {"image": args.image} if args.image else {}
            print(yaml.safe_dump(restore_job(args.id, args.release, args.namespace, args.target_db, **extra), sort_keys=False), end="")
            return OK
        if args.command == "restore-request":
            from sidecar.client import restore_request

            return restore_request(args.server, args.id, args.target_db, args.request_id, args.wait, args.timeout)
        config = load_config(args.config)
        return run(args, config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return USAGE
    except UsageError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except SidecarError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return FAILED
    except OSError as exc:
        if args.debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the backup volume and its permissions", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written is listed, the next backup cleans up", file=sys.stderr)
        return FAILED
