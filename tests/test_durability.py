"""Durable jobs with real processes (issue 3): kill -9, restarts, graceful shutdown,
retention and paging over the SQLite store.

Every server here runs ``python -m rawjobs`` with an SQLite file in the test's
directory (``--db jobs.db``) unless the test says otherwise, and a short ``--grace``
so that stopping it at the end of a test is quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from rawjobs.core.store.sqlite import SQLiteStore

GRACE = ("--grace", "0.5")
# max_queue=None: never stop reading, or a client with unread broadcasts would not see
# the server's Close frame behind them (websockets' own flow control)
WS_OPTIONS: dict[str, Any] = {"max_size": None, "max_queue": None, "ping_interval": None}
ECHO = {"job_type": "echo", "params": {"message": "durable", "delay": 30}}


# -- helpers -----------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``check()`` until it returns something truthy; return it. AssertionError
    (with the last value seen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


async def await_until(check: Callable[[], Any], timeout: float = 20.0,
                      interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=15)


def create(client: httpx.Client, job_type: str, params: dict[str, Any] | None = None,
           **options: Any) -> int:
    r = client.post("/api/jobs", json={"job_type": job_type, "params": params or {}, **options})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def get_job(client: httpx.Client, job_id: int) -> dict[str, Any]:
    r = client.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200, (job_id, r.status_code, r.text)
    return r.json()


def job_is(client: httpx.Client, job_id: int, *statuses: str, **fields: Any):
    """A check for ``wait_until``: the job when its status is one of ``statuses`` and
    it has ``fields``, else False."""
    def check():
        job = get_job(client, job_id)
        if job["status"] in statuses and all(job.get(k) == v for k, v in fields.items()):
            return job
        return False
    return check


def walk_pages(client: httpx.Client, path: str = "/api/jobs?limit=1000") -> list[list[int]]:
    """Follow ``Link: rel="next"`` from ``path``; the ids of each page."""
    pages: list[list[int]] = []
    url: str | None = path
    while url is not None:
        r = client.get(url)
        assert r.status_code == 200, r.text
        pages.append([job["id"] for job in r.json()])
        url = r.links.get("next", {}).get("url")
        assert len(pages) < 10_000, "Link rel=next never ends"
    return pages


def all_ids(client: httpx.Client) -> list[int]:
    return [job_id for page in walk_pages(client) for job_id in page]


async def async_all_ids(client: httpx.AsyncClient) -> list[int]:
    out: list[int] = []
    url: str | None = "/api/jobs?limit=1000"
    while url is not None:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        out.extend(job["id"] for job in r.json())
        url = r.links.get("next", {}).get("url")
    return out


def sigkill(server) -> float:
    """kill -9 the server; returns the monotonic time of the signal."""
    t = time.monotonic()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    return t


class Feed:
    """A /ws/queue connection that records every broadcast event with its arrival
    time (``events``: ``(monotonic, message)``) and the ``seq`` values seen."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.state: dict[str, Any] | None = None
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.ended = False
        self.close_rcvd = None  # the server's Close frame (code, reason), if one came
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str) -> Feed:
        ws = await ws_connect(url, open_timeout=10, **WS_OPTIONS)
        feed = cls(ws)
        feed.state = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert feed.state["type"] == "queue_state"
        feed._task = asyncio.create_task(feed._read())
        return feed

    async def _read(self) -> None:
        try:
            async for text in self.ws:  # ends quietly on a normal close (1000, 1001)
                self.events.append((time.monotonic(), json.loads(text)))
        except (ConnectionClosed, OSError):
            pass
        self.ended = True
        self.close_rcvd = self.ws.protocol.close_rcvd

    def seqs(self) -> list[int]:
        out = [self.state["seq"]] if self.state else []
        out += [m["seq"] for _, m in self.events if "seq" in m]
        return out

    def progress(self, job_id: int) -> list[tuple[float, str]]:
        return [(t, m["data"]["message"]) for t, m in self.events
                if m.get("type") == "job_progress" and m["data"]["job_id"] == job_id]

    async def close(self) -> None:
        try:
            await self.ws.close()
        except Exception:
            pass
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except Exception:
                self._task.cancel()


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "jobs.db")


