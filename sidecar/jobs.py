"""Kubernetes restore Job manifests (the same Job the Helm chart renders with restore.enabled=true)."""

from __future__ import annotations

import re
import time
from typing import Any

from sidecar import __version__
from sidecar.errors import UsageError
from sidecar.repository import parse_id

CHART = "pg-backup-sidecar"


def restore_job(ref: str, release: str, namespace: str, target_db: str | None = None,
                image: str = f"ghcr.io/example/pg-backup-sidecar:{__version__}", port: int = 9188) -> dict[str, Any]:
    if ref != "latest":
        parse_id(ref)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", release) or len(release) > 40:
        raise UsageError(f"release {release!r} is not a valid Helm release name (lowercase letters, digits and '-')")
    fullname = f"{release}-{CHART}"[:63].rstrip("-")
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    args = ["restore-request", ref, "--server", f"http://{fullname}:{port}", "--wait"] + (["--target-db", target_db] if target_db else [])
    security = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{fullname}-restore-{stamp}"[:63].rstrip("-"), "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": CHART, "app.kubernetes.io/instance": release, "app.kubernetes.io/component": "restore"}},
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": 604800,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": "restore"}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "restore", "image": image, "args": args,
                        "env": [{"name": "RESTORE_REQUEST_ID", "value": f"{release}-{stamp}-{ref}"},
                                {"name": "SIDECAR_API_TOKEN_FILE", "value": "/etc/pg-backup-sidecar/api/api-token"}],
                        "securityContext": security,
                        "volumeMounts": [{"name": "api-secret", "mountPath": "/etc/pg-backup-sidecar/api", "readOnly": True}],
                    }],
                    "volumes": [{"name": "api-secret", "secret": {"secretName": f"{fullname}-api", "items": [{"key": "api-token", "path": "api-token"}]}}],
                },
            },
        },
    }
