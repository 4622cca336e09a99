"""Issue 5, point 8: fuzzing a live server.

* schemathesis reads ``GET /api/openapi.json`` and throws valid and invalid requests
  at every REST operation (the SSE route has its own tests), checking that no answer
  is a 500 and every answer matches the documented statuses, media types and schemas.
* hypothesis mutates well-formed requests (and makes up raw bytes) and sends them
  over raw sockets: the server never answers 500, never logs a crash, and still
  serves a normal request afterwards.

Both are bounded (examples per operation, bytes per request, seconds per
exchange) to take well under a minute together."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(start_module_server):
    """Short timeouts so that a request the fuzzer left unfinished ends quickly."""
    return start_module_server("--grace", "0", "--head-timeout", "2", "--keepalive-timeout", "2")


# -- schemathesis -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/api/openapi.json")
    schema.config.generation.update(max_examples=20)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/progress$")


def test_openapi_document(fuzz_server):
    doc = httpx.get(fuzz_server.url + "/api/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"/api/stats", "/api/jobs", "/api/jobs/{id}"} <= set(doc["paths"])


@schema.parametrize()
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_rest_api_matches_its_schema(case):
    case.call_and_validate(checks=CHECKS, timeout=10)


# -- raw bytes --------------------------------------------------------------------------------

SEEDS = [
    b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 43\r\n\r\n{\"job_type\": \"echo\", \"params\": {\"delay\": 1}}",
    b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n14\r\n{\"job_type\": \"prime\"}\r\n0\r\n\r\n",
    b"GET /ws/queue HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n\x81\x85abcd\x1a\x07\x0c\x02\x09",
    b"GET /api/jobs/1/progress HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: 3\r\n\r\n",
    b"DELETE /api/jobs/2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    b"HEAD /css/style.css HTTP/1.1\r\nHost: localhost\r\nIf-None-Match: *\r\n\r\n",
    b"GET /api/jobs?status=pending&limit=5&before=9 HTTP/1.0\r\n\r\n",
]
NASTY_LINES = [
    b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Content-Length: 5, 6\r\n",
    b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Expect: 100-continue\r\n",
    b"Connection: close\r\n", b"Connection: Upgrade\r\n", b"Upgrade: websocket\r\n",
    b"Host: evil.example\r\n", b"Host: 127.0.0.1\r\n", b" folded\r\n", b":\r\n",
    b"X: \xff\xfe\r\n", b"\r\n", b"\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n",
    b"Sec-WebSocket-Version: 8\r\n", b"Origin: http://evil.example\r\n",
]


@st.composite
def mutated_request(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "flip", "nasty", "repeat", "cut"]))
        if op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "nasty":
            data[at:at] = draw(st.sampled_from(NASTY_LINES))
        elif op == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(2, 20))
        elif op == "cut":
            del data[at:]
    return bytes(data)


# Mostly mutated requests (they reach deeper), some plain noise.
REQUEST_BYTES = st.one_of(mutated_request(), mutated_request(), mutated_request(),
                          st.binary(max_size=300))
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and read the answer until the server closes
    (at most 5 s: the server must not hang on a finished client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already answered and closed
        out = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                return out
            out += chunk
    return out


@given(REQUEST_BYTES)
@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_raw_bytes_never_break_the_server(fuzz_server, data):
    out = send_raw(fuzz_server.port, data)
    codes = [int(c) for c in STATUS.findall(out)]
    assert 500 not in codes, out[:500]
    assert b"Traceback" not in out
    assert fuzz_server.proc.poll() is None


def test_still_serving_after_the_fuzzing(fuzz_server):
    r = httpx.get(fuzz_server.url + "/api/stats", timeout=5)
    assert r.status_code == 200 and r.json()["worker"]["is_running"] is True
    assert "Traceback" not in fuzz_server.log()
