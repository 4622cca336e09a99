"""Regressions for what an adversarial review broke: input that must be refused
cleanly and change nothing, and floods that must not grow the server's memory."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import httpx
import websockets

NAN_MODULE = '''
from rawjobs import job_type, JobContext

@job_type("badresult", description="Returns what strict JSON cannot carry")
async def badresult(ctx: JobContext) -> dict:
    return {"x": float("inf"), "y": float("nan")}

@job_type("surrogate", description="Reports a lone surrogate")
async def surrogate(ctx: JobContext) -> dict:
    await ctx.progress(50, "half \\ud800 way")
    raise RuntimeError("bad \\udfff error")
'''


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_job(client, job_id, statuses=("completed", "failed", "cancelled"), timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_lone_surrogates_are_refused_and_change_nothing(server, client):
    body = '{"job_type":"echo","params":{"message":"\\ud800","delay":1}}'
    r = client.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]
    for text in ('{"job_type":"\\ud800"}', '{"job_type":"echo","params":{"\\udfff":1}}'):
        r = client.post("/api/jobs", content=text, headers={"Content-Type": "application/json"})
        assert r.status_code == 400
    assert client.get("/api/stats").json()["queue"]["total"] == 0
    assert client.get("/api/jobs").status_code == 200

    async def over_websocket():
        async with websockets.connect(server.ws_url) as ws:
            await ws.recv()
            await ws.send('{"type":"create_job","job_type":"echo","params":{"message":"\\ud800"}}')
            reply = json.loads(await ws.recv())
            await ws.send('{"type":"ping","ts":"\\ud800"}')
            second = json.loads(await ws.recv())
            await ws.send('{"type":"get_job_types"}')
            third = json.loads(await ws.recv())
            return reply, second, third

    reply, second, third = asyncio.run(over_websocket())
    assert reply["type"] == "error" and second["type"] == "error"
    assert third["type"] == "job_types"  # the connection stayed open


def test_handler_output_that_json_cannot_carry(start_server, tmp_path):
    (tmp_path / "hostilejobs.py").write_text(NAN_MODULE)
    server = start_server("--jobs", "hostilejobs")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        bad = client.post("/api/jobs", json={"job_type": "badresult"}).json()["id"]
        job = wait_job(client, bad)
        assert job["status"] == "failed" and "not valid JSON" in job["error"]
        weird = client.post("/api/jobs", json={"job_type": "surrogate"}).json()["id"]
        job = wait_job(client, weird)
        assert job["status"] == "failed" and job["error"] == "bad \\udfff error"
        listing = client.get("/api/jobs")
        assert listing.status_code == 200
        json.loads(listing.text, parse_constant=lambda name: (_ for _ in ()).throw(
            AssertionError(f"{name} in a response")))
    assert "event subscriber failed" not in server.log()


def test_websocket_message_type_of_the_wrong_kind(server):
    async def scenario():
        async with websockets.connect(server.ws_url) as ws:
            await ws.recv()
            replies = []
            for text in ('{"type":[1]}', '{"type":{}}', '{"type":null}', '{"type":7}',
                         '{"type":"cancel_job","job_id":"1\\n"}'):
                await ws.send(text)
                replies.append(json.loads(await ws.recv()))
            return replies

    assert all(r["type"] == "error" for r in asyncio.run(scenario()))


def test_odd_numbers_and_headers(server, client):
    assert client.get("/api/jobs", params={"limit": "0" * 5000 + "1"}).status_code == 400
    r = client.post("/api/jobs", json={"job_type": "countdown", "params": {"seconds": "2\n"}})
    assert r.status_code == 400 and r.json()["param"] == "seconds"
    assert client.get("/api/stats", headers={"Host": "[::1]evil.com"}).status_code == 400
    key = base64.b64encode(os.urandom(16)).decode()
    r = client.get("/ws/queue", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                         "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
                                         "Origin": "http://[::1"})
    assert r.status_code == 403


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + body


def test_get_state_flood_from_a_client_that_does_not_read(server, client):
    message = "m" * 200
    for _ in range(80):  # a queue_state of some 40 KB
        client.post("/api/jobs", json={"job_type": "echo",
                                       "params": {"message": message, "delay": 30}})
    before = rss_kib(server.proc.pid)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/queue HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    flood = _masked_text(b'{"type":"get_state"}') * 3000  # ~78 KB: two reads' worth
    sock.sendall(flood)
    try:
        slowest = 0.0
        for _ in range(10):
            started = time.monotonic()
            assert client.get("/api/stats").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
        grown = rss_kib(server.proc.pid) - before
    finally:
        sock.close()
    assert slowest < 1.0, f"/api/stats took {slowest:.2f} s during the flood"
    assert grown < 20_000, f"server RSS grew by {grown} KiB"
