"""The request cycle of rawjobs/web/server.py: responses written by hand (not through
h11), a fresh h11 state machine per request, and one lazily moved read deadline per
connection. Raw sockets where a client library would hide the wire."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import launch, stop

from rawjobs.web.http import Request, Response
from rawjobs.web.server import HTTPServer, Limits


def read_until_closed(sock: socket.socket, limit: float = 10) -> bytes:
    sock.settimeout(limit)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


# -- headers that cannot be sent --------------------------------------------------------


async def _unsendable(request: Request) -> Response:
    bad = {"/crlf": "a\r\nX-Injected: 1", "/nul": "a\x00b", "/nonlatin": "\u20ac"}
    value = bad.get(request.path)
    headers = [("X-Value", value)] if value is not None else []
    return Response(status=200, body=b"fine", headers=headers, content_type="text/plain")


@pytest.fixture(scope="module")
def bare_server() -> Iterator[int]:
    """rawjobs' HTTPServer alone on 127.0.0.1, in a thread, with a handler that puts
    unsendable values into a response header."""
    loop = asyncio.new_event_loop()
    server = HTTPServer(_unsendable, Limits())
    loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.mark.parametrize("path", ["/crlf", "/nul", "/nonlatin"])
def test_unsendable_header_becomes_500_on_a_usable_connection(bare_server, path):
    with httpx.Client(base_url=f"http://127.0.0.1:{bare_server}") as client:
        r = client.get(path)
        assert r.status_code == 500
        assert r.json() == {"error": "Internal server error"}
        assert "x-injected" not in r.headers and "x-value" not in r.headers
        again = client.get("/plain")  # same keep-alive connection
        assert again.status_code == 200 and again.text == "fine"
        assert client.get(path).status_code == 500


# -- deadlines ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_keepalive(tmp_path_factory):
    """A keep-alive timeout (0.5 s) much shorter than the head timeout (5 s)."""
    server = launch(tmp_path_factory.mktemp("cycle"), "--head-timeout", "5",
                    "--keepalive-timeout", "0.5")
    yield server
    stop(server)
    assert "Traceback" not in server.log()


def _stats(port: int, extra: str = "") -> bytes:
    return f"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


def test_keepalive_deadline_earlier_than_head_deadline(short_keepalive):
    """The head deadline (5 s) armed for the request must not delay the idle close
    (0.5 s) that follows the response."""
    with socket.create_connection(("127.0.0.1", short_keepalive.port), timeout=10) as sock:
        sock.sendall(_stats(short_keepalive.port))
        started = time.monotonic()
        out = read_until_closed(sock)
        waited = time.monotonic() - started
    assert statuses(out) == [200]
    assert 0.3 < waited < 2.5


def _one_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, read whole."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        raw += chunk
    _, headers, body = _head_lines(raw)
    while len(body) < int(headers[b"content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        body += chunk
    return raw


def test_busy_connection_outlives_its_timeouts(short_keepalive):
    """Requests 0.2 s apart for 3 s (six keep-alive timeouts in all) on one connection:
    the one timer per connection, moved lazily, never closes it between requests."""
    with socket.create_connection(("127.0.0.1", short_keepalive.port), timeout=10) as sock:
        for _ in range(15):
            sock.sendall(_stats(short_keepalive.port))
            assert statuses(_one_response(sock)) == [200]
            time.sleep(0.2)


def test_head_timeout_still_ends_a_slow_head(short_keepalive):
    with socket.create_connection(("127.0.0.1", short_keepalive.port), timeout=10) as sock:
        sock.sendall(_stats(short_keepalive.port))
        assert statuses(sock.recv(65536)) == [200]
        sock.sendall(b"GET /api/stats HTTP/1.1\r\n")  # then nothing: 5 s head timeout
        started = time.monotonic()
        out = read_until_closed(sock)
        waited = time.monotonic() - started
    assert statuses(out) == [408]
    assert 4 < waited < 8


def test_pipelined_partial_head_has_the_head_timeout(short_keepalive):
    """A head begun in the packet of the request before it is a head, not an idle
    connection: it gets the 5 s head timeout and a 408, not a quiet close after the
    0.5 s keep-alive timeout."""
    with socket.create_connection(("127.0.0.1", short_keepalive.port), timeout=10) as sock:
        sock.sendall(_stats(short_keepalive.port) + b"GET /api/stats HTTP/1.1\r\n")
        started = time.monotonic()
        out = read_until_closed(sock)
        waited = time.monotonic() - started
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200", b"408"]  # body, then head
    assert 4 < waited < 8


# -- framing of hand-written heads ----------------------------------------------------


def _head_lines(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, dict(line.lower().split(b": ", 1) for line in lines), rest


def test_head_of_a_stream_on_http11_says_chunked_and_keeps_the_connection(short_keepalive):
    port = short_keepalive.port
    job = httpx.post(f"http://127.0.0.1:{port}/api/jobs",
                     json={"job_type": "echo", "params": {"message": "hi"}}).json()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"HEAD /api/jobs/{job['id']}/progress HTTP/1.1\r\nHost: 127.0.0.1:{port}"
                     "\r\n\r\n".encode() + _stats(port, "Connection: close\r\n"))
        out = read_until_closed(sock)
    assert statuses(out) == [200, 200]
    status, headers, rest = _head_lines(out)
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in headers and b"connection" not in headers
    assert rest.startswith(b"HTTP/1.1 200 ")  # no body bytes after the HEAD answer


def test_head_of_a_stream_on_http10_closes(short_keepalive):
    port = short_keepalive.port
    job = httpx.post(f"http://127.0.0.1:{port}/api/jobs",
                     json={"job_type": "echo", "params": {"message": "hi"}}).json()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"HEAD /api/jobs/{job['id']}/progress HTTP/1.0\r\n\r\n".encode())
        out = read_until_closed(sock)
    status, headers, rest = _head_lines(out)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"connection"] == b"close"
    assert b"transfer-encoding" not in headers and rest == b""


# -- event streams: the end of the connection --------------------------------------------


def _countdown(port: int, seconds: int) -> int:
    return httpx.post(f"http://127.0.0.1:{port}/api/jobs",
                      json={"job_type": "countdown", "params": {"seconds": seconds}}).json()["id"]


def test_stream_half_closed_by_the_client_ends_with_its_last_chunk(short_keepalive):
    port = short_keepalive.port
    job_id = _countdown(port, 30)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     .encode())
        sock.shutdown(socket.SHUT_WR)
        out = read_until_closed(sock)
    _, headers, _ = _head_lines(out)
    assert headers[b"connection"] == b"close"
    assert out.endswith(b"\r\n0\r\n\r\n")  # a complete chunked body, not a cut one
    httpx.delete(f"http://127.0.0.1:{port}/api/jobs/{job_id}")


def test_stream_head_announces_the_close_that_follows(short_keepalive):
    """A stream of a finished job ends at once and the connection with it: the head
    says ``Connection: close``, so a pipelined request is known to be unread."""
    port = short_keepalive.port
    job = httpx.post(f"http://127.0.0.1:{port}/api/jobs",
                     json={"job_type": "echo", "params": {"message": "hi"}}).json()
    deadline = time.monotonic() + 10
    while httpx.get(f"http://127.0.0.1:{port}/api/jobs/{job['id']}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /api/jobs/{job['id']}/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     .encode() + _stats(port))
        out = read_until_closed(sock)
    assert statuses(out) == [200]
    _, headers, _ = _head_lines(out)
    assert headers[b"connection"] == b"close"
    assert b"event: complete" in out and out.endswith(b"\r\n0\r\n\r\n")


def test_100_continue_has_its_reason_phrase(short_keepalive):
    port = short_keepalive.port
    body = b'{"job_type":"echo","params":{"message":"hi"}}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue"
                     "\r\nConnection: close\r\n\r\n".encode())
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        out = read_until_closed(sock)
    assert statuses(interim + out)[-1] == 201