# -- acknowledged means stored -------------------------------------------------------------


async def test_kill_9_during_creation_keeps_every_acknowledged_job(start_server, db):
    server = start_server("--concurrency", "2", *GRACE, db=db)
    acked: list[int] = []
    refused: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def rest_creator(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                r = await client.post("/api/jobs", json=ECHO)
            except httpx.HTTPError:
                await asyncio.sleep(0.01)
                continue
            if r.status_code == 201:
                acked.append(r.json()["id"])
            else:
                refused.append((r.status_code, r.text))

    async def ws_creator() -> None:
        window = asyncio.Semaphore(16)
        try:
            async with ws_connect(server.ws_url, **WS_OPTIONS) as ws:
                await ws.recv()  # queue_state

                async def receive() -> None:
                    async for text in ws:
                        message = json.loads(text)
                        if message.get("type") == "job_created_ack":
                            acked.append(message["job_id"])
                            window.release()
                        elif message.get("type") == "error":
                            refused.append((0, text))
                            window.release()

                receiver = asyncio.create_task(receive())
                while not stop.is_set() and not receiver.done():
                    try:
                        await asyncio.wait_for(window.acquire(), 0.5)
                    except TimeoutError:
                        continue
                    await ws.send(json.dumps({"type": "create_job", **ECHO}))
                await receiver
        except (ConnectionClosed, OSError):
            pass

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as client:
        tasks = [asyncio.create_task(rest_creator(client)) for _ in range(32)]
        tasks += [asyncio.create_task(ws_creator()) for _ in range(2)]
        started = time.monotonic()
        while (time.monotonic() - started < 1.5 or len(acked) < 300) \
                and time.monotonic() - started < 15:
            await asyncio.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)     # mid-stream: requests are in flight
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    server.proc.wait(10)

    assert refused == []
    assert len(acked) >= 300
    assert len(acked) == len(set(acked)), "one id acknowledged twice"

    again = start_server("--concurrency", "2", *GRACE, db=db, port=server.port)
    with http(again) as client:
        ids = all_ids(client)
        assert len(ids) == len(set(ids)), "a job listed twice"
        missing = sorted(set(acked) - set(ids))
        assert missing == [], f"{len(missing)} acknowledged jobs lost, e.g. {missing[:10]}"
        assert client.get("/api/stats").json()["queue"]["total"] == len(ids)
        new_id = create(client, "echo", {"message": "after", "delay": 1})
        assert new_id > max(ids)
        assert new_id > max(acked)


# -- crash while running -------------------------------------------------------------------


def test_kill_9_with_three_jobs_running_runs_them_again(start_server, db):
    server = start_server("--concurrency", "3", *GRACE, db=db)
    with http(server) as client:
        ids = [create(client, "countdown", {"seconds": 3}) for _ in range(3)]
        for job_id in ids:
            wait_until(job_is(client, job_id, "running", attempts=1), what=f"job {job_id} runs")
        time.sleep(0.5)
    killed_at = time.time()
    sigkill(server)

    again = start_server("--concurrency", "3", *GRACE, db=db, port=server.port)
    with http(again) as client:
        for job_id in ids:
            job = get_job(client, job_id)
            assert job["status"] in ("pending", "running"), job
            assert job["attempts"] in (1, 2), job
        for job_id in ids:
            job = wait_until(job_is(client, job_id, "running", "completed"), what="rerun")
            assert job["attempts"] == 2, job
            assert job["started_at"] >= killed_at, job
        for job_id in ids:
            job = wait_until(job_is(client, job_id, "completed"), timeout=30,
                             what=f"job {job_id} completes")
            assert job["attempts"] == 2
            assert job["result"] == {"message": "Countdown complete!", "duration": 3}
            assert job["error"] is None
            assert job["progress"] == {"percent": 100, "message": "Complete"}
            assert job["completed_at"] - job["started_at"] >= 2.5


