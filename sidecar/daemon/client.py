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

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_exponential

from sidecar.daemon.restores import check, describe, target_of
from sidecar.errors import SidecarError, UsageError

BUSY_TIMEOUT = 3600.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is here: following it would send the token to another address."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


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
        with _opener.open(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            where = (exc.headers.get("Location") or "nowhere")[:200]
            raise SidecarError(f"{server} answered {exc.code} redirecting to {where}; not followed (it would take the API token there): "
                               "point --server at the sidecar's own service address") from None
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else {}
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")[:200]}
    except (urllib.error.URLError, OSError) as exc:
        raise SidecarError(f"cannot reach the sidecar at {server} ({getattr(exc, 'reason', exc)}); check --server") from None


def _post_when_idle(server: str, token: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    """POST the restore; while the sidecar answers 409 (a backup, drill or restore is running), wait and
    ask again with exponential backoff, up to `timeout` seconds."""

    def waiting(state: RetryCallState) -> None:
        reply = state.outcome.result()[1] if state.outcome else {}
        pause = state.next_action.sleep if state.next_action else 0.0
        print(f"waiting: {reply.get('error', 'the sidecar is busy')} (asking again in {pause:.0f}s, for up to {timeout:.0f}s)", flush=True)

    def gave_up(state: RetryCallState) -> tuple[int, dict[str, Any]]:
        reply = state.outcome.result()[1] if state.outcome else {}
        raise SidecarError(f"the sidecar was still busy after {timeout:.0f}s ({reply.get('error', '409')}); no restore was started: "
                           "run it again when the sidecar is idle, or raise --timeout")

    retrying = Retrying(retry=retry_if_result(lambda result: result[0] == 409), stop=stop_after_delay(timeout),
                        wait=wait_exponential(multiplier=1, min=1, max=30), before_sleep=waiting, retry_error_callback=gave_up)
    result: tuple[int, dict[str, Any]] = retrying(call, server, "POST", "/v1/restores", token, body)
    return result


def request_body(ref: str | None, target_db: str | None = None, request_id: str | None = None, from_remote: bool = False,
                 database: str | None = None, target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The POST /v1/restores body restore-request sends, checked as the sidecar checks it (a UsageError before anything is
    sent): `ref` (a backup id or latest) or a point-in-time `target` ({to_time: ..., exclusive: true, ...})."""
    target = target_of(target or {})
    check(ref, target, target_db, database, from_remote)
    body: dict[str, Any] = {"request_id": request_id or os.environ.get("RESTORE_REQUEST_ID") or str(uuid.uuid4())}
    if ref is not None:
        body["backup"] = ref
    body.update(target)
    if target_db:
        body["target_db"] = target_db
    if database:
        body["database"] = database
    if from_remote:
        body["from_remote"] = True
    return body


def restore_request(server: str, ref: str | None, target_db: str | None, request_id: str | None, wait: bool, timeout: float = BUSY_TIMEOUT,
                    from_remote: bool = False, database: str | None = None, target: dict[str, Any] | None = None) -> int:
    from sidecar.daemon.server import api_token

    if timeout < 0:
        raise UsageError(f"--timeout {timeout:g}: must be 0 or more seconds")
    token = api_token()
    if not token:
        raise UsageError("set SIDECAR_API_TOKEN (or SIDECAR_API_TOKEN_FILE) to the sidecar's API token")
    body = request_body(ref, target_db, request_id, from_remote, database, target)
    status, reply = _post_when_idle(server, token, body, timeout)
    if status in (400, 422):  # a request the sidecar cannot take (a bad target, say), or a request id used for another restore
        raise UsageError(str(reply.get("error", reply)))
    if status not in (200, 202):
        raise SidecarError(f"the sidecar refused the restore ({status}): {reply.get('error', reply)}")
    restore_id = reply["id"]
    what = describe(body.get("backup"), target_of(body), body.get("database"))
    print(f"restore {restore_id} of {what}{' from the remote store' if reply.get('from_remote') else ''}: {reply['state']}", flush=True)
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
            databases = reply.get("databases")
            if databases:  # a whole server's set: what did come back
                print(json.dumps(databases, indent=2))
            print(f"error: restore {restore_id} failed: {reply.get('error')}", file=sys.stderr)
            return 3
        time.sleep(1)
