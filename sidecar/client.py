"""`pg-backup-sidecar restore-request`: the Kubernetes restore Job's client of the sidecar's API."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from sidecar.errors import SidecarError, UsageError


def call(server: str, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        req = urllib.request.Request(server.rstrip("/") + path, data=data, method=method)
    except ValueError:
        raise UsageError(f"--server {server!r} is not a URL; e.g. http://my-release-pg-backup-sidecar:9188") from None
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else {}
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")[:200]}
    except (urllib.error.URLError, OSError) as exc:
        raise SidecarError(f"cannot reach the sidecar at {server} ({getattr(exc, 'reason', exc)}); check --server") from None


def restore_request(server: str, ref: str, target_db: str | None, request_id: str | None, wait: bool) -> int:
    from sidecar.server import api_token

    token = api_token()
    if not token:
        raise UsageError("set SIDECAR_API_TOKEN (or SIDECAR_API_TOKEN_FILE) to the sidecar's API token")
    body: dict[str, Any] = {"backup": ref, "request_id": request_id or os.environ.get("RESTORE_REQUEST_ID") or str(uuid.uuid4())}
    if target_db:
        body["target_db"] = target_db
    status, reply = call(server, "POST", "/v1/restores", token, body)
    if status not in (200, 202):
        raise SidecarError(f"the sidecar refused the restore ({status}): {reply.get('error', reply)}")
    restore_id = reply["id"]
    print(f"restore {restore_id} of {ref}: {reply['state']}", flush=True)
    if not wait:
        return 0
    last = None
    while True:
        status, reply = call(server, "GET", f"/v1/restores/{restore_id}", token)
        if status != 200:
            raise SidecarError(f"lost the restore {restore_id} ({status}): {reply.get('error', reply)}")
        if reply["state"] != last:
            last = reply["state"]
            print(f"restore {restore_id}: {last}", flush=True)
        if reply["state"] == "succeeded":
            print(json.dumps(reply.get("result"), indent=2))
            return 0
        if reply["state"] == "failed":
            print(f"error: restore {restore_id} failed: {reply.get('error')}", file=sys.stderr)
            return 3
        time.sleep(1)