def test_a_job_interrupted_three_times_fails_with_interrupted(start_server, db):
    server = start_server("--concurrency", "1", *GRACE, db=db)
    with http(server) as client:
        job_id = create(client, "countdown", {"seconds": 30})
        other = create(client, "echo", {"message": "next", "delay": 1})
    for attempt in (1, 2, 3):
        with http(server) as client:
            wait_until(job_is(client, job_id, "running", attempts=attempt),
                       what=f"run {attempt}")
            assert get_job(client, other)["status"] == "pending"
        sigkill(server)
        server = start_server("--concurrency", "1", *GRACE, db=db, port=server.port)

    with http(server) as client:
        job = get_job(client, job_id)
        assert job["status"] == "failed", job
        assert job["error"] == "interrupted"
        assert job["attempts"] == 3
        assert job["completed_at"] is not None
        assert job["result"] is None
        # it is finished for good: the next job runs, this one never again
        done = wait_until(job_is(client, other, "completed"), what="the next job completes")
        assert done["result"]["echoed"] == "next"
        assert get_job(client, job_id)["status"] == "failed"
        assert get_job(client, job_id)["attempts"] == 3
        stats = client.get("/api/stats").json()["queue"]
        assert (stats["failed"], stats["completed"], stats["running"]) == (1, 1, 0)
        r = client.get(f"/api/jobs/{job_id}/progress")
        assert r.status_code == 200
        assert "event: failed" in r.text and '"interrupted"' in r.text


# -- graceful shutdown ---------------------------------------------------------------------


def test_sigterm_with_a_job_running_puts_it_back_to_pending(start_server, db):
    server = start_server("--concurrency", "1", "--grace", "1", db=db)
    with http(server) as client:
        job_id = create(client, "countdown", {"seconds": 10})
        queued = create(client, "echo", {"message": "queued", "delay": 1})
        wait_until(job_is(client, job_id, "running", attempts=1), what="job runs")
        time.sleep(0.3)
    sent = time.monotonic()
    code = server.terminate(timeout=20)
    took = time.monotonic() - sent
    assert code == 0, server.log()
    assert took < 1 + 2, f"exit took {took:.2f} s with --grace 1"

    # back to pending, not lost, and the run it lost is not an interruption: two
    # crashes after it leave the job pending (three crashes would fail it)
    server = start_server("--concurrency", "1", "--grace", "1", db=db, port=server.port)
    for attempt in (2, 3, 4):
        with http(server) as client:
            job = wait_until(job_is(client, job_id, "running", attempts=attempt),
                             what=f"run {attempt}")
            assert job["error"] is None
            assert get_job(client, queued)["status"] == "pending"
        if attempt < 4:
            sigkill(server)
            server = start_server("--concurrency", "1", "--grace", "1", db=db,
                                  port=server.port)
    with http(server) as client:
        job = get_job(client, job_id)
        assert job["status"] == "running", job
        assert job["attempts"] == 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_lets_a_job_finish_within_grace(start_server, db, sig):
    server = start_server("--concurrency", "1", "--grace", "6", db=db)
    with http(server) as client:
        job_id = create(client, "countdown", {"seconds": 2})
        waiting = create(client, "echo", {"message": "later", "delay": 1})
        wait_until(job_is(client, job_id, "running"), what="job runs")
    sent = time.monotonic()
    server.proc.send_signal(sig)
    code = server.proc.wait(20)
    took = time.monotonic() - sent
    assert code == 0, server.log()
    assert took < 6 + 2, f"exit took {took:.2f} s with --grace 6"

    again = start_server("--concurrency", "1", *GRACE, db=db, port=server.port)
    with http(again) as client:
        job = get_job(client, job_id)
        assert job["status"] == "completed", job
        assert job["result"] == {"message": "Countdown complete!", "duration": 2}
        assert job["attempts"] == 1
        # the job that had not started was not run during the shutdown and is kept
        later = get_job(client, waiting)
        assert later["status"] in ("pending", "running"), later
        assert later["attempts"] in (0, 1)
        assert later["started_at"] is None or later["started_at"] > job["completed_at"]
        wait_until(job_is(client, waiting, "completed"), what="the queued job runs")


