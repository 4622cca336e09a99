"""Issue 5, points 1 to 3 (HTTP side): limits, request framing, slow clients.

Malformed and hostile input goes over raw sockets to real servers on 127.0.0.1;
well-formed traffic goes through httpx. Each test says which numbered point it
checks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, free_port, wait_ready

STATS = b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# -- helpers -------------------------------------------------------------------------


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout`` seconds pass)."""
    sock.settimeout(0.2)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"server did not close within {timeout} s; got {out[:300]!r}")


def exchange(port: int, data: bytes, half_close: bool = False, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and return all the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, timeout)


def statuses(data: bytes) -> list[int]:
    """The status codes of the responses in ``data`` (bodies here are JSON, which
    never holds a status line)."""
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def start(tmp_path_factory, *args: str) -> ServerProcess:
    port = free_port()
    log_path = tmp_path_factory.mktemp("http") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawjobs", "--port", str(port), "--db", ":memory:",
         "--grace", "0", *args],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(log_path.parent),
    )
    server = ServerProcess(proc, port, log_path, list(args))
    wait_ready(server.url, proc)
    return server


def stop(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Default limits except short head and keep-alive timeouts (1 s) so that the
    timer tests are quick; the defaults themselves are checked in
    ``test_default_timeouts``."""
    server = start(tmp_path_factory, "--head-timeout", "1", "--keepalive-timeout", "1")
    yield server
    stop(server)
    assert "Traceback" not in server.log()


# -- 1. HTTP limits --------------------------------------------------------------------


@pytest.mark.parametrize("whole", [True, False])
def test_head_over_16k_is_431(shared, whole):
    head = b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        if whole:  # h11 alone lets a complete oversized head through
            sock.sendall(head)
        else:
            for i in range(0, len(head), 4096):
                sock.sendall(head[i:i + 4096])
                time.sleep(0.01)
        out = read_until_closed(sock)
    assert statuses(out) == [431]
    assert b"connection: close" in out.lower()


def test_head_just_under_the_limit_is_served(shared):
    head = b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 15000 + b"\r\n\r\n"
    out = exchange(shared.port, head, half_close=True)
    assert statuses(out) == [200]


def test_body_over_1mib_is_413_before_it_is_sent(shared):
    head = (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1048577\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(head)  # and not one byte of the body
        out = read_until_closed(sock)
    assert statuses(out) == [413]
    assert b'{"error":' in out and b"connection: close" in out.lower()


def test_chunked_body_counted_as_it_arrives_413(shared):
    head = (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(head)
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:  # never the terminating chunk
                sock.sendall(chunk)
                sent += 0x10000
        except OSError:
            pass  # the server answered and stopped reading
        out = read_until_closed(sock)
    assert statuses(out) == [413]


def test_body_of_exactly_1mib_is_read(shared):
    body = b'{"job_type": "echo", "params": {"message": "' + b"x" * 1000 + b'"}}'
    body += b" " * (1024 * 1024 - len(body))
    out = exchange(shared.port, post("/api/jobs", body), half_close=True)
    assert statuses(out) == [400]  # read and parsed: the message is too long
    assert b'"param":"message"' in out


def test_slow_head_gets_408_and_idle_connection_closes(shared):
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as slow, \
            socket.create_connection(("127.0.0.1", shared.port), timeout=5) as idle:
        slow.sendall(b"GET /api/stats HTTP/1.1\r\nHo")
        started = time.monotonic()
        out = read_until_closed(slow)
        assert statuses(out) == [408]
        assert 0.8 < time.monotonic() - started < 3
        assert read_until_closed(idle) == b""  # nothing sent: closed quietly


def test_slow_body_gets_408(shared):
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(post("/api/jobs", b'{"job_type": "echo"}')[:-5])
        out = read_until_closed(sock)
    assert statuses(out) == [408]


def test_idle_keepalive_connection_closes(shared):
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(STATS)
        time.sleep(0.3)
        started = time.monotonic()
        out = read_until_closed(sock)
        waited = time.monotonic() - started
    assert statuses(out) == [200]
    assert 0.4 < waited < 3  # --keepalive-timeout 1, counted from the response


def test_timers_belong_to_one_request(shared):
    """Each request's head and keep-alive timers end with it: requests 0.6 s apart
    on one connection outlive the 1 s timeouts, and a body sent slowly (each
    piece well within the timeout) is read in full."""
    with httpx.Client(base_url=shared.url, timeout=5) as client:
        for _ in range(4):
            assert client.get("/api/stats").status_code == 200
            time.sleep(0.6)
        assert client.get("/api/stats").status_code == 200
    body = b'{"job_type": "echo", "params": {"message": "slow", "delay": 1}}'
    head, _, _ = post("/api/jobs", body).partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n")
        for i in range(0, len(body), 16):
            time.sleep(0.5)  # 2 s in all, more than --head-timeout
            sock.sendall(body[i:i + 16])
        sock.shutdown(socket.SHUT_WR)
        assert statuses(read_until_closed(sock)) == [201]


def test_default_timeouts(start_server):
    """The documented defaults: idle keep-alive closes after 5 s, a head still
    incomplete after 10 s gets 408."""
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as idle, \
            socket.create_connection(("127.0.0.1", server.port), timeout=15) as slow:
        started = time.monotonic()
        slow.sendall(b"GET /api/stats HTTP/1.1\r\n")
        idle.sendall(STATS)
        assert statuses(read_until_closed(idle, 8)) == [200]
        assert 4.5 < time.monotonic() - started < 7
        assert statuses(read_until_closed(slow, 8)) == [408]
        assert 9.5 < time.monotonic() - started < 12


def test_max_pending_answers_429_with_retry_after(start_server):
    server = start_server("--max-pending", "2", "--concurrency", "1", "--grace", "0")
    with httpx.Client(base_url=server.url, timeout=5) as client:
        def create() -> httpx.Response:
            return client.post("/api/jobs", json={"job_type": "countdown",
                                                  "params": {"seconds": 60}})

        first = create().json()["id"]
        deadline = time.monotonic() + 5
        while client.get(f"/api/jobs/{first}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [create().status_code for _ in range(2)] == [201, 201]
        full = create()
        assert full.status_code == 429
        assert full.headers["retry-after"].isdigit() and int(full.headers["retry-after"]) >= 1
        assert "error" in full.json()
        assert client.get("/api/stats").json()["queue"]["pending"] == 2
        client.delete(f"/api/jobs/{first + 1}")
        assert create().status_code == 201  # room again


def test_max_connections_answers_503(start_server):
    server = start_server("--max-connections", "4")
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        time.sleep(0.3)  # accepted and counted by the server
        out = exchange(server.port, STATS)
        assert statuses(out) == [503]
        assert b"connection: close" in out.lower()
        held.pop().close()
        deadline = time.monotonic() + 3
        while statuses(exchange(server.port, STATS, half_close=True)) != [200]:
            assert time.monotonic() < deadline, "a freed slot was not reused"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()


def test_fd_limit_raised_and_warned(tmp_path):
    """At start the soft open-file limit is raised to the hard one, and a
    --max-connections the hard limit cannot hold is warned about."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip("needs a finite hard open-file limit above 1024")
    port = free_port()
    log_path = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawjobs", "--port", str(port), "--db", ":memory:",
         "--max-connections", str(hard * 2)],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(tmp_path),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3] == str(hard)
        log = log_path.read_text()
        assert f"from 1024 to {hard}" in log
        assert "below --max-connections" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# -- 2. Request framing ------------------------------------------------------------------

