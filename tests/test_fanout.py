"""Large channels are written a slice at a time (rawjobs/web/fanout.py). With
``--fanout-slice 2`` every channel here is "large", so these tests check that slicing
keeps each client's stream whole and in order: ``seq`` without gaps from
``queue_state.seq + 1``, replies after the broadcasts they follow, and SSE streams
that end right after their terminal event."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

import httpx
import pytest
import websockets


@pytest.fixture
def sliced(start_server):
    return start_server("--fanout-slice", "2", "--concurrency", "4", "--grace", "0")


async def _listen(url: str, stop: asyncio.Event, joined: asyncio.Event | None = None):
    """Messages one client gets until ``stop``; returns (queue_state, broadcasts)."""
    async with websockets.connect(url, max_queue=None) as ws:
        state = json.loads(await ws.recv())
        if joined is not None:
            joined.set()
        seen = []
        while not stop.is_set():
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
            except TimeoutError:
                continue
            if "seq" in message and message["type"] != "queue_state":
                seen.append(message)
        return state, seen


def test_every_client_gets_every_event_in_order_while_joining_mid_stream(sliced):
    async def scenario():
        stop = asyncio.Event()
        early = [asyncio.create_task(_listen(sliced.ws_url, stop)) for _ in range(12)]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=sliced.url, timeout=10) as client:
            async def create(i):
                r = await client.post("/api/jobs", json={"job_type": "fibonacci",
                                                         "params": {"count": 5}})
                assert r.status_code == 201
            creating = [asyncio.create_task(create(i)) for i in range(12)]
            late = []
            for _ in range(8):  # clients joining while broadcasts are being written
                await asyncio.sleep(0.02)
                late.append(asyncio.create_task(_listen(sliced.ws_url, stop)))
            await asyncio.gather(*creating)
            for _ in range(100):
                stats = (await client.get("/api/stats")).json()["queue"]
                if stats["completed"] == 12:
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        return await asyncio.gather(*early, *late)

    results = asyncio.run(scenario())
    totals = set()
    for state, seen in results:
        seqs = [m["seq"] for m in seen]
        assert seqs == list(range(state["seq"] + 1, state["seq"] + 1 + len(seqs))), seqs[:20]
        totals.add(seqs[-1] if seqs else state["seq"])
        finished: set[int] = set()
        for message in seen:  # nothing about a job after its terminal event
            job_id = message["data"].get("job_id")
            assert job_id is None or job_id not in finished, message
            if message["type"] == "job_completed":
                finished.add(job_id)
    assert len(totals) == 1  # every client ends at the same newest seq


def test_ack_follows_its_broadcast_when_writes_are_sliced(sliced):
    async def scenario():
        stop = asyncio.Event()
        others = [asyncio.create_task(_listen(sliced.ws_url, stop)) for _ in range(6)]
        await asyncio.sleep(0.3)
        async with websockets.connect(sliced.ws_url, max_queue=None) as ws:
            await ws.recv()
            order = []
            for _ in range(5):
                await ws.send(json.dumps({"type": "create_job", "job_type": "echo",
                                          "params": {"delay": 1}}))
            while sum(1 for kind, _ in order if kind == "job_created_ack") < 5:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if message["type"] == "job_created":
                    order.append(("job_created", message["data"]["id"]))
                elif message["type"] == "job_created_ack":
                    order.append(("job_created_ack", message["job_id"]))
        stop.set()
        await asyncio.gather(*others)
        return order

    order = asyncio.run(scenario())
    for position, (kind, job_id) in enumerate(order):
        if kind == "job_created_ack":
            assert ("job_created", job_id) in order[:position]


def test_sse_streams_end_after_their_terminal_event(sliced):
    job_id = httpx.post(sliced.url + "/api/jobs", json={"job_type": "fibonacci",
                                                        "params": {"count": 5}}).json()["id"]

    async def follow():
        events = []
        async with httpx.AsyncClient(timeout=15) as client, client.stream(
                "GET", f"{sliced.url}/api/jobs/{job_id}/progress") as r:
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
        return events

    async def scenario():
        return await asyncio.gather(*(follow() for _ in range(5)))

    for events in asyncio.run(scenario()):
        assert events[0] == "status" and events[-1] == "complete"
        assert events.count("complete") == 1


def _raw_subscriber(port: int) -> socket.socket:
    """A WebSocket client on a plain socket: the handshake, then nothing read."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/queue HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    sock.settimeout(5)
    assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
    return sock


def test_clients_reset_mid_broadcast_do_not_disturb_the_others(start_server):
    """Sliced channels written by three threads (``--fanout-threads 2``): clients that
    reset their connection while broadcasts are being written to them are dropped,
    and every other client still gets every event in order."""
    server = start_server("--fanout-slice", "2", "--fanout-threads", "2",
                          "--concurrency", "4", "--grace", "0")

    async def scenario():
        stop = asyncio.Event()
        listeners = [asyncio.create_task(_listen(server.ws_url, stop)) for _ in range(8)]
        doomed = [_raw_subscriber(server.port) for _ in range(24)]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for i in range(8):
                r = await client.post("/api/jobs", json={"job_type": "fibonacci",
                                                         "params": {"count": 10}})
                assert r.status_code == 201
                for sock in doomed[i * 3:(i + 1) * 3]:  # reset, not a clean close
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    sock.close()
                await asyncio.sleep(0.1)
            for _ in range(100):
                if (await client.get("/api/stats")).json()["queue"]["completed"] == 8:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            stop.set()
            results = await asyncio.gather(*listeners)
            stats = (await client.get("/api/stats")).json()
        return results, stats

    results, stats = asyncio.run(scenario())
    for state, seen in results:
        seqs = [m["seq"] for m in seen]
        assert seqs == list(range(state["seq"] + 1, state["seq"] + 1 + len(seqs)))
        assert sum(m["type"] == "job_completed" for m in seen) == 8
    assert stats["queue"]["completed"] == 8
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