async def test_graceful_shutdown_closes_websockets_1001_and_ends_sse(start_server, db):
    server = start_server("--concurrency", "1", "--grace", "3", db=db)
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
        r = await client.post("/api/jobs", json={"job_type": "countdown",
                                                 "params": {"seconds": 20}})
        job_id = r.json()["id"]
        feeds = [await Feed.open(server.ws_url) for _ in range(2)]
        sse_lines: list[str] = []
        sse_error: list[BaseException] = []

        async def read_sse() -> None:
            try:
                async with client.stream("GET", f"/api/jobs/{job_id}/progress") as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        sse_lines.append(line)
            except Exception as exc:  # noqa: BLE001 - reported below
                sse_error.append(exc)

        sse = asyncio.create_task(read_sse())
        await await_until(lambda: any("remaining" in line for line in sse_lines),
                          what="SSE progress")

        server.proc.send_signal(signal.SIGTERM)
        # WebSockets closed with 1001 and the stream ended while the job still has
        # its grace period: the process is still alive then
        for feed in feeds:
            await asyncio.wait_for(feed._task, 10)
        await asyncio.wait_for(sse, 10)
        alive = server.proc.poll() is None
        for feed in feeds:
            assert feed.close_rcvd is not None, "TCP dropped without a close frame"
            assert feed.close_rcvd.code == 1001
        assert sse_error == [], f"SSE stream did not end cleanly: {sse_error!r}"
        assert not any(line.startswith("event: complete") for line in sse_lines)
        assert alive, "connections were only closed when the process exited"
        # no new connections while shutting down
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(base_url=server.url, timeout=2) as fresh:
                await fresh.get("/api/stats")
    code = await asyncio.to_thread(server.proc.wait, 20)
    assert code == 0


# -- many jobs at once ---------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_thousand_jobs_over_rest_and_websocket(start_server, db, store):
    server = start_server("--concurrency", "3", *GRACE,
                          db=db if store == "sqlite" else ":memory:")
    job = {"job_type": "echo", "params": {"message": "many", "delay": 30}}
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)

    async def over_ws(count: int) -> list[int]:
        async with ws_connect(server.ws_url, **WS_OPTIONS) as ws:
            await ws.recv()
            for _ in range(count):
                await ws.send(json.dumps({"type": "create_job", **job}))
            ids: list[int] = []
            while len(ids) < count:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert message.get("type") != "error", message
                if message.get("type") == "job_created_ack":
                    ids.append(message["job_id"])
            return ids

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        async def over_rest() -> int:
            r = await client.post("/api/jobs", json=job)
            assert r.status_code == 201, r.text
            return r.json()["id"]

        results = await asyncio.gather(
            *(over_rest() for _ in range(500)), *(over_ws(100) for _ in range(5)))
        ids = results[:500] + [i for batch in results[500:] for i in batch]
        assert len(ids) == 1000
        assert len(set(ids)) == 1000, "an id acknowledged twice"
        listed = await async_all_ids(client)
        assert len(listed) == len(set(listed)), "a job listed twice"
        assert sorted(listed) == sorted(ids)
        assert listed == sorted(listed, reverse=True)
        stats = (await client.get("/api/stats")).json()["queue"]
        assert stats["total"] == 1000

    if store == "sqlite":
        assert server.terminate() == 0
        again = start_server("--concurrency", "3", *GRACE, db=db, port=server.port)
        with http(again) as client:
            assert sorted(all_ids(client)) == sorted(ids)


# -- restart -------------------------------------------------------------------------------


