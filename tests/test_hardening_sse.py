"""Issue 5, points 3 (SSE side) and 5: the progress event stream
(``GET /api/jobs/{id}/progress``) against idle, vanishing and slow clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, launch, stop
from httpx_sse import aconnect_sse

from rawjobs.web.sse import encode_event

SPAM_JOBS = '''
import asyncio
from rawjobs import Param, job_type

@job_type("spam", description="Many progress events, fast",
          params=[Param("count", int, default=10000, min=1, max=100000),
                  Param("size", int, default=1000, min=0, max=10000),
                  Param("pause", int, default=2, min=0, max=100)])
async def spam(ctx):
    count, pad = ctx.params["count"], "x" * ctx.params["size"]
    await asyncio.sleep(0.5)
    for i in range(count):
        await ctx.progress(i * 100 // count, f"{i} {pad}")
        if i % 25 == 0:  # pause ms every 25 events: the pace a reading client keeps
            await asyncio.sleep(ctx.params["pause"] / 1000)
    return {"count": count}

@job_type("lines", description="A progress message with newlines",
          params=[Param("text", str, default="a")])
async def lines(ctx):
    await ctx.progress(50, ctx.params["text"])
    return {"text": ctx.params["text"]}
'''
FIELD_LINE = re.compile(r"^(id: \d+|event: [a-z]+|data: .*|retry: \d+|: .*|)$")


def start(directory: Path, *args: str) -> ServerProcess:
    (directory / "sse_jobs.py").write_text(SPAM_JOBS)
    return launch(directory, "--grace", "0", "--jobs", "sse_jobs", *args)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One worker kept busy by a 60 s countdown, so later jobs stay pending and send
    no events; keepalive comments every 0.5 s; head and keep-alive timeouts 1 s."""
    server = start(tmp_path_factory.mktemp("sse"), "--concurrency", "1",
                   "--sse-keepalive", "0.5", "--head-timeout", "1",
                   "--keepalive-timeout", "1", "--log-level", "debug")
    with httpx.Client(base_url=server.url) as client:
        client.post("/api/jobs", json={"job_type": "countdown", "params": {"seconds": 60}})
    yield server
    stop(server)
    assert "Traceback" not in server.log()


def pending_job(server: ServerProcess) -> int:
    r = httpx.post(server.url + "/api/jobs", json={"job_type": "echo"})
    assert r.status_code == 201
    return r.json()["id"]


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def sse_request(port: int, job_id: int, extra: str = "") -> bytes:
    return (f"GET /api/jobs/{job_id}/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n").encode()


# -- 5. framing ---------------------------------------------------------------------------


@pytest.mark.parametrize("data, lines", [
    ("one", ["data: one"]),
    ("a\nb", ["data: a", "data: b"]),
    ("a\r\nb\rc", ["data: a", "data: b", "data: c"]),
    ("tail\n", ["data: tail", "data: "]),
    ("", ["data: "]),
])
def test_encode_event_splits_data_lines(data, lines):
    assert encode_event(data).decode() == "\n".join(lines) + "\n\n"


def test_encode_event_strips_newlines_from_id_and_event():
    out = encode_event("x", event="prog\nress", id="4\r\n2").decode()
    assert out == "id: 42\nevent: progress\ndata: x\n\n"


async def test_newlines_in_data_never_break_the_stream(shared):
    """End to end: a progress message with CR, LF and CRLF arrives intact, and every
    line on the wire is one SSE field."""
    text = "one\ntwo\r\nthree\rfour\n\ndata: fake"
    async with httpx.AsyncClient(base_url=shared.url, timeout=10) as client:
        job = (await client.post("/api/jobs", json={"job_type": "lines",
                                                    "params": {"text": text}})).json()["id"]
        await client.delete(f"/api/jobs/{job}")  # finished: the stream is replayed
        async with client.stream("GET", f"/api/jobs/{job}/progress") as r:
            raw = (await r.aread()).decode()
    assert all(FIELD_LINE.match(line) for line in raw.split("\n")), raw
    async with httpx.AsyncClient(base_url=shared.url, timeout=10) as client:
        job = await client.post("/api/jobs", json={"job_type": "lines",
                                                   "params": {"text": text}})
        following = asyncio.ensure_future(_collect_progress(shared.url, job.json()["id"]))
        await asyncio.sleep(0.3)
        await client.delete("/api/jobs/1")  # free the worker: the job runs now
        try:
            received = await following
        finally:
            await client.post("/api/jobs", json={"job_type": "countdown",
                                                 "params": {"seconds": 60}})
    assert text in received


