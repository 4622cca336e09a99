"""Issue 5, points 3 (WebSocket side) and 4: the /ws/queue WebSocket against hostile,
broken and slow peers.

Frames the websockets library would never send (unmasked, bad UTF-8, split in odd
places, glued to the handshake) are written by hand over raw sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import ServerProcess, launch, stop
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

KEY = base64.b64encode(b"0123456789abcdef").decode()
TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
SPAM_JOBS = '''
import asyncio
from rawjobs import Param, job_type

@job_type("spam", description="Many progress events, fast",
          params=[Param("count", int, default=10000, min=1, max=100000),
                  Param("size", int, default=1000, min=0, max=10000)])
async def spam(ctx):
    count, pad = ctx.params["count"], "x" * ctx.params["size"]
    for i in range(count):
        await ctx.progress(i * 100 // count, f"{i} {pad}")
        if i % 25 == 0:
            await asyncio.sleep(0.002)
    return {"count": count}
'''


# -- a raw WebSocket client ------------------------------------------------------------


def handshake(port: int, headers: str = "", path: str = "/ws/queue") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}",
             "Sec-WebSocket-Version: 13"]
    names = {h.split(":")[0].lower() for h in headers.split("\r\n") if h}
    lines = [line for line in lines if line.split(":")[0].lower() not in names]
    return ("\r\n".join(lines) + "\r\n" + headers + "\r\n").encode()


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame (RFC 6455 section 5.2), masked unless told otherwise."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_frame(code: int) -> bytes:
    return frame(CLOSE, struct.pack("!H", code))


class RawWS:
    """A socket after a (raw) handshake: ``frames()`` parses what the server sends."""

    def __init__(self, port: int, first: bytes = b"", rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(handshake(port) + first)
        self.buf = b""
        self.closed = False
        head = self._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.head = head

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            assert self._fill(5), "no handshake response"
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def _parse_one(self) -> tuple[int, bool, bytes] | None:
        if len(self.buf) < 2:
            return None
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "server frames are never masked"
        n, at = b1 & 0x7F, 2
        if n == 126:
            if len(self.buf) < 4:
                return None
            n, at = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if len(self.buf) < 10:
                return None
            n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
        if len(self.buf) < at + n:
            return None
        payload, self.buf = self.buf[at:at + n], self.buf[at + n:]
        return b0 & 0x0F, bool(b0 & 0x80), payload

    def recv(self, timeout: float = 5.0) -> tuple[int, bool, bytes]:
        """The next frame: ``(opcode, fin, payload)``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse_one()
            if parsed is not None:
                return parsed
            remaining = deadline - time.monotonic()
            assert remaining > 0 and not self.closed, "no frame from the server"
            self._fill(min(remaining, 0.5))

    def messages_until_close(self, timeout: float = 5.0) -> tuple[list[dict], int]:
        """Text messages (as JSON) up to the server's Close; returns them and its code."""
        out = []
        while True:
            opcode, _, payload = self.recv(timeout)
            if opcode == CLOSE:
                return out, struct.unpack("!H", payload[:2])[0]
            if opcode == TEXT:
                out.append(json.loads(payload))

    def wait_closed(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            assert time.monotonic() < deadline, "the server kept the TCP connection open"
            self._fill(0.2)
            self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def send_json(ws: RawWS, obj: dict) -> None:
    ws.send(frame(TEXT, json.dumps(obj).encode()))


def next_message(ws: RawWS, kind: str, timeout: float = 5.0) -> dict:
    """The next text message of type ``kind`` (pings and broadcasts skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        opcode, _, payload = ws.recv(max(0.1, deadline - time.monotonic()))
        assert opcode != CLOSE, f"closed: {payload!r}"
        if opcode == TEXT and json.loads(payload).get("type") == kind:
            return json.loads(payload)


def close_code(ws: RawWS, timeout: float = 5.0) -> int:
    return ws.messages_until_close(timeout)[1]


# -- servers -----------------------------------------------------------------------------


def start(directory: Path, *args: str) -> ServerProcess:
    return launch(directory, "--grace", "0", *args)


def assert_clean_log(server: ServerProcess) -> None:
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Short head and keep-alive timeouts (1 s), to show they end at the upgrade;
    one extra allowed origin."""
    server = start(tmp_path_factory.mktemp("ws"), "--head-timeout", "1",
                   "--keepalive-timeout", "1", "--allowed-origin", "http://dash.example")
    yield server
    stop(server)
    assert_clean_log(server)


# -- 4. handshake --------------------------------------------------------------------------


def test_frame_in_the_handshake_packet_is_not_lost(shared):
    ws = RawWS(shared.port, first=frame(TEXT, b'{"type": "ping", "ts": 7}'))
    try:
        assert next_message(ws, "queue_state")["type"] == "queue_state"
        assert next_message(ws, "pong")["ts"] == 7
    finally:
        ws.close()


@pytest.mark.parametrize("headers, status", [
    pytest.param("Sec-WebSocket-Version: 8\r\n", 426, id="bad-version"),
    pytest.param("Sec-WebSocket-Key: \r\n", 400, id="missing-key"),
    pytest.param("Sec-WebSocket-Key: c2hvcnQ=\r\n", 400, id="short-key"),
    pytest.param("Origin: http://evil.example\r\n", 403, id="foreign-origin"),
    pytest.param("Origin: http://127.0.0.1:1\r\n", 403, id="other-port"),
])
def test_refused_handshake_is_plain_http_and_connection_goes_on(shared, headers, status):
    request = handshake(shared.port, headers)
    if "Key: \r\n" in headers:
        request = request.replace(b"Sec-WebSocket-Key: \r\n", b"")
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(f"HTTP/1.1 {status} ".encode()), first
        assert b"upgrade: websocket" not in first.lower()
        if status == 426:
            assert b"sec-websocket-version: 13" in first.lower()
        sock.sendall(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        second = sock.recv(65536)
        assert second.startswith(b"HTTP/1.1 200 ") and b'"queue"' in second


def test_handshake_over_http_10_is_refused(shared):
    """RFC 6455 section 4.2.1: the opening handshake is an HTTP/1.1 (or later) GET."""
    request = handshake(shared.port).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):  # HTTP/1.0: the server closes after it
            out += chunk
    assert out.startswith(b"HTTP/1.1 400 ") and b"needs HTTP/1.1" in out


def test_101_has_its_reason_phrase(shared):
    ws = RawWS(shared.port)
    try:
        assert ws.head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    finally:
        ws.close()


def test_origin_and_host_compare_in_any_case(shared):
    """An Origin naming the request's own host in another case is that host (RFC
    6454 section 4, RFC 3986 section 3.2.2)."""
    port = shared.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(handshake(port, f"Host: localhost:{port}\r\n"
                                     f"Origin: http://LOCALHOST:{port}\r\n"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize("origin", ["http://dash.example", "http://127.0.0.1:{port}",
                                    "HTTP://Dash.Example"])
async def test_allowed_origins_are_accepted(shared, origin):
    origin = origin.format(port=shared.port)
    async with ws_connect(shared.ws_url, origin=origin) as ws:
        assert json.loads(await ws.recv())["type"] == "queue_state"


async def test_permessage_deflate_not_negotiated(shared):
    async with ws_connect(shared.ws_url) as ws:  # websockets offers it by default
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.recv()
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(handshake(shared.port, "Sec-WebSocket-Extensions: permessage-deflate; "
                                            "client_max_window_bits\r\n"))
        head = sock.recv(65536).partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-extensions" not in head.lower()


async def test_upgrade_outlives_the_head_and_keepalive_timers(shared):
    async with ws_connect(shared.ws_url) as ws:
        await ws.recv()
        await asyncio.sleep(2.5)  # both timeouts are 1 s
        await ws.send(json.dumps({"type": "ping", "ts": 3}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply == {"type": "pong", "ts": 3}


# -- 4. messages and frames -------------------------------------------------------------


def test_fragments_reassembled_with_pings_between(shared):
    ws = RawWS(shared.port)
    try:
        next_message(ws, "queue_state")
        text = json.dumps({"type": "ping", "ts": 42}).encode()
        ws.send(frame(TEXT, text[:5], fin=False) + frame(PING, b"mid")
                + frame(CONT, text[5:9], fin=False) + frame(CONT, text[9:]))
        assert ws.recv()[::2] == (PONG, b"mid")
        assert next_message(ws, "pong")["ts"] == 42
    finally:
        ws.close()


def test_message_of_exactly_64k_is_accepted(shared):
    ws = RawWS(shared.port)
    try:
        next_message(ws, "queue_state")
        text = json.dumps({"type": "ping", "ts": 1, "pad": ""}).encode()
        text = text[:-2] + b"x" * (65536 - len(text)) + b'"}'
        assert len(text) == 65536
        half = len(text) // 2
        ws.send(frame(TEXT, text[:half], fin=False) + frame(CONT, text[half:]))
        assert next_message(ws, "pong")["ts"] == 1
    finally:
        ws.close()


@pytest.mark.parametrize("frames, code", [
    pytest.param([frame(TEXT, b"a" * 30000, fin=False), frame(CONT, b"b" * 30000, fin=False),
                  frame(CONT, b"c" * 30000)], 1009, id="too-big-across-fragments"),
    pytest.param([frame(TEXT, b"a" * 70000)], 1009, id="too-big-one-frame"),
    pytest.param([frame(TEXT, b'{"type": "\xff\xfe"}')], 1007, id="invalid-utf8"),
    pytest.param([frame(TEXT, b"ok \xe2\x82", fin=False), frame(CONT, b"x")], 1007,
                 id="invalid-utf8-across-fragments"),
    pytest.param([frame(BINARY, b"\x00\x01")], 1003, id="binary"),
    pytest.param([frame(TEXT, b'{"type": "ping"}', masked=False)], 1002, id="unmasked"),
    pytest.param([frame(PING, b"p" * 126)], 1002, id="control-frame-too-long"),
    pytest.param([frame(CONT, b"orphan")], 1002, id="continuation-without-start"),
    pytest.param([frame(0x3, b"")], 1002, id="reserved-opcode"),
])
def test_bad_messages_close_with_the_right_code(shared, frames, code):
    ws = RawWS(shared.port)
    try:
        next_message(ws, "queue_state")
        ws.send(b"".join(frames))
        _, got = ws.messages_until_close()
        assert got == code
        ws.send(close_frame(code))  # complete the handshake
        ws.wait_closed()
    finally:
        ws.close()


def test_ping_is_answered(shared):
    ws = RawWS(shared.port)
    try:
        ws.send(frame(PING, b"hello"))
        while True:
            opcode, _, payload = ws.recv()
            if opcode == PONG:
                assert payload == b"hello"
                break
    finally:
        ws.close()


# -- 4. close handshakes --------------------------------------------------------------------


async def test_client_close_completes(shared):
    async with ws_connect(shared.ws_url) as ws:
        await ws.recv()
        await ws.close(1000, "bye")
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000


async def test_server_close_completes(shared):
    async with ws_connect(shared.ws_url, max_size=None) as ws:
        await ws.recv()
        await ws.send("x" * 70000)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.protocol.close_rcvd.code == 1009
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1009  # echoed back


def test_both_sides_close_at_once(shared):
    ws = RawWS(shared.port)
    try:
        next_message(ws, "queue_state")
        # The server decides to close (1009) while our own Close is already on its way.
        ws.send(frame(TEXT, b"a" * 70000) + close_frame(1000))
        _, code = ws.messages_until_close()
        assert code == 1009
        ws.wait_closed()
    finally:
        ws.close()


async def test_shutdown_while_clients_close(start_server):
    server = start_server()
    clients = [await ws_connect(server.ws_url) for _ in range(20)]
    for ws in clients:
        await ws.recv()
    closing = [asyncio.ensure_future(ws.close()) for ws in clients]
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*closing)
    assert server.proc.wait(10) == 0
    assert {ws.protocol.close_rcvd.code for ws in clients if ws.protocol.close_rcvd} <= {1000, 1001}
    assert_clean_log(server)


def test_shutdown_with_peers_that_never_answer_close_is_clean(start_server):
    """WebSocket and SSE clients that read nothing and never answer the server's
    Close: at SIGTERM the server drops them at its deadline, exits 0 within a
    second or two of ``--grace``, and logs no traceback (each of their connection
    tasks ends, none is left for the event loop's final cancel)."""
    server = start_server("--grace", "1")
    silent = [RawWS(server.port, rcvbuf=4096) for _ in range(5)]
    job = json.dumps({"job_type": "echo", "params": {"message": "x", "delay": 30}})
    requester = socket.create_connection(("127.0.0.1", server.port))
    requester.sendall((f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(job)}\r\n"
                       f"\r\n{job}").encode())
    requester.settimeout(5)
    response = requester.recv(65536)
    assert response.startswith(b"HTTP/1.1 201 ")
    job_id = json.loads(response.partition(b"\r\n\r\n")[2])["id"]
    streams = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\n"
                     "Host: 127.0.0.1\r\n\r\n".encode())
        streams.append(sock)
    time.sleep(0.3)
    started = time.monotonic()
    assert server.terminate(15) == 0
    assert time.monotonic() - started < 1 + 3
    for sock in [*(ws.sock for ws in silent), *streams, requester]:
        sock.close()
    assert_clean_log(server)


# -- 4. keepalive pings -----------------------------------------------------------------------


async def test_server_pings_and_closes_a_silent_peer(start_server):
    server = start_server("--ws-ping-interval", "0.5")
    silent = RawWS(server.port)

    def watch_silent_peer() -> tuple[int, int, float]:
        """It sees pings and answers nothing: (pings seen, close code, seconds)."""
        pings, started = 0, time.monotonic()
        while True:
            opcode, _, payload = silent.recv(5)
            if opcode == PING:
                pings += 1
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0]
                silent.wait_closed(3)  # and the TCP connection is dropped
                return pings, code, time.monotonic() - started

    try:
        async with ws_connect(server.ws_url, ping_interval=None) as lively:
            await lively.recv()
            pings, code, seconds = await asyncio.to_thread(watch_silent_peer)
            assert pings >= 1 and code == 1011 and seconds < 4
            await asyncio.sleep(1.5)  # the websockets client answers pings: stays open
            await lively.send(json.dumps({"type": "ping", "ts": 5}))
            while (reply := json.loads(await asyncio.wait_for(lively.recv(), 5)))["type"] != "pong":
                pass
            assert reply["ts"] == 5
    finally:
        silent.close()
    assert_clean_log(server)


# -- 3. slow WebSocket clients ------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_sockets(pid: int) -> int:
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


async def _follow(url: str, job_done: asyncio.Event) -> list[int]:
    """Every broadcast ``seq`` a reading client sees, from ``queue_state.seq + 1``
    until the spam job's completion has been followed by ``worker_stats``."""
    async with ws_connect(url, max_size=None, max_queue=None) as ws:
        state = json.loads(await ws.recv())
        seqs = [state["seq"]]
        done = False
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if "seq" in message.get("data", {}) or message.get("type") == "ping":
                continue
            seqs.append(message["seq"])
            if message["type"] == "job_completed":
                done = True
            elif done and message["type"] == "worker_stats":
                job_done.set()
                return seqs


WRITERS = {
    "loop": (),  # five subscribers: the channel is small, written on the loop's thread
    "threads": ("--fanout-slice", "2", "--fanout-threads", "2"),  # sliced, three threads
}


@pytest.mark.parametrize("writer", WRITERS)
async def test_laggard_is_closed_1013_and_others_get_every_event(tmp_path, writer):
    (tmp_path / "spamjobs.py").write_text(SPAM_JOBS)
    server = start(tmp_path, "--jobs", "spamjobs", "--write-timeout", "3",
                   "--max-subscriber-buffer", "262144", *WRITERS[writer])
    try:
        reads_late = RawWS(server.port, rcvbuf=4096)  # stops reading, reads again later
        never_reads = RawWS(server.port, rcvbuf=4096)
        job_done = asyncio.Event()
        followers = [asyncio.ensure_future(_follow(server.ws_url, job_done)) for _ in range(2)]
        await asyncio.sleep(0.5)
        sockets_before, rss_before = open_sockets(server.proc.pid), rss_kib(server.proc.pid)
        ws = RawWS(server.port)
        send_json(ws, {"type": "create_job", "job_type": "spam",
                       "params": {"count": 10000, "size": 2000}})

        def read_late() -> tuple[list[dict], int]:
            """Evicted within milliseconds; reads again 1 s later (within the
            3 s --write-timeout): what was buffered, then Close 1013."""
            time.sleep(1)
            messages, code = reads_late.messages_until_close(10)
            reads_late.send(close_frame(code))
            reads_late.wait_closed()
            return messages, code

        late = asyncio.ensure_future(asyncio.to_thread(read_late))
        all_seqs = await asyncio.gather(*followers)
        rss_after = rss_kib(server.proc.pid)
        ws.close()

        for seqs in all_seqs:  # every event, in order, no gaps
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert len(seqs) > 10000
        # 10,000 events of 2 KB went past each laggard: about 20 MB each if buffered
        assert rss_after - rss_before < 10 * 1024, (rss_before, rss_after)  # ~36 MB with no cap

        messages, code = await late
        assert code == 1013
        assert 0 < len(messages) < 5000
        # the one that never reads is dropped: its write does not wait forever
        deadline = time.monotonic() + 5
        while open_sockets(server.proc.pid) > sockets_before - 2:
            assert time.monotonic() < deadline, "laggards' sockets still open"
            await asyncio.sleep(0.2)
        never_reads.close()
        reads_late.close()
    finally:
        stop(server)
    assert_clean_log(server)


@pytest.mark.parametrize("writer", WRITERS)
async def test_slow_reader_within_its_buffer_gets_every_event_in_order(tmp_path, writer):
    """A client reading in small gulps, never past ``--max-subscriber-buffer``: its
    stream stays whole and in order while the server's write buffer for it fills and
    drains (a write must never overtake bytes still buffered)."""
    (tmp_path / "spamjobs.py").write_text(SPAM_JOBS)
    server = start(tmp_path, "--jobs", "spamjobs", "--max-subscriber-buffer",
                   str(64 << 20), *WRITERS[writer])
    try:
        slow = RawWS(server.port, rcvbuf=4096)
        first = slow.recv()[2]
        job_done = asyncio.Event()
        followers = [asyncio.ensure_future(_follow(server.ws_url, job_done)) for _ in range(2)]
        await asyncio.sleep(0.5)

        def read_slowly() -> list[int]:
            seqs, done = [json.loads(first)["seq"]], False
            while True:
                assert slow._fill(10), "the stream ended"
                while (parsed := slow._parse_one()) is not None:
                    message = json.loads(parsed[2])
                    if "seq" in message.get("data", {}) or message["type"] == "ping":
                        continue
                    seqs.append(message["seq"])
                    done = done or message["type"] == "job_completed"
                    if done and message["type"] == "worker_stats":
                        return seqs
                time.sleep(0.002)

        reading = asyncio.ensure_future(asyncio.to_thread(read_slowly))
        ws = RawWS(server.port)
        send_json(ws, {"type": "create_job", "job_type": "spam",
                       "params": {"count": 3000, "size": 2000}})
        for seqs in [await reading, *await asyncio.gather(*followers)]:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert len(seqs) > 3000
        ws.close()
        slow.close()
    finally:
        stop(server)
    assert_clean_log(server)


def test_client_that_does_not_read_replies_is_not_buffered_forever(tmp_path):
    server = start(tmp_path, "--write-timeout", "1")
    try:
        ws = RawWS(server.port, rcvbuf=4096)
        rss_before = rss_kib(server.proc.pid)
        request = frame(TEXT, b'{"type": "get_job_types"}')
        try:
            for _ in range(20000):
                ws.send(request)
        except OSError:
            pass  # the server stopped reading us, then dropped us
        time.sleep(2)
        assert rss_kib(server.proc.pid) - rss_before < 20 * 1024
        replies = 0
        deadline = time.monotonic() + 10
        while not ws.closed:
            assert time.monotonic() < deadline, "the server never gave up on us"
            try:
                opcode, _, _ = ws.recv(2)
            except AssertionError:
                break
            replies += opcode == TEXT
        assert replies < 19000  # dropped long before answering everything
        ws.close()
    finally:
        stop(server)
    assert_clean_log(server)