def test_restart_keeps_finished_jobs(start_server, db):
    server = start_server("--concurrency", "4", *GRACE, db=db)
    with http(server) as client:
        completed = create(client, "echo", {"message": "keep me", "delay": 1})
        fib = create(client, "fibonacci", {"count": 5})
        failed = create(client, "countdown", {"seconds": 5}, timeout=0.5)
        cancelled_running = create(client, "countdown", {"seconds": 30})
        cancelled_pending = create(client, "echo", {"message": "never", "delay": 1}, delay=60)
        wait_until(job_is(client, cancelled_running, "running"), what="job runs")
        assert client.delete(f"/api/jobs/{cancelled_running}").status_code == 200
        assert client.delete(f"/api/jobs/{cancelled_pending}").status_code == 200
        ids = [completed, fib, failed, cancelled_running, cancelled_pending]
        for job_id in ids:
            wait_until(job_is(client, job_id, "completed", "failed", "cancelled"),
                       what=f"job {job_id} finishes")
        before = {job_id: get_job(client, job_id) for job_id in ids}
    assert before[completed]["result"] == {"message": "keep me", "echoed": "keep me",
                                           "delay": 1}
    assert before[fib]["result"]["sequence"] == [0, 1, 1, 2, 3]
    assert (before[failed]["status"], before[failed]["error"]) == ("failed", "timeout")
    assert before[cancelled_running]["status"] == "cancelled"
    assert before[cancelled_pending]["status"] == "cancelled"
    sigkill(server)

    again = start_server("--concurrency", "4", *GRACE, db=db, port=server.port)
    with http(again) as client:
        for job_id in ids:
            assert get_job(client, job_id) == before[job_id]
        listed = {job["id"]: job for job in client.get("/api/jobs").json()}
        assert {job_id: listed[job_id] for job_id in ids} == before
        stats = client.get("/api/stats").json()["queue"]
        assert (stats["completed"], stats["failed"], stats["cancelled"]) == (2, 1, 2)
        # the SSE stream of a finished job replays its terminal event from the store
        r = client.get(f"/api/jobs/{completed}/progress")
        events = _sse_events(r.text)
        assert [name for name, _ in events] == ["status", "complete"]
        assert events[1][1]["result"] == before[completed]["result"]
        r = client.get(f"/api/jobs/{failed}/progress")
        assert [(n, d.get("error")) for n, d in _sse_events(r.text)][-1] == ("failed", "timeout")


def _sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_pending_jobs_run_in_their_original_order_after_restart(start_server, db):
    server = start_server("--concurrency", "1", *GRACE, db=db)
    with http(server) as client:
        first = create(client, "countdown", {"seconds": 2})
        wait_until(job_is(client, first, "running"), what="first job runs")
        rest = [create(client, kind, params) for kind, params in [
            ("fibonacci", {"count": 5}), ("echo", {"message": "b", "delay": 1}),
            ("fibonacci", {"count": 5}), ("fibonacci", {"count": 6}),
            ("echo", {"message": "e", "delay": 1}),
        ]]
        assert [get_job(client, i)["status"] for i in rest] == ["pending"] * 5
    sigkill(server)

    again = start_server("--concurrency", "1", *GRACE, db=db, port=server.port)
    ids = [first, *rest]
    with http(again) as client:
        jobs = [wait_until(job_is(client, i, "completed"), timeout=40, what=f"job {i}")
                for i in ids]
    assert [j["attempts"] for j in jobs] == [2, 1, 1, 1, 1, 1]
    starts = [j["started_at"] for j in jobs]
    run_order = sorted(ids, key=lambda i: starts[ids.index(i)])
    assert starts == sorted(starts), f"run order {run_order}"
    for earlier, later in zip(jobs, jobs[1:], strict=False):
        assert later["started_at"] >= earlier["completed_at"] - 0.01


