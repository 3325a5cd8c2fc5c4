"""A hostile HTTP client against a real daemon process: header floods, request smuggling (desync), a
request that never ends. The daemon must stay small and keep answering, and what follows a refused or
odd request on the same connection must never be served as a request of its own."""

from __future__ import annotations

import http.client
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import backup_id
from tests.test_daemon import TOKEN, Running, request

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none"

# 80 connections, each sending 100 header lines of 60 KB and starting over when the server hangs up:
# the review's attack (it grew the old server to 2.9 GiB and /healthz to 2.6 s)
ATTACK = r"""
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
payload = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 60_000) for i in range(100)) + b"\r\n"
end = time.monotonic() + seconds
def attacker():
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload)
                while s.recv(65536):
                    pass
        except OSError:
            pass
        time.sleep(0.2)
threads = [threading.Thread(target=attacker) for _ in range(80)]
for t in threads: t.start()
print("started", flush=True)
for t in threads: t.join()
"""


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def idle_daemon(env: dict[str, str], tmp_path: Path) -> Iterator[Running]:
    """A daemon with a recent backup on its volume (so no catch-up backup starts) and nothing running."""
    backup_id(env)
    running = Running({**env, "BACKUP_ON_START": "false", "DRILL_AFTER_BACKUP": "false"}, tmp_path / "daemon.log")
    yield running
    running.stop()


def exchange(port: int, data: bytes) -> tuple[list[int], bytes]:
    """Send raw bytes, read until the server closes; (status codes of the responses, everything read)."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(data)
        try:
            while chunk := raw.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return [int(code) for code in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", reply, flags=re.M)], reply


AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
SMUGGLED = b"POST /v1/backups?smuggled HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 0\r\n\r\n"
LAST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"  # so the server closes once it has answered everything


def test_a_flood_of_huge_headers_leaves_the_daemon_small_and_its_health_probe_fast(env: dict[str, str], tmp_path: Path) -> None:
    running = Running({**env, "DATABASE_URL": UNREACHABLE, "BACKUP_ON_START": "false", "BACKUP_RETRY_SECONDS": "600"}, tmp_path / "daemon.log")
    attack = subprocess.Popen([sys.executable, "-c", ATTACK, str(running.port), "8"], stdout=subprocess.PIPE, text=True)
    latencies: list[float] = []
    try:
        assert attack.stdout is not None and attack.stdout.readline().strip() == "started"
        time.sleep(1)
        while attack.poll() is None and len(latencies) < 40:
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
            latencies.append(time.monotonic() - started)
            conn.close()
            time.sleep(0.1)
        peak = peak_rss_mib(running.proc.pid)
    finally:
        attack.kill()
        attack.wait()
        running.stop()
    assert len(latencies) >= 10, latencies
    # the figure for docs/reliability.md: peak RSS and probe latencies while 80 connections flood
    print(f"peak RSS {peak:.0f} MiB; /healthz p50 {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms over {len(latencies)} probes")
    assert peak < 150, f"the daemon grew to {peak:.0f} MiB"
    assert statistics.median(latencies) < 0.1, f"/healthz took {statistics.median(latencies) * 1000:.0f} ms (median) during the attack"
    log = running.log.read_text()
    assert len(log.splitlines()) < 50 and "Traceback" not in log, log[-2000:]  # the attack does not flood the log either


def test_a_body_on_a_get_is_refused_and_never_served_as_a_second_request(idle_daemon: Running) -> None:
    codes, reply = exchange(idle_daemon.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED + LAST)
    assert codes == [400, 200], reply
    assert b"smuggled" not in reply and request(idle_daemon.base, "/v1/runs")[1] == []


def test_a_chunked_body_is_read_as_the_request_body_never_as_the_next_request(idle_daemon: Running) -> None:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    codes, reply = exchange(idle_daemon.port, b"POST /v1/backups HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + LAST)
    # the body is the smuggled request's text: POST /v1/backups takes none, so nothing starts
    assert codes == [400, 200] and b"takes no body" in reply, reply
    assert request(idle_daemon.base, "/v1/runs")[1] == []
    # a chunked body that is valid JSON is a request like any other (this one names a backup that does not exist)
    body = b'{"backup": "backup_2001-01-01T00-00-00-000Z", "request_id": "chunked"}'
    codes, reply = exchange(idle_daemon.port, b"POST /v1/restores HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
                            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + LAST)
    assert codes == [202, 200], reply


@pytest.mark.parametrize("framing", [
    b"Content-Length: 0\r\nContent-Length: %d\r\n",  # two lengths: the first one used to win
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n",  # both framings at once
    b"Transfer-Encoding: gzip\r\nContent-Length: %d\r\n",  # a coding the server cannot read
], ids=["two-content-lengths", "length-and-chunked", "unknown-coding"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(idle_daemon: Running, framing: bytes) -> None:
    head = b"POST /v1/backups HTTP/1.1\r\nHost: x\r\n" + AUTH + framing % len(SMUGGLED) + b"\r\n"
    codes, reply = exchange(idle_daemon.port, head + SMUGGLED + LAST)
    assert len(codes) == 1 and codes[0] in (400, 501), reply
    assert b"Connection: close" in reply and b"smuggled" not in reply
    assert request(idle_daemon.base, "/v1/runs")[1] == []


def test_transfer_encoding_on_http_1_0_is_refused(idle_daemon: Running) -> None:
    # HTTP/1.0 has no chunked coding: a server that ignores the header reads the body as the next request
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    codes, reply = exchange(idle_daemon.port, b"POST /v1/backups HTTP/1.0\r\nConnection: keep-alive\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + LAST)
    assert codes == [400], reply
    assert request(idle_daemon.base, "/v1/runs")[1] == []


def test_without_a_token_the_refused_body_is_never_parsed_as_a_request(env: dict[str, str], tmp_path: Path) -> None:
    backup_id(env)
    running = Running({**env, "BACKUP_ON_START": "false"}, tmp_path / "daemon.log", token=None)
    try:
        codes, reply = exchange(running.port, b"POST /v1/restores HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED + LAST)
        assert codes == [403, 200], reply
        assert b"smuggled" not in reply
    finally:
        running.stop()
    assert "backup started" not in running.log.read_text()


def test_a_request_that_dribbles_in_forever_is_cut_off(idle_daemon: Running) -> None:
    # one header line a second keeps the connection busy but never finishes the request
    with socket.create_connection(("127.0.0.1", idle_daemon.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for second in range(40):
            try:
                raw.sendall(b"X-Slow-%d: 1\r\n" % second)
                raw.settimeout(1)
                if raw.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:  # reset: cut off
                break
        else:
            raise AssertionError("the server was still reading the request after 40 s")
    assert second < 30
    assert request(idle_daemon.base, "/healthz")[0] == 200


def test_headers_over_the_limit_are_refused_with_431_and_the_connection_closed(idle_daemon: Running) -> None:
    lines = b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 20_000) for i in range(5))  # each line is short enough, together they are not
    codes, reply = exchange(idle_daemon.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n" + LAST)
    assert codes == [431] and b"Connection: close" in reply and b'"the request line and headers are over 32768 bytes"' in reply, reply[:300]
