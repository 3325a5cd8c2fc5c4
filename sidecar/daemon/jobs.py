"""Kubernetes restore Job manifests (the same Job the Helm chart renders with restore.enabled=true).

A Job is one restore request: its name and the sidecar's idempotency key both come from the request id
only, so applying the same manifest again (or a retried pod) never restores twice."""

from __future__ import annotations

import re
import time
from typing import Any

from sidecar import __version__
from sidecar.daemon.restores import check, option, target_of
from sidecar.errors import UsageError
from sidecar.repository import parse_id

CHART = "pg-backup-sidecar"


def request_args(ref: str | None, server: str, target_db: str | None = None, from_remote: bool = False, database: str | None = None,
                 target: dict[str, Any] | None = None) -> list[str]:
    """The restore Job container's args: `restore-request` with the backup id or the `--to-*` options, in the order the
    chart's template writes them (helm/pg-backup-sidecar/templates/restore-job.yaml; tests/test_helm.py compares)."""
    args = ["restore-request"] + ([ref] if ref is not None else [])
    for key, value in target_of(target or {}).items():
        args += [option(key)] + ([] if value is True else [str(value)])
    args += ["--server", server, "--wait"] + (["--target-db", target_db] if target_db else [])
    args += ["--database", database] if database else []
    return args + (["--from-remote"] if from_remote else [])


KUBE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def restore_job(ref: str | None, release: str, namespace: str, target_db: str | None = None,
                image: str = f"ghcr.io/example/pg-backup-sidecar:{__version__}", port: int = 9188,
                request_id: str | None = None, from_remote: bool = False, database: str | None = None,
                target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The restore Job for one request; without request_id, a new one named after the current UTC time. `ref` (a backup
    id or latest) or a point-in-time `target` ({to_time: ..., exclusive: true, ...}, into target_db), checked as the
    sidecar checks a request; `database`: one database of a whole server's set."""
    target = target_of(target or {})
    check(ref, target, target_db, database, from_remote)
    if ref is not None and ref != "latest":
        parse_id(ref)
    if not KUBE_NAME.fullmatch(release) or len(release) > 40:
        raise UsageError(f"release {release!r} is not a valid Helm release name (lowercase letters, digits and '-')")
    fullname = f"{release}-{CHART}"[:63].rstrip("-")
    request_id = request_id if request_id is not None else time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if not KUBE_NAME.fullmatch(request_id):
        raise UsageError(f"request id {request_id!r} must be lowercase letters, digits and '-' (a Kubernetes name), e.g. 2026-11-26-orders")
    name = f"{fullname}-restore-{request_id}"
    if len(name) > 63:
        raise UsageError(f"request id {request_id!r} makes the Job name {name!r} longer than 63 characters: "
                         f"use at most {63 - len(name) + len(request_id)} characters")
    args = request_args(ref, f"http://{fullname}:{port}", target_db, from_remote, database, target)
    security = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": CHART, "app.kubernetes.io/instance": release, "app.kubernetes.io/component": "restore"},
                     "annotations": {"pg-backup-sidecar/request-id": request_id}},
        "spec": {
            "backoffLimit": 3,
            # unlike the chart's Job (removed by restore.enabled=false), nothing else deletes this one; re-applied
            # after that, it gets the existing restore's outcome from the sidecar
            "ttlSecondsAfterFinished": 604800,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": "restore"}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "restore", "image": image, "args": args,
                        "env": [{"name": "RESTORE_REQUEST_ID", "value": request_id},
                                {"name": "SIDECAR_API_TOKEN_FILE", "value": "/etc/pg-backup-sidecar/api/api-token"}],
                        "securityContext": security,
                        "volumeMounts": [{"name": "api-secret", "mountPath": "/etc/pg-backup-sidecar/api", "readOnly": True}],
                    }],
                    "volumes": [{"name": "api-secret", "secret": {"secretName": f"{fullname}-api", "items": [{"key": "api-token", "path": "api-token"}]}}],
                },
            },
        },
    }
