"""/ws/queue (PROTOCOL.md, "WebSocket: /ws/queue") through the `websockets` client
against a real server: queue_state, broadcast shape and seq, every client message and
its reply, the order of one job's events, fan-out to every client, keepalive."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import time

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

JOB_KEYS = {"id", "type", "params", "status", "progress", "result", "error",
            "created_at", "started_at", "completed_at"}
TERMINAL = ("job_completed", "job_failed", "job_cancelled")


class Feed:
    """A /ws/queue connection recording every message it receives."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.log: list[dict] = []
        self.state: dict = {}

    @classmethod
    async def open(cls, url: str, **kwargs) -> Feed:
        feed = cls(await ws_connect(url, max_size=None, **kwargs))
        feed.state = await feed.next()
        return feed

    async def next(self, timeout: float = 15.0) -> dict:
        msg = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.log.append(msg)
        return msg

    async def until(self, predicate, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(msg):
                return msg

    async def wait_for(self, predicate, timeout: float = 20.0) -> dict:
        """The first message so far matching ``predicate``, else the next one to come."""
        for msg in self.log:
            if predicate(msg):
                return msg
        return await self.until(predicate, timeout)

    async def send(self, message) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def reply(self, message, timeout: float = 10.0) -> dict:
        """Send ``message`` and return the next direct (flat, non-broadcast) reply."""
        await self.send(message)
        return await self.until(lambda m: "data" not in m, timeout)

    async def quiet(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await self.next(left)
            except TimeoutError:
                return

    def broadcasts(self) -> list[dict]:
        return [m for m in self.log if "data" in m and "seq" in m]

    def about(self, job_id: int) -> list[dict]:
        return [m for m in self.broadcasts()
                if m["data"].get("job_id") == job_id
                or (m["type"] == "job_created" and m["data"].get("id") == job_id)]

    async def close(self) -> None:
        await self.ws.close()


def is_event(type_: str, job_id: int | None = None):
    def check(m: dict) -> bool:
        if m.get("type") != type_ or "data" not in m:
            return False
        if job_id is None:
            return True
        return m["data"].get("job_id", m["data"].get("id")) == job_id
    return check


def terminal_of(job_id: int):
    return lambda m: (m.get("type") in TERMINAL and "data" in m
                      and m["data"]["job_id"] == job_id)


def rest(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=10)


# -- queue_state and broadcasts -------------------------------------------------------------


async def test_queue_state_on_connect(server):
    async with rest(server) as c:
        empty = await Feed.open(server.ws_url)
        state = empty.state
        assert state["type"] == "queue_state"
        assert "data" not in state
        assert {"type", "jobs", "stats", "worker", "job_types", "seq"} <= set(state)
        assert state["jobs"] == []
        assert state["stats"] == {"pending": 0, "running": 0, "completed": 0, "failed": 0,
                                  "cancelled": 0, "total": 0}
        assert state["worker"] == {"active": 0, "capacity": 3, "processed": 0,
                                   "is_running": True}
        assert state["job_types"] == (await c.get("/api/job-types")).json()
        assert type(state["seq"]) is int
        await empty.close()

        done = (await c.post("/api/jobs", json={"job_type": "fibonacci",
                                                "params": {"count": 5}})).json()["id"]
        waiting = (await c.post("/api/jobs", json={"job_type": "countdown",
                                                   "params": {"seconds": 30}})).json()["id"]
        for _ in range(200):
            if (await c.get(f"/api/jobs/{done}")).json()["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        feed = await Feed.open(server.ws_url)
        stats = (await c.get("/api/stats")).json()
        state = feed.state
        assert [j["id"] for j in state["jobs"]] == [waiting, done]  # newest first
        for job in state["jobs"]:
            assert JOB_KEYS <= set(job)
        assert state["jobs"][1]["status"] == "completed"
        assert state["jobs"][1]["result"]["sequence"] == [0, 1, 1, 2, 3]
        assert state["jobs"][0]["status"] == "running"
        assert state["stats"] == stats["queue"]
        assert state["worker"] == stats["worker"]
        assert state["seq"] > empty.state["seq"]
        await feed.close()


async def test_broadcast_shape_and_seq(server):
    first = await Feed.open(server.ws_url)
    async with rest(server) as c:
        job_id = (await c.post("/api/jobs", json={"job_type": "countdown",
                                                  "params": {"seconds": 2}})).json()["id"]
        await first.wait_for(is_event("job_progress", job_id))  # 2 s before it ends
        # a client that joins mid-job continues exactly after its snapshot
        second = await Feed.open(server.ws_url)
        await first.wait_for(terminal_of(job_id))
        await second.wait_for(terminal_of(job_id))
        await first.until(is_event("worker_stats"))
        await second.until(is_event("worker_stats"))
    await first.close()
    await second.close()

    for feed in (first, second):
        events = feed.broadcasts()
        assert events, feed.log
        for m in events:
            assert set(m) == {"type", "data", "seq"}, m
            assert isinstance(m["data"], dict) and type(m["seq"]) is int
        seqs = [m["seq"] for m in events]
        assert seqs[0] == feed.state["seq"] + 1
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert second.state["seq"] > first.state["seq"]
    assert [j["id"] for j in second.state["jobs"]] == [job_id]
    assert second.state["jobs"][0]["status"] == "running"
    # from the second snapshot on, both saw the same events
    tail = [m for m in first.broadcasts() if m["seq"] > second.state["seq"]]
    assert tail == second.broadcasts()


async def test_event_order_for_one_job(server):
    feed = await Feed.open(server.ws_url)
    ack = await feed.reply({"type": "create_job", "job_type": "fibonacci",
                            "params": {"count": 5}})
    job_id = ack["job_id"]
    await feed.wait_for(terminal_of(job_id))
    await feed.until(is_event("worker_stats"))
    await feed.close()

    relevant = [m for m in feed.broadcasts()
                if m in feed.about(job_id) or m["type"] == "worker_stats"]
    types = [m["type"] for m in relevant]
    assert re.fullmatch(r"job_created job_started worker_stats (job_progress )+job_completed "
                        r"worker_stats", " ".join(types)), types
    data = [m["data"] for m in relevant]
    assert set(data[1]) == {"job_id", "started_at"} and isinstance(data[1]["started_at"], float)
    assert data[2] == {"active": 1, "capacity": 3, "processed": 0, "is_running": True}
    progress = [m["data"] for m in relevant if m["type"] == "job_progress"]
    for d in progress:
        assert set(d) == {"job_id", "percent", "message"}
    assert progress[-1] == {"job_id": job_id, "percent": 100, "message": "Complete!"}
    assert [d["percent"] for d in progress] == sorted(d["percent"] for d in progress)
    assert data[-2]["job_id"] == job_id
    assert set(data[-2]) == {"job_id", "result", "duration"}
    assert data[-2]["result"]["sequence"] == [0, 1, 1, 2, 3]
    assert isinstance(data[-2]["duration"], (int, float)) and data[-2]["duration"] >= 0.3
    assert data[-1] == {"active": 0, "capacity": 3, "processed": 1, "is_running": True}


async def test_two_clients_receive_every_broadcast(server):
    a = await Feed.open(server.ws_url)
    b = await Feed.open(server.ws_url)
    assert a.state["seq"] == b.state["seq"]
    ids = []
    for count in (5, 6):
        ack = await a.reply({"type": "create_job", "job_type": "fibonacci",
                             "params": {"count": count}})
        assert ack["type"] == "job_created_ack"
        ids.append(ack["job_id"])
    for feed in (a, b):
        for job_id in ids:
            await feed.wait_for(terminal_of(job_id))
    # the last worker_stats of both jobs
    for feed in (a, b):
        await feed.wait_for(lambda m: m.get("type") == "worker_stats"
                            and m["data"]["processed"] == 2 and m["data"]["active"] == 0)
    await a.quiet(0.3)
    await b.quiet(0.3)
    await a.close()
    await b.close()
    assert a.broadcasts() == b.broadcasts()
    assert len(a.broadcasts()) >= 2 * (1 + 1 + 1 + 5 + 1 + 1)
    # direct replies go only to the client that asked
    assert not [m for m in b.log if m["type"] == "job_created_ack"]


# -- client messages -------------------------------------------------------------------------


async def test_create_job_broadcasts_then_acks(server):
    feed = await Feed.open(server.ws_url)
    await feed.send({"type": "create_job", "job_type": "echo",
                     "params": {"message": "hey", "delay": "1"}})
    ack = await feed.until(lambda m: m.get("type") == "job_created_ack")
    assert ack == {"type": "job_created_ack", "job_id": 1}
    created = [m for m in feed.log if m.get("type") == "job_created"]
    assert len(created) == 1
    assert feed.log.index(created[0]) < feed.log.index(ack)
    job = created[0]["data"]
    assert JOB_KEYS <= set(job)
    assert (job["id"], job["type"], job["params"], job["status"]) == (
        1, "echo", {"message": "hey", "delay": 1}, "pending")
    assert job["progress"] == {"percent": 0, "message": "Queued"}

    # missing params take their defaults
    ack = await feed.reply({"type": "create_job", "job_type": "countdown"})
    assert ack == {"type": "job_created_ack", "job_id": 2}
    created = await feed.wait_for(is_event("job_created", 2))
    assert created["data"]["params"] == {"seconds": 10}
    await feed.wait_for(terminal_of(1))
    await feed.close()
    async with rest(server) as c:
        job = (await c.get("/api/jobs/1")).json()
    assert job["result"] == {"message": "hey", "echoed": "hey", "delay": 1}


async def test_cancel_job_messages(server):
    feed = await Feed.open(server.ws_url)
    ids = []
    for _ in range(4):
        ack = await feed.reply({"type": "create_job", "job_type": "countdown",
                                "params": {"seconds": 30}})
        ids.append(ack["job_id"])
    running, pending = ids[0], ids[3]
    await feed.wait_for(is_event("job_started", running))

    for job_id in (pending, running):  # pending first: cancelling `running` frees a slot
        reply = await feed.reply({"type": "cancel_job", "job_id": job_id})
        assert reply == {"type": "job_cancelled_ack", "job_id": job_id, "success": True}
        event = await feed.wait_for(is_event("job_cancelled", job_id))
        assert event["data"] == {"job_id": job_id}

    reply = await feed.reply({"type": "cancel_job", "job_id": running})
    assert reply["type"] == "error"
    assert reply["message"] == "Cannot cancel job in status: cancelled"

    done = (await feed.reply({"type": "create_job", "job_type": "fibonacci",
                              "params": {"count": 5}}))["job_id"]
    await feed.wait_for(terminal_of(done))
    reply = await feed.reply({"type": "cancel_job", "job_id": done})
    assert reply["type"] == "error"
    assert reply["message"] == "Cannot cancel job in status: completed"
    assert set(reply) <= {"type", "message", "job_id"}, reply

    reply = await feed.reply({"type": "cancel_job", "job_id": 7})
    assert reply["type"] == "error"
    assert reply["message"] == "Job not found: 7"
    assert set(reply) <= {"type", "message", "job_id"}, reply
    await feed.close()

    async with rest(server) as c:
        assert (await c.get(f"/api/jobs/{running}")).json()["status"] == "cancelled"
        assert (await c.get(f"/api/jobs/{pending}")).json()["status"] == "cancelled"
    assert "job_started" not in [m["type"] for m in feed.about(pending)]


async def test_cancel_job_running_the_instant_it_started(server):
    """Cancelling the job that just took a freed slot stops it and frees the slot again:
    after every cancel the worker is idle, and a new job still runs."""
    feed = await Feed.open(server.ws_url)
    async with rest(server) as c:
        for _ in range(5):
            ids = []
            for _ in range(4):
                ack = await feed.reply({"type": "create_job", "job_type": "countdown",
                                        "params": {"seconds": 30}})
                ids.append(ack["job_id"])
            await feed.wait_for(is_event("job_started", ids[2]))
            # freeing a slot starts ids[3] at once; cancel it as soon as possible
            for job_id in (ids[0], ids[3], ids[1], ids[2]):
                reply = await feed.reply({"type": "cancel_job", "job_id": job_id})
                assert reply["type"] == "job_cancelled_ack", reply
            for _ in range(60):  # the slots come back at once; allow 3 s
                stats = (await c.get("/api/stats")).json()
                if stats["worker"]["active"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert stats["queue"]["running"] == 0 and stats["queue"]["pending"] == 0, stats
            assert stats["worker"]["active"] == 0, f"a cancelled job kept its slot: {stats}"
        done = (await feed.reply({"type": "create_job", "job_type": "fibonacci",
                                  "params": {"count": 5}}))["job_id"]
        await feed.wait_for(terminal_of(done), timeout=10)
    await feed.close()


async def test_clear_completed_message(server):
    feed = await Feed.open(server.ws_url)
    ids = []
    for _ in range(2):
        ack = await feed.reply({"type": "create_job", "job_type": "fibonacci",
                                "params": {"count": 5}})
        ids.append(ack["job_id"])
    keep = (await feed.reply({"type": "create_job", "job_type": "countdown",
                              "params": {"seconds": 30}}))["job_id"]
    for job_id in ids:
        await feed.wait_for(terminal_of(job_id))

    await feed.send({"type": "clear_completed"})
    ack = await feed.until(lambda m: m.get("type") == "jobs_cleared_ack")
    assert ack == {"type": "jobs_cleared_ack", "cleared": 2}
    cleared = [m for m in feed.log if m.get("type") == "jobs_cleared"]
    assert len(cleared) == 1 and cleared[0]["data"] == {"count": 2}

    state = await feed.reply({"type": "get_state"})
    assert [j["id"] for j in state["jobs"]] == [keep]
    assert state["stats"]["completed"] == 0 and state["stats"]["total"] == 1

    assert await feed.reply({"type": "clear_completed"}) == {"type": "jobs_cleared_ack",
                                                             "cleared": 0}
    await feed.close()


async def test_get_state_get_job_types_and_ping(server):
    feed = await Feed.open(server.ws_url)
    ack = await feed.reply({"type": "create_job", "job_type": "fibonacci",
                            "params": {"count": 5}})
    await feed.wait_for(terminal_of(ack["job_id"]))
    await feed.until(is_event("worker_stats"))
    await feed.quiet(0.2)

    state = await feed.reply({"type": "get_state"})
    assert state["type"] == "queue_state" and "data" not in state
    assert {"jobs", "stats", "worker", "job_types", "seq"} <= set(state)
    assert state["seq"] == feed.broadcasts()[-1]["seq"]
    assert [j["id"] for j in state["jobs"]] == [ack["job_id"]]
    assert state["jobs"][0]["status"] == "completed"
    assert state["stats"]["completed"] == 1
    assert state["worker"]["processed"] == 1

    async with rest(server) as c:
        job_types = (await c.get("/api/job-types")).json()
    reply = await feed.reply({"type": "get_job_types"})
    assert reply == {"type": "job_types", "job_types": job_types}
    assert state["job_types"] == job_types

    assert await feed.reply({"type": "ping", "ts": 1764446400}) == {"type": "pong",
                                                                    "ts": 1764446400}
    assert await feed.reply({"type": "ping", "ts": 12}) == {"type": "pong", "ts": 12}
    await feed.close()


INVALID = [
    ("not json", None),
    ("{", None),
    ("[1, 2]", None),
    ('"create_job"', None),
    ("42", None),
    ("null", None),
    ("{}", None),
    ('{"type": "bogus"}', None),
    ('{"type": 5}', None),
    ('{"type": "create_job"}', None),
    ('{"type": "create_job", "job_type": "nope"}', None),
    ('{"type": "create_job", "job_type": "countdown", "params": {"seconds": 0}}', "seconds"),
    ('{"type": "create_job", "job_type": "countdown", "params": {"seconds": 2.5}}', "seconds"),
    ('{"type": "create_job", "job_type": "countdown", "params": {"seconds": true}}',
     "seconds"),
    ('{"type": "create_job", "job_type": "echo", "params": {"message": ""}}', "message"),
    ('{"type": "create_job", "job_type": "countdown", "params": {"speed": 1}}', "speed"),
    ('{"type": "cancel_job"}', None),
    ('{"type": "cancel_job", "job_id": "abc"}', None),
]


async def test_invalid_messages_get_an_error_and_the_connection_stays_open(server):
    feed = await Feed.open(server.ws_url)
    for text, name in INVALID:
        reply = await feed.reply(text)
        assert reply["type"] == "error", (text, reply)
        assert isinstance(reply["message"], str) and reply["message"], (text, reply)
        if name is not None:
            assert name in reply["message"] or reply.get("param") == name, (text, reply)
    # nothing was created, and the connection still works
    assert not [m for m in feed.log if m.get("type") == "job_created"]
    assert await feed.reply({"type": "ping", "ts": 5}) == {"type": "pong", "ts": 5}
    ack = await feed.reply({"type": "create_job", "job_type": "fibonacci",
                            "params": {"count": 5}})
    assert ack == {"type": "job_created_ack", "job_id": 1}
    await feed.close()


# -- handshake and keepalive -------------------------------------------------------------------


async def test_origin_checked_before_the_upgrade(server):
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(server.ws_url, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    own = await Feed.open(server.ws_url, origin=server.url)  # the server's own origin
    assert own.state["type"] == "queue_state"
    await own.close()


async def test_silent_client_that_answers_pings_stays_connected(start_server):
    server = start_server("--ws-ping-interval", "1")
    # ping_interval=None: the client sends nothing of its own; it still answers pings
    feed = await Feed.open(server.ws_url, ping_interval=None)
    await feed.quiet(2.5)  # past two pings
    assert await feed.reply({"type": "ping", "ts": 1}) == {"type": "pong", "ts": 1}
    await feed.close()


def _recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exact(8))[0]
    return b0 & 0x0F, exact(n)


def test_peer_that_never_answers_pings_is_closed(start_server):
    server = start_server("--ws-ping-interval", "1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/queue HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    opcodes = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < 8:
            opcode, payload = _recv_frame(sock)
            opcodes.append(opcode)
            if opcode == 0x8:
                break
    finally:
        sock.close()
    assert 0x9 in opcodes, f"no ping before the close: {opcodes}"
    assert opcodes[-1] == 0x8, opcodes
    assert struct.unpack("!H", payload[:2])[0] == 1011