async def _collect_progress(url: str, job_id: int) -> list[str]:
    messages = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        async with aconnect_sse(client, "GET", f"/api/jobs/{job_id}/progress") as source:
            async for event in source.aiter_sse():
                if event.event == "progress":
                    messages.append(json.loads(event.data)["message"])
    return messages


# -- 5. keepalive, disconnects, Last-Event-ID ------------------------------------------------


def test_keepalive_comments_and_timers_end_with_the_request(shared):
    job = pending_job(shared)
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(sse_request(shared.port, job))
        sock.settimeout(0.2)
        out = b""
        deadline = time.monotonic() + 2.6  # past the 1 s head and keep-alive timeouts
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            assert chunk, "the stream ended"
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"event: status" in out
    assert 3 <= out.count(b": keepalive\n") <= 7  # every 0.5 s
    assert b"408" not in out.split(b"\r\n", 1)[0]


def test_disconnect_noticed_within_a_second_without_events(shared):
    job = pending_job(shared)  # pending behind the countdown: no event will come
    pid = shared.proc.pid
    time.sleep(0.3)
    baseline = open_sockets(pid)
    sock = socket.create_connection(("127.0.0.1", shared.port), timeout=5)
    sock.sendall(sse_request(shared.port, job))
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert open_sockets(pid) == baseline + 1
    sock.close()
    gone = time.monotonic()
    while open_sockets(pid) > baseline:
        assert time.monotonic() - gone < 1.0, "the server kept the stream"
        time.sleep(0.02)
    assert "event stream to ('127.0.0.1'" in shared.log()


def test_last_event_id_after_the_end_gets_204(shared):
    job = pending_job(shared)
    httpx.delete(f"{shared.url}/api/jobs/{job}")  # cancelled: finished
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as sock:
        sock.sendall(sse_request(shared.port, job))
        out = b""
        while not out.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            out += chunk
    ids = [int(i) for i in re.findall(rb"^id: (\d+)$", out, re.MULTILINE)]
    assert b"event: cancelled" in out and len(ids) == 2
    terminal = ids[-1]
    with httpx.Client(base_url=shared.url) as client:
        url = f"/api/jobs/{job}/progress"
        assert client.get(url, headers={"Last-Event-ID": str(terminal)}).status_code == 204
        again = client.get(url, headers={"Last-Event-ID": str(terminal - 1)})
        assert again.status_code == 200 and "event: cancelled" in again.text
        assert client.get(url, headers={"Last-Event-ID": "junk"}).status_code == 200


# -- 3. slow SSE clients ------------------------------------------------------------------------


class Laggard:
    """A raw SSE client with a tiny receive buffer that does not read."""

    def __init__(self, port: int, job_id: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(sse_request(port, job_id))

    def read_all(self, timeout: float = 10) -> bytes:
        self.sock.settimeout(timeout)
        out = b""
        while chunk := self.sock.recv(1 << 20):
            out += chunk
        return out


async def test_laggard_stream_ends_and_others_get_every_event(tmp_path):
    server = start(tmp_path, "--write-timeout", "3", "--max-subscriber-buffer", "262144")
    try:
        job = (await asyncio.to_thread(
            httpx.post, server.url + "/api/jobs",
            json={"job_type": "spam", "params": {"count": 10000, "size": 1000, "pause": 6}})).json()["id"]
        reads_late, never_reads = Laggard(server.port, job), Laggard(server.port, job)
        followers = [asyncio.ensure_future(_collect_progress(server.url, job)) for _ in range(2)]
        await asyncio.sleep(0.3)  # the job starts sending 0.5 s after it was created
        sockets_before, rss_before = open_sockets(server.proc.pid), rss_kib(server.proc.pid)

        def read_late() -> bytes:
            time.sleep(1.5)  # long evicted by then, and within --write-timeout
            return reads_late.read_all()

        late = asyncio.ensure_future(asyncio.to_thread(read_late))
        for messages in await asyncio.gather(*followers):
            numbered = [int(m.split()[0]) for m in messages if m[:1].isdigit()]
            assert numbered == list(range(10000))  # every event, in order
            assert messages[-1] == "Complete!"
        assert rss_kib(server.proc.pid) - rss_before < 5 * 1024  # ~15 MB with no cap
        out = await late
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n0\r\n\r\n")
        # ended early (what the kernel's socket buffers held, then the end of stream)
        assert out.count(b"event: progress") < 9000 and b"event: complete" not in out
        deadline = time.monotonic() + 5
        while open_sockets(server.proc.pid) > sockets_before - 4:
            assert time.monotonic() < deadline, "a laggard's socket is still open"
            await asyncio.sleep(0.2)
        reads_late.sock.close()
        never_reads.sock.close()
    finally:
        stop(server)
    assert "Traceback" not in server.log()