SMUGGLED = b"GET /api/job-types HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize("head, body", [
    pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                 b"0\r\n\r\n" + SMUGGLED, id="cl-and-te"),
    pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 50\r\n",
                 b"0\r\n\r\n" + SMUGGLED, id="te-and-cl"),
    pytest.param(b"Content-Length: 2\r\nContent-Length: 2\r\n", b"{}" + SMUGGLED,
                 id="duplicate-cl"),
    pytest.param(b"Content-Length: 2, 2\r\n", b"{}" + SMUGGLED, id="cl-list"),
    pytest.param(b"Content-Length: 2\r\nContent-Length: 60\r\n", b"{}" + SMUGGLED,
                 id="conflicting-cl"),
    pytest.param(b"Content-Length: -1\r\n", b"{}" + SMUGGLED, id="negative-cl"),
    pytest.param(b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
                 id="bad-chunk-size"),
    pytest.param(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}XX0\r\n\r\n" + SMUGGLED,
                 id="chunk-without-crlf"),
    pytest.param(b"Transfer-Encoding: chunked\r\n",
                 b"fffffffffffffffffffff\r\n{}\r\n0\r\n\r\n" + SMUGGLED, id="huge-chunk-size"),
])
def test_bad_framing_is_400_and_closes(shared, head, body):
    request = (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\n" + head + b"\r\n" + body)
    out = exchange(shared.port, request)
    assert statuses(out) in ([400], [413]) if b"fffff" in body else statuses(out) == [400]
    assert b"connection: close" in out.lower()
    assert b"countdown" not in out  # the smuggled request was never answered


def test_unknown_transfer_coding_is_refused(shared):
    request = (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n"
               b"\r\n" + SMUGGLED)
    out = exchange(shared.port, request)
    assert statuses(out) == [501]
    assert b"countdown" not in out


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
    pytest.param(b"GET /api/stats HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n", id="http3"),
    pytest.param(b"GET /api/stats HTTP/0.9\r\nHost: 127.0.0.1\r\n\r\n", id="http09"),
])
def test_other_major_versions_get_one_505(shared, request_bytes):
    """RFC 9110 section 15.6.6: one 505 for a major version other than 1, then the
    connection closes (nothing after it, such as the HTTP/2 preface's rest, is read
    as a request)."""
    out = exchange(shared.port, request_bytes + STATS)
    assert statuses(out) == [505]
    assert b"connection: close" in out.lower()
    assert json.loads(out.partition(b"\r\n\r\n")[2]) == {
        "error": "HTTP version not supported"}