async def test_seq_continues_after_restart(start_server, db):
    server = start_server("--concurrency", "2", *GRACE, db=db)
    seen: list[int] = []

    async def session(server, jobs: int) -> None:
        feed = await Feed.open(server.ws_url)
        state_seq = feed.state["seq"]
        if seen:
            assert state_seq >= max(seen), (state_seq, max(seen))
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
            ids = []
            for _ in range(jobs):
                r = await client.post("/api/jobs", json={"job_type": "fibonacci",
                                                         "params": {"count": 5}})
                ids.append(r.json()["id"])
            await await_until(
                lambda: sum(1 for _, m in feed.events if m.get("type") == "job_completed"
                            and m["data"]["job_id"] in ids) == len(ids),
                what="jobs complete")
            # SSE ids are seq values too
            r = await client.get(f"/api/jobs/{ids[-1]}/progress")
            sse_ids = [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")]
        broadcast = [m["seq"] for _, m in feed.events if "seq" in m]
        await feed.close()
        assert broadcast, "no broadcast received"
        assert broadcast[0] == state_seq + 1
        assert broadcast == list(range(broadcast[0], broadcast[0] + len(broadcast)))
        if seen:
            assert broadcast[0] > max(seen), (broadcast[0], max(seen))
            assert min(sse_ids) > max(seen)
        seen.extend([state_seq, *broadcast, *sse_ids])

    await session(server, 3)
    await asyncio.to_thread(sigkill, server)
    server = start_server("--concurrency", "2", *GRACE, db=db, port=server.port)
    await session(server, 2)
    assert await asyncio.to_thread(server.terminate) == 0
    server = start_server("--concurrency", "2", *GRACE, db=db, port=server.port)
    await session(server, 1)


# -- progress ------------------------------------------------------------------------------


async def test_stored_progress_is_at_most_half_a_second_behind(start_server, db):
    """fibonacci reports every 0.1 s; the store must get the latest progress at most
    0.5 s late. After each kill -9 (at a different moment between two writes), the
    job's stored progress, read from the file the server left, is one of the messages
    of the last 0.8 s before the kill (0.5 s coalescing, one 0.1 s step, some slack).
    After the third kill the job is failed "interrupted" and keeps that progress."""
    server = start_server("--concurrency", "1", *GRACE, db=db)
    with http(server) as client:
        job_id = create(client, "fibonacci", {"count": 50})
    stored = None
    for attempt, pause in ((1, 0.37), (2, 0.61), (3, 0.13)):
        feed = await Feed.open(server.ws_url)
        with http(server) as client:
            await asyncio.to_thread(wait_until, job_is(client, job_id, "running",
                                                       attempts=attempt))
        # well into this run (>= 1.5 s), far from its end (5 s)
        await await_until(lambda: any(m.startswith("Calculated F(15)")  # noqa: B023
                                      for _, m in feed.progress(job_id)),  # noqa: B023
                          what="progress F(15)")
        await asyncio.sleep(pause)
        killed_at = await asyncio.to_thread(sigkill, server)
        await asyncio.wait_for(feed._task, 10)  # everything sent before the kill
        run = feed.progress(job_id)
        stored = await stored_job(db, job_id)
        assert stored.status == "running"
        recent = [m for t, m in run if t >= killed_at - 0.8]
        assert recent, "no progress in the moments before the kill"
        assert stored.progress["message"] in recent, (
            f"kill {attempt}: stored progress {stored.progress!r} is older than 0.8 s "
            f"before the kill; last messages: {[m for _, m in run[-10:]]}")
        server = start_server("--concurrency", "1", *GRACE, db=db, port=server.port)

    with http(server) as client:
        job = get_job(client, job_id)
    assert (job["status"], job["error"]) == ("failed", "interrupted"), job
    assert job["progress"] == stored.progress


async def stored_job(db: str, job_id: int):
    """The job as the SQLite file holds it (read while no server runs on it)."""
    store = SQLiteStore(db)
    await store.open()
    try:
        return await store.get(job_id)
    finally:
        await store.close()


# -- retention and paging ------------------------------------------------------------------


def test_keep_finished_prunes_the_oldest_finished(start_server, db):
    server = start_server("--concurrency", "1", "--keep-finished", "5", *GRACE, db=db)
    with http(server) as client:
        blocker = create(client, "fibonacci", {"count": 5})
        wait_until(job_is(client, blocker, "running"), what="blocker runs")
        # run (and finish) in priority order, unlike the id order
        priorities = [1, 8, 3, 6, 2, 7, 4, 5]
        short = [create(client, "fibonacci", {"count": 5}, priority=p) for p in priorities]
        running = create(client, "countdown", {"seconds": 30})   # priority 0: after them
        pending = create(client, "countdown", {"seconds": 30})
        assert blocker == 1 and short == list(range(2, 10))
        finish_order = [blocker] + sorted(short, key=lambda i: -priorities[i - 2])
        kept = sorted(finish_order[-5:], reverse=True)             # [9, 8, 6, 4, 2]

        wait_until(job_is(client, running, "running"), timeout=40, what="all short jobs done")
        expected = [pending, running, *kept]

        def listing():
            ids = [j["id"] for j in client.get("/api/jobs").json()]
            return ids if ids == expected else False

        try:
            wait_until(listing, timeout=10, what="pruned listing")
        except AssertionError:
            pass
        ids = [j["id"] for j in client.get("/api/jobs").json()]
        assert ids == expected
        for job_id in set(finish_order) - set(kept):
            assert client.get(f"/api/jobs/{job_id}").status_code == 404
        stats = client.get("/api/stats").json()["queue"]
        assert (stats["completed"], stats["running"], stats["pending"], stats["total"]) == (
            5, 1, 1, 7)
        pages = walk_pages(client, "/api/jobs?limit=2")
        assert [i for page in pages for i in page] == expected
        assert [len(p) for p in pages] == [2, 2, 2, 1]

    assert server.terminate() == 0
    again = start_server("--concurrency", "1", "--keep-finished", "5", *GRACE, db=db,
                         port=server.port)
    with http(again) as client:
        assert [j["id"] for j in client.get("/api/jobs").json()] == expected
        assert client.get("/api/stats").json()["queue"]["completed"] == 5


def test_paging_walks_every_job_once(start_server, db):
    server = start_server("--concurrency", "1", *GRACE, db=db)
    with http(server) as client:
        ids = [create(client, "countdown", {"seconds": 30})]
        for i in range(20):
            if i % 3 == 0:
                ids.append(create(client, "fibonacci", {"count": 5}))
            else:
                ids.append(create(client, "echo", {"message": f"m{i}", "delay": 1}))
        newest_first = sorted(ids, reverse=True)
        wait_until(job_is(client, ids[0], "running"), what="first job runs")

        for limit, sizes in ((7, [7, 7, 7]), (5, [5, 5, 5, 5, 1]), (21, [21]), (1000, [21])):
            pages = walk_pages(client, f"/api/jobs?limit={limit}")
            assert [len(p) for p in pages] == sizes, (limit, pages)
            assert [i for page in pages for i in page] == newest_first

        # a walk that starts from before=
        pages = walk_pages(client, f"/api/jobs?limit=4&before={newest_first[5]}")
        assert [i for page in pages for i in page] == newest_first[6:]

        # filters are carried by the Link
        r = client.get("/api/jobs?status=pending&limit=4")
        assert "status=pending" in r.links["next"]["url"]
        pending = [i for page in walk_pages(client, "/api/jobs?status=pending&limit=4")
                   for i in page]
        assert pending == newest_first[:-1]
        echo = [i for page in walk_pages(client, "/api/jobs?type=echo&limit=3") for i in page]
        expected_echo = [j["id"] for j in client.get("/api/jobs?type=echo&limit=1000").json()]
        assert echo == expected_echo and len(echo) == 13
        assert all(get_job(client, i)["type"] == "echo" for i in echo)

        # the Link is a usable URL of this server, relative or absolute
        r = client.get("/api/jobs?limit=10")
        nxt = r.links["next"]["url"]
        assert nxt.startswith("/api/jobs?") or nxt.startswith(server.url + "/api/jobs?")

    # and the same after a restart, over the store
    assert server.terminate() == 0
    again = start_server("--concurrency", "1", *GRACE, db=db, port=server.port)
    with http(again) as client:
        pages = walk_pages(client, "/api/jobs?limit=6")
        assert [i for page in pages for i in page] == newest_first
