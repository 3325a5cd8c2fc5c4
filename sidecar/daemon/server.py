"""HTTP: /metrics, /healthz, /readyz, and the token-protected /v1 API, served by waitress.

waitress does the HTTP: it reads every request whole (header and body, chunked bodies decoded) before
the application sees it, so nothing a client sends is ever read as the next request; it caps the header
and body size, the open connections and the idle time. What it lacks is added here, thinly: a deadline
for a whole request (a client that dribbles a header line a second is cut off), a refusal of ambiguous
framing (both Content-Length and Transfer-Encoding; Transfer-Encoding on HTTP/1.0), and errors as JSON.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask

from sidecar import api, postgres
from sidecar.config import Config
from sidecar.daemon.restores import TARGET_OPTIONS, TARGETS, check, target_of
from sidecar.daemon.scheduler import Daemon
from sidecar.errors import ConfigError, NotFound, SidecarError, UsageError
from sidecar.repository import parse_id
from sidecar.storage.base import StorageError

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
MAX_HEADER = 32 * 1024  # request line and headers; a client of this API sends a few hundred bytes
MAX_CONNECTIONS = 100  # beyond this, new connections wait in the listen backlog until one closes
REQUEST_SECONDS = 10  # a request must arrive whole (header and body) within this long of its first byte
IDLE_SECONDS = 30  # a kept-alive connection with nothing to do is closed after this long
THREADS = 4
STUCK_AFTER = 30.0
PROBE_SECONDS = 5.0  # PostgreSQL reachability is probed this often, whoever asks and however often

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


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


class DatabaseProbe:
    """Is PostgreSQL reachable? A thread connects every PROBE_SECONDS and keeps the answer, so /readyz and
    scrapes cost no connection; the reason is logged when it changes, never per request."""

    def __init__(self, config: Config, gauge: Gauge, every: float = PROBE_SECONDS) -> None:
        self.config = config
        self.gauge = gauge
        self.every = every
        self.problem: str | None = "not checked yet"  # None while reachable

    def check(self) -> None:
        try:
            postgres.connect(self.config).close()
            problem = None
        except SidecarError as exc:
            problem = str(exc)
        if problem != self.problem:
            if problem is None:
                log.info("database reachable")
            else:
                log.warning("database unreachable: %s", problem)
        self.problem = problem
        self.gauge.set(0 if problem else 1)

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                self.check()
            except Exception:  # a bug: logged, and the probe goes on
                log.exception("database probe failed")
            stopping.wait(max(0.0, self.every - (time.monotonic() - started)))


# --- what waitress lacks, added on its own classes ------------------------------------------------------


class _Parser(HTTPRequestParser):
    def __init__(self, adj: Any) -> None:
        super().__init__(adj)
        self.started = time.monotonic()  # the request's first byte: REQUEST_SECONDS counts from here

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        headers = cast(dict[str, str], self.headers)
        if "TRANSFER_ENCODING" in headers:  # waitress decodes it on HTTP/1.1 only, and then removes it
            raise ParsingError(f"Transfer-Encoding is not supported on HTTP/{self.version}; send Content-Length")
        if self.chunked and "CONTENT_LENGTH" in headers:
            raise ParsingError("both Content-Length and Transfer-Encoding: send one")


class _ErrorTask(ErrorTask):
    """waitress's own refusals (400, 413, 431, 501) as JSON {"error": ...}, like the application's."""

    def execute(self) -> None:
        request: Any = self.request  # the stubs call it an Error; it is the parser, whose .error is one
        error = request.error
        limits = {413: f"the request body is over {MAX_BODY} bytes", 431: f"the request line and headers are over {MAX_HEADER} bytes"}
        body = (json.dumps({"error": limits.get(error.code, f"{error.reason}: {error.body}")}) + "\n").encode()
        self.status = f"{error.code} {error.reason}"
        cast(list[tuple[str, str]], self.response_headers).extend([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    parser_class = _Parser
    error_task_class = _ErrorTask


class Server(TcpWSGIServer):
    channel_class = _Channel

    def maintenance(self, now: int) -> None:  # (a float, in fact)
        """waitress closes connections idle for IDLE_SECONDS; this also closes one whose request has not
        arrived whole REQUEST_SECONDS after it began (a client that sends a byte a second is never idle)."""
        super().maintenance(now)
        cutoff = time.monotonic() - REQUEST_SECONDS
        channels = cast(dict[int, HTTPChannel], self.active_channels)
        for channel in list(channels.values()):
            request = channel.request
            if isinstance(request, _Parser) and not request.completed and request.started < cutoff and not channel.requests:
                channel.will_close = True

    def serve_forever(self) -> None:
        self.run()

    def shutdown(self) -> None:
        """Stop accepting connections (the process is about to exit). The worker threads go first: a worker
        still answering wakes the loop through the trigger, which must not be closed under it (EBADF)."""
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self.close()


def make_server(daemon: Daemon, host: str, port: int, token: str | None, probe: DatabaseProbe) -> Server:
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" on every burst
    if daemon.config.wal_archiving:  # issue 13: the WAL archive, the slot, the recovery window
        daemon.metrics.watch_wal(api.wal_watcher(daemon.config))
    return Server(App(daemon, token, probe), host=host, port=port, threads=THREADS, ident="pg-backup-sidecar",
                  connection_limit=MAX_CONNECTIONS, max_request_header_size=MAX_HEADER, max_request_body_size=MAX_BODY + 1,
                  channel_timeout=IDLE_SECONDS, cleanup_interval=1, asyncore_use_poll=True, clear_untrusted_proxy_headers=True)


# --- the application -------------------------------------------------------------------------------


class Reply(Exception):
    """Raised by a handler to answer at once: status, JSON body, extra headers."""

    def __init__(self, status: int, body: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.status, self.body, self.headers = status, body, list(headers)


def error(status: int, message: str) -> Reply:
    return Reply(status, {"error": message})


class App:
    """The WSGI application. Bodies are at most MAX_BODY bytes and already read whole by waitress."""

    def __init__(self, daemon: Daemon, token: str | None, probe: DatabaseProbe) -> None:
        self.daemon = daemon
        self.token = token
        self.probe = probe
        self.windows = api.window_reader(daemon.config)  # remembers each archived segment's last commit time

    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        content_type = "application/json"
        headers: list[tuple[str, str]] = []
        try:
            status, body = 200, self.route(environ)
            if isinstance(body, bytes):
                content_type = CONTENT_TYPE_LATEST
        except Reply as reply:
            status, body, headers = reply.status, reply.body, reply.headers
        except SidecarError as exc:
            status, body = 500, {"error": str(exc)}
        except Exception as exc:  # a bug: log it with its traceback, keep serving
            log.exception("request %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "")[:100])
            status, body = 500, {"error": f"internal error ({type(exc).__name__}); see the sidecar's log"}
        data = body if isinstance(body, bytes) else (json.dumps(body, indent=2, default=str) + "\n").encode()
        start_response(f"{status} {HTTPStatus(status).phrase}", [("Content-Type", content_type), ("Content-Length", str(len(data))), *headers])
        return [data]

    def route(self, environ: Environ) -> Any:
        method = environ["REQUEST_METHOD"]
        # PATH_INFO is percent-decoded, as latin-1 (PEP 3333); ids are ASCII, request ids may be UTF-8
        path = environ["PATH_INFO"].encode("latin-1").decode("utf-8", "replace")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if method == "GET":
            if length:
                raise error(400, "a GET request takes no body")
            return self.get(path, environ)
        if method == "POST":
            self.authorize(environ)
            return self.post(path, environ["wsgi.input"].read(length) if length else b"")
        raise Reply(405, {"error": f"method {method[:20]} not allowed; use GET or POST"}, [("Allow", "GET, POST")])

    def authorized(self, environ: Environ) -> bool:
        given = environ.get("HTTP_AUTHORIZATION", "")
        return self.token is not None and given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.token.encode())

    def authorize(self, environ: Environ) -> None:
        if self.token is None:
            raise error(403, "the API is disabled: set SIDECAR_API_TOKEN (or SIDECAR_API_TOKEN_FILE) to enable it")
        if not self.authorized(environ):
            raise Reply(401, {"error": "missing or wrong token: send Authorization: Bearer <SIDECAR_API_TOKEN>"}, [("WWW-Authenticate", "Bearer")])

    def get(self, path: str, environ: Environ) -> Any:
        daemon = self.daemon
        if path == "/metrics":
            return generate_latest(daemon.metrics.registry)
        if path == "/healthz":
            age = time.monotonic() - daemon.heartbeat
            raise Reply(200 if age < STUCK_AFTER else 503, {"ok": age < STUCK_AFTER, "loopSecondsAgo": round(age, 1)})
        if path == "/readyz":
            problem = self.probe.problem
            body: dict[str, Any] = {"ready": problem is None}
            if problem and self.authorized(environ):  # the reason names the database, host and port: only with the token
                body["reason"] = problem
            raise Reply(503 if problem else 200, body)
        self.authorize(environ)
        if path == "/v1/backups":
            remote = query_flag(environ, "remote")
            try:
                return [b.to_json() for b in api.list_backups(daemon.config, remote=remote)]
            except UsageError as exc:  # no remote store configured
                raise error(400, str(exc)) from None
            except (StorageError, ConfigError) as exc:  # the store cannot be set up or read: named, never a secret
                raise error(502, str(exc)) from None
        if path.startswith("/v1/backups/"):
            try:
                return api.get_backup(path.removeprefix("/v1/backups/"), daemon.config).to_json()
            except NotFound as exc:
                raise error(404, str(exc)) from None
        if path == "/v1/recovery-window":
            return {"timelines": api.recovery_window(daemon.config, self.windows)}
        if path == "/v1/runs":
            return list(reversed(list(daemon.runs.values())))
        if path.startswith("/v1/runs/"):
            run = daemon.runs.get(path.removeprefix("/v1/runs/"))
            if run is None:
                raise error(404, f"no run {path.removeprefix('/v1/runs/')[:100]!r} (the newest runs are listed at /v1/runs)")
            return run
        if path == "/v1/restores":
            return list(reversed(list(daemon.restores.values())))
        if path.startswith("/v1/restores/"):
            record = daemon.find_restore(path.removeprefix("/v1/restores/"))
            if record is None:
                raise error(404, f"no restore with id or request_id {path.removeprefix('/v1/restores/')[:100]!r} (see /v1/restores)")
            return record
        raise error(404, f"no such endpoint {path[:100]}")

    def post(self, path: str, body: bytes) -> Any:
        daemon = self.daemon
        if path == "/v1/backups":
            if body.strip() not in (b"", b"{}"):
                raise error(400, "POST /v1/backups takes no body (or {})")
            run_id = daemon.start_backup("api")
            if run_id is None:
                raise Reply(409, daemon.busy())
            raise Reply(202, daemon.runs[run_id])
        if path == "/v1/restores":
            ask = restore_ask(body, remote_configured=daemon.config.remote is not None)
            status, record = daemon.request_restore(ask)
            raise Reply(status, record)
        raise error(404, f"no such endpoint {path[:100]}")


def query_flag(environ: Environ, name: str) -> bool:
    """`?name=true` / `?name=false` (absent: false); 400 for anything else, or another parameter."""
    from urllib.parse import parse_qs

    query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
    unknown = sorted(set(query) - {name})
    if unknown:
        raise error(400, f"unknown query parameters: {', '.join(k[:40] for k in unknown[:5])}; accepted: {name}")
    values = query.get(name, ["false"])
    if len(values) != 1 or values[0] not in ("true", "false"):
        raise error(400, f"{name} must be true or false")
    return values[0] == "true"


def json_body(body: bytes, required: set[str], optional: set[str], flags: frozenset[str] | set[str] = frozenset(),
              numbers: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The request's JSON object: string values, except `flags` (true or false) and `numbers` (a string or a whole
    number, given on as a string); 400 naming the problem otherwise."""
    try:
        data = json.loads(body)
    except ValueError:
        raise error(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise error(400, "the body must be a JSON object")
    unknown = sorted(set(data) - required - optional)
    missing = sorted(required - set(data))
    data = {k: str(v) if k in numbers and isinstance(v, int) and not isinstance(v, bool) else v for k, v in data.items()}
    wrong = sorted(k for k, v in data.items() if k not in flags and (not isinstance(v, str) or not v or len(v) > 200))
    not_flags = sorted(k for k, v in data.items() if k in flags and not isinstance(v, bool))
    problems = [f"{label}: {', '.join(k[:40] for k in keys[:10])}" for label, keys in (
                ("unknown fields", unknown), ("missing fields", missing),
                ("must be non-empty strings of at most 200 characters", wrong), ("must be true or false", not_flags)) if keys]
    if problems:
        raise error(400, "; ".join(problems))
    try:
        if data.get("backup", "latest") != "latest":
            parse_id(data["backup"])
    except NotFound as exc:
        raise error(400, str(exc)) from None
    return data


def restore_ask(body: bytes, remote_configured: bool) -> dict[str, Any]:
    """A POST /v1/restores body, checked whole before anything starts (400 with one line naming the problem), as the
    restore it asks for: {request_id, backup, target, target_db, database, from_remote}. `backup` (an id or latest)
    restores a dump; a point-in-time target (exactly one of to_time, to_lsn, to_latest, to_restore_point, to_xid, with
    exclusive and timeline, as `restore --to-*` takes them) restores from base backups and WAL into target_db and takes
    no backup; `database` restores one database of a whole server's backup set (daemon/restores.py)."""
    data = json_body(body, required={"request_id"}, optional={"backup", "target_db", "from_remote", "database", *TARGETS, *TARGET_OPTIONS},
                     flags={"from_remote", "to_latest", "exclusive"}, numbers={"to_xid", "timeline"})
    from_remote = bool(data.get("from_remote", False))
    if from_remote and not remote_configured:
        raise error(400, "from_remote: no remote store is configured on this sidecar (BACKUP_REMOTE_URL)")
    target = target_of(data)
    try:
        check(data.get("backup"), target, data.get("target_db"), data.get("database"), from_remote, api_terms=True)
    except UsageError as exc:
        raise error(400, str(exc)) from None
    return {"request_id": data["request_id"], "backup": data.get("backup"), "target": target or None, "target_db": data.get("target_db"),
            "database": data.get("database"), "from_remote": from_remote}