@pytest.mark.parametrize("target", [b"api/stats", b"/api/stats#top", b"*",
                                    b"ftp://127.0.0.1/api/stats",
                                    b"http://127.0.0.1/api/stats#top"])
def test_invalid_request_target_is_400(shared, target):
    """RFC 9112 section 3: a target in none of the four forms of section 3.2 (a
    fragment, no leading slash, ``*`` outside OPTIONS, another scheme) is a bad
    request, not a missing resource."""
    out = exchange(shared.port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert statuses(out) == [400]
    out = exchange(shared.port, b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + STATS,
                   half_close=True)
    assert statuses(out)[1:] == [200] and statuses(out)[0] != 400


@pytest.mark.parametrize("first", [
    pytest.param(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: foo\r\n"
                 b"Connection: close\r\n\r\n", id="upgrade-close"),
    pytest.param(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: h2c\r\n"
                 b"Connection: Upgrade, close\r\n\r\n", id="upgrade-list-close"),
    pytest.param(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Connection: close\r\n\r\n", id="connect-close"),
    pytest.param(b"GET /api/stats HTTP/1.0\r\nUpgrade: foo\r\n\r\n", id="upgrade-http10"),
])
def test_declined_upgrade_keeps_connection_close(shared, first):
    """RFC 9112 sections 9.3 and 9.6: after a request with ``close`` (or an HTTP/1.0
    one), nothing more is read, an Upgrade or CONNECT not accepted included."""
    out = exchange(shared.port, first + SMUGGLED)
    assert len(statuses(out)) == 1
    assert b"connection: close" in out.lower()
    assert b"countdown" not in out


@pytest.mark.parametrize("version", [b"1.2", b"1.9"])
def test_later_minor_versions_are_served_as_11(shared, version):
    """RFC 9110 section 2.5: served as HTTP/1.1, which needs a Host field (RFC 9112
    section 3.2)."""
    out = exchange(shared.port, b"GET /api/stats HTTP/" + version + b"\r\n\r\n")
    assert statuses(out) == [400]
    out = exchange(shared.port, STATS.replace(b"HTTP/1.1", b"HTTP/" + version) + STATS,
                   half_close=True)
    assert statuses(out) == [200, 200]


def test_empty_lines_before_a_request_line_are_ignored(shared):
    """RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before a
    request line (some clients send CRLF after a POST body)."""
    body = b'{"job_type": "echo", "params": {"message": "crlf"}}'
    out = exchange(shared.port, b"\r\n\n" + STATS + post("/api/jobs", body) + b"\r\n"
                   + STATS, half_close=True)
    assert statuses(out) == [200, 201, 200]
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        for _ in range(3):  # each in a packet of its own, the connection kept
            sock.sendall(b"\r\n")
            time.sleep(0.05)
        sock.sendall(STATS)
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    # A bare CR is not an empty line (RFC 9112 section 2.2): the request is malformed.
    assert statuses(exchange(shared.port, b"\r" + STATS)) == [400]
    assert statuses(exchange(shared.port, STATS + b"\r\r\n" + STATS)) == [200, 400]


def test_no_request_after_connection_close(shared):
    first = b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    out = exchange(shared.port, first + SMUGGLED + SMUGGLED)
    assert statuses(out) == [200]
    assert b"countdown" not in out


def test_pipelined_requests_answered_in_order(shared):
    out = exchange(shared.port, STATS + SMUGGLED + STATS, half_close=True)
    assert statuses(out) == [200, 200, 200]
    assert out.index(b'"queue"') < out.index(b"countdown") < out.rindex(b'"queue"')


def test_half_closed_client_gets_its_response(shared):
    body = b'{"job_type": "echo", "params": {"message": "half", "delay": 1}}'
    out = exchange(shared.port, post("/api/jobs", body), half_close=True)
    assert statuses(out) == [201]
    assert b'"echoed"' not in out and b'"half"' in out
    out = exchange(shared.port, STATS + STATS, half_close=True)
    assert statuses(out) == [200, 200]


def test_expect_100_continue(shared):
    body = b'{"job_type": "echo", "params": {"message": "expect", "delay": 1}}'
    request = post("/api/jobs", body, extra=b"Expect: 100-continue\r\n")
    head, _, _ = request.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n")
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        out = interim + read_until_closed(sock)
    assert statuses(out) == [100, 201]


def test_expect_100_continue_refused_early_when_too_large(shared):
    head = (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")
    out = exchange(shared.port, head)
    assert statuses(out) == [413]  # no 100 first: the client need not send the body


def test_protocol_error_answers_carry_no_exception_text(shared):
    out = exchange(shared.port, b"GET /\x01 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert statuses(out) == [400]
    assert out.endswith(b'{"error":"Bad request"}')


# -- 3. Slow clients -------------------------------------------------------------------


def _server_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


def test_client_that_stops_reading_responses_is_dropped(start_server):
    """Pipelined requests from a client that reads nothing: the server stops
    reading it while the responses pile up, and drops it after --write-timeout
    instead of waiting (or buffering) forever."""
    server = start_server("--write-timeout", "1")
    pid = server.proc.pid
    baseline = _server_sockets(pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(0.5)
    request = b"GET /api/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    started = time.monotonic()
    try:
        for _ in range(5000):  # about 60 MB of responses if all were answered
            sock.sendall(request * 10)
    except OSError:
        pass  # the server stopped reading us, then dropped us
    while _server_sockets(pid) > baseline:
        assert time.monotonic() - started < 10, "the server still holds the connection"
        time.sleep(0.1)
    sock.close()
    assert "Traceback" not in server.log()


async def _slowloris(port: int, count: int, stop: asyncio.Event) -> int:
    """``count`` connections that each send one header byte a second until ``stop``;
    returns how many were still open at the end."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    head = b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    i = 0
    while not stop.is_set():
        for _, writer in conns:
            writer.write(head[i:i + 1])
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    open_ = sum(not reader.at_eof() for reader, _ in conns)
    for _, writer in conns:
        writer.close()
    return open_


async def test_slowloris_does_not_starve_a_fresh_client(shared_default):
    stop = asyncio.Event()
    attack = asyncio.ensure_future(_slowloris(shared_default.port, 500, stop))
    await asyncio.sleep(2.5)  # all connected and dribbling
    latencies = []
    try:
        for _ in range(3):
            async with httpx.AsyncClient(timeout=5) as client:
                started = time.monotonic()
                r = await client.get(shared_default.url + "/api/stats")
                latencies.append(time.monotonic() - started)
                assert r.status_code == 200
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        still_open = await attack
    assert max(latencies) < 1.0, latencies
    assert still_open == 500  # the attack really was in progress


@pytest.fixture
def shared_default(start_server):
    return start_server()
