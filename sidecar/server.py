"""HTTP: /metrics, /healthz, /readyz, and the token-protected /v1 API."""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar import api, postgres
from sidecar.errors import NotFound, SidecarError
from sidecar.repository import parse_id
from sidecar.scheduler import Daemon

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
STUCK_AFTER = 30.0


def api_token() -> str | None:
    """SIDECAR_API_TOKEN, or the contents of SIDECAR_API_TOKEN_FILE."""
    if os.environ.get("SIDECAR_API_TOKEN"):
        return os.environ["SIDECAR_API_TOKEN"]
    path = os.environ.get("SIDECAR_API_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise SidecarError(f"SIDECAR_API_TOKEN_FILE={path}: cannot read it ({exc.strerror})") from None
    return None


def make_server(daemon: Daemon, host: str, port: int, token: str | None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pg-backup-sidecar"
        protocol_version = "HTTP/1.1"  # keep-alive: a scraper reuses its connection instead of a new one (and thread) per scrape
        timeout = 30  # an idle kept-alive connection is closed after this many seconds
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

        def send(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else (json.dumps(body, indent=2, default=str) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str) -> None:
            self.send(status, {"error": message})

        def authorized(self) -> bool:
            if token is None:
                self.error(403, "the API is disabled: set SIDECAR_API_TOKEN (or SIDECAR_API_TOKEN_FILE) to enable it")
                return False
            given = self.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
                self.close_connection = True  # a POST body may still be unread
                self.send_response(401)
                self.send_header("WWW-Authenticate", "Bearer")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            self.guarded(self.get)

        def do_POST(self) -> None:  # noqa: N802
            self.guarded(self.post)

        def guarded(self, handler: Any) -> None:
            """A failing request answers 500 with one line and never stops the server."""
            try:
                handler()
            except SidecarError as exc:
                self.error(500, str(exc))
            except Exception as exc:  # a bug: log it with its traceback, keep serving
                log.exception("request %s %s failed", self.command, self.path[:100])
                self.error(500, f"internal error ({type(exc).__name__}); see the sidecar's log")

        def get(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self.send(200, generate_latest(daemon.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                age = time.monotonic() - daemon.heartbeat
                self.send(200 if age < STUCK_AFTER else 503, {"ok": age < STUCK_AFTER, "loopSecondsAgo": round(age, 1)})
            elif path == "/readyz":
                try:
                    postgres.connect(daemon.config).close()
                    self.send(200, {"ready": True})
                except SidecarError as exc:
                    self.send(503, {"ready": False, "reason": str(exc)})
            elif not self.authorized():
                return
            elif path == "/v1/backups":
                self.send(200, [b.to_json() for b in api.list_backups(daemon.config)])
            elif path.startswith("/v1/backups/"):
                try:
                    self.send(200, api.get_backup(path.rsplit("/", 1)[1], daemon.config).to_json())
                except NotFound as exc:
                    self.error(404, str(exc))
            elif path.startswith("/v1/runs/") and path.rsplit("/", 1)[1] in daemon.runs:
                self.send(200, daemon.runs[path.rsplit("/", 1)[1]])
            elif path.startswith("/v1/restores/") and path.rsplit("/", 1)[1] in daemon.restores:
                self.send(200, daemon.restores[path.rsplit("/", 1)[1]])
            else:
                self.error(404, f"no such endpoint {path[:100]}")

        def post(self) -> None:
            path = self.path.split("?", 1)[0]
            if not self.authorized():
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self.close_connection = True  # the body is not read, so the connection cannot carry another request
                if length < 0:
                    self.error(400, "Content-Length must be a non-negative integer")
                else:
                    self.error(413, f"request body over {MAX_BODY} bytes")
                return
            body = self.rfile.read(length) if length else b""
            if path == "/v1/backups":
                if body.strip() not in (b"", b"{}"):
                    self.error(400, "POST /v1/backups takes no body (or {})")
                    return
                run_id = daemon.start_backup("api")
                if run_id is None:
                    self.error(409, "a backup is already running")
                else:
                    self.send(202, {"id": run_id, "state": "running"})
            elif path == "/v1/restores":
                request = self.json_body(body, required={"backup", "request_id"}, optional={"target_db"})
                if request is None:
                    return
                status, record = daemon.request_restore(request["backup"], request.get("target_db"), request["request_id"])
                self.send(status, record)
            else:
                self.error(404, f"no such endpoint {path[:100]}")

        def json_body(self, body: bytes, required: set[str], optional: set[str]) -> dict[str, str] | None:
            """The request's JSON object with string values; 400 naming the problem otherwise."""
            try:
                data = json.loads(body)
            except ValueError:
                self.error(400, "the body is not valid JSON")
                return None
            if not isinstance(data, dict):
                self.error(400, "the body must be a JSON object")
                return None
            unknown = sorted(set(data) - required - optional)
            missing = sorted(required - set(data))
            wrong = sorted(k for k, v in data.items() if not isinstance(v, str) or not v or len(v) > 200)
            problems = [f"{label}: {', '.join(keys)}" for label, keys in (("unknown fields", unknown), ("missing fields", missing),
                        ("must be non-empty strings of at most 200 characters", wrong)) if keys]
            if problems:
                self.error(400, "; ".join(problems))
                return None
            try:
                if data["backup"] != "latest":
                    parse_id(data["backup"])
            except NotFound as exc:
                self.error(400, str(exc))
                return None
            return data

    return Server((host, port), Handler)


class Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops SYNs when a few scrapers and API clients connect at
    # once, and each dropped SYN costs the client a 1 s retransmit (seen in the soak test)
    request_queue_size = 128
