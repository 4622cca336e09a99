"""Several rawjobs nodes on one PostgreSQL database (issue 7), as real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

JOBS_MODULE = '''
import asyncio, os
from rawjobs import job_type, Param, JobContext

def _log(line):
    fd = os.open(os.environ["RAWJOBS_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)

@job_type("record", description="Log each run, optionally sleep",
          params=[Param("seconds", float, default=0, min=0, max=60)])
async def record(ctx: JobContext) -> dict:
    node = os.environ["RAWJOBS_TEST_NODE"]
    _log(f"start {ctx.job_id} {node} {ctx.attempt}")
    try:
        steps = int(ctx.params["seconds"] * 10)
        for i in range(steps):
            await ctx.progress(i * 100 // max(steps, 1), f"step {i}")
            await ctx.sleep(0.1)
    except asyncio.CancelledError:
        _log(f"cancelled {ctx.job_id} {node}")
        raise
    return {"node": node}
'''


@pytest.fixture
def cluster(tmp_path, pg_dsn, start_server):
    """``start(name, concurrency)`` starts a node on the shared database."""
    (tmp_path / "mnjobs.py").write_text(JOBS_MODULE)
    log = tmp_path / "runs.log"

    def start(name: str, concurrency: int = 2, *extra: str, db: str | None = None):
        env = {"RAWJOBS_TEST_LOG": str(log), "RAWJOBS_TEST_NODE": name}
        return start_server("--jobs", "mnjobs", "--node-id", name, "--concurrency",
                            str(concurrency), "--heartbeat", "0.5", "--lease", "2", "--grace", "0",
                            *extra, db=db or pg_dsn, env=env)

    start.log = log
    return start


def runs(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines()]


def wait_for(predicate, timeout: float = 20, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def create(node, seconds: float = 0, **extra) -> int:
    r = httpx.post(node.url + "/api/jobs", timeout=10,
                   json={"job_type": "record", "params": {"seconds": seconds}, **extra})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job(node, job_id: int) -> dict:
    return httpx.get(f"{node.url}/api/jobs/{job_id}", timeout=10).json()


def test_schema_migrated_once_when_nodes_start_together(cluster, pg_dsn):
    nodes = [cluster(f"n{i}") for i in range(3)]
    out = subprocess.run(["psql", pg_dsn, "-At", "-c",
                          "SELECT version FROM rawjobs_migrations ORDER BY version"],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out == ["1"]
    stats = [httpx.get(n.url + "/api/stats").json()["queue"] for n in nodes]
    assert stats[0] == stats[1] == stats[2]


def test_events_cross_nodes(cluster):
    a, _b, c = cluster("a", 0), cluster("b", 2), cluster("c", 0)

    async def scenario():
        async with websockets.connect(c.ws_url) as ws:
            state = json.loads(await ws.recv())
            assert state["type"] == "queue_state"
            job_id = await asyncio.to_thread(create, a, 0.3)
            seqs, types = [state["seq"]], []
            async with asyncio.timeout(15):
                while "job_completed" not in types:
                    message = json.loads(await ws.recv())
                    if message.get("type") == "ping":
                        continue
                    assert message["data"].get("job_id", message["data"].get("id")) == job_id
                    seqs.append(message["seq"])
                    types.append(message["type"])
            return job_id, seqs, types

    job_id, seqs, types = asyncio.run(scenario())
    assert types[0] == "job_created" and "job_started" in types and "job_progress" in types
    assert types[-1] == "job_completed"
    assert all(later > earlier for earlier, later in zip(seqs, seqs[1:], strict=False))
    assert job(a, job_id)["result"] == {"node": "b"}  # only b runs jobs


def test_sse_on_another_node(cluster):
    a, _b = cluster("a", 0), cluster("b", 2)
    job_id = create(a, 1)
    events = []
    with httpx.stream("GET", f"{a.url}/api/jobs/{job_id}/progress", timeout=15) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    assert events[0] == "status" and "progress" in events and events[-1] == "complete"


def test_no_double_execution(cluster):
    nodes = [cluster(f"n{i}", 5) for i in range(3)]

    async def create_all():
        async with httpx.AsyncClient(timeout=30) as client:
            async def one(i):
                r = await client.post(nodes[i % 3].url + "/api/jobs",
                                      json={"job_type": "record", "params": {"seconds": 0}})
                assert r.status_code == 201
                return r.json()["id"]
            return await asyncio.gather(*(one(i) for i in range(500)))

    ids = asyncio.run(create_all())
    assert len(set(ids)) == 500
    wait_for(lambda: httpx.get(nodes[0].url + "/api/stats").json()["queue"]["completed"]
             == 500, timeout=60, interval=0.2)
    started = [r for r in runs(cluster.log) if r[0] == "start"]
    assert sorted(int(r[1]) for r in started) == sorted(ids)  # each exactly once
    assert {r[2] for r in started} == {"n0", "n1", "n2"}


def test_killed_node_jobs_run_again(cluster):
    a, b = cluster("a", 0), cluster("b", 1)
    job_id = create(a, 30)
    wait_for(lambda: job(a, job_id)["status"] == "running")
    c = cluster("c", 1)
    b.kill()
    killed_at = time.monotonic()
    again = wait_for(lambda: [r for r in runs(cluster.log) if r[0] == "start" and r[2] == "c"],
                     timeout=15)
    # lease 2 s + heartbeat 0.5 s, plus start-up slack
    assert time.monotonic() - killed_at < 2 + 0.5 + 3
    assert again[0][1] == str(job_id) and again[0][3] == "2"
    current = job(c, job_id)
    assert current["status"] == "running" and current["attempts"] == 2


def test_cancel_across_nodes(cluster):
    a, b = cluster("a", 0), cluster("b", 1)
    job_id = create(a, 30)
    wait_for(lambda: job(a, job_id)["status"] == "running")
    cancelled_at = time.monotonic()
    r = httpx.delete(f"{a.url}/api/jobs/{job_id}")
    assert r.json() == {"success": True, "job_id": job_id}
    wait_for(lambda: ["cancelled", str(job_id), "b"] in runs(cluster.log), timeout=5,
             interval=0.01)
    assert time.monotonic() - cancelled_at < 1.0
    assert job(b, job_id)["status"] == "cancelled"
    wait_for(lambda: httpx.get(b.url + "/api/stats").json()["worker"]["active"] == 0, 5)


def test_worker_stats_list_nodes(cluster):
    a, _b = cluster("a", 1), cluster("b", 3)
    def listed():
        nodes = httpx.get(a.url + "/api/stats").json()["worker"].get("nodes", [])
        return nodes if {n["id"] for n in nodes} == {"a", "b"} else None
    nodes = wait_for(listed, timeout=10)
    assert {n["id"]: n["capacity"] for n in nodes} == {"a": 1, "b": 3}


def test_node_without_database_stops_its_job(cluster, tmp_path, pg_dsn):
    """A node cut off from PostgreSQL (its connections go through a proxy that we
    kill) stops the job whose lease it lost, and another node runs it again."""
    from conftest import free_port

    proxy_script = tmp_path / "proxy.py"
    proxy_script.write_text(PROXY)
    upstream = pg_dsn.split("@", 1)[1].split("/", 1)[0]
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(proxy_script), str(port), upstream])
    try:
        wait_for(lambda: _port_open(port), timeout=5)
        a = cluster("a", 0)
        cluster("b", 1, db=pg_dsn.replace(upstream, f"127.0.0.1:{port}"))
        job_id = create(a, 30)
        wait_for(lambda: ["start", str(job_id), "b", "1"] in runs(cluster.log))
        cluster("c", 1)
        proxy.kill()
        cut_at = time.monotonic()
        wait_for(lambda: ["cancelled", str(job_id), "b"] in runs(cluster.log), timeout=10)
        assert time.monotonic() - cut_at < 2 + 0.5 + 2  # lease + heartbeat + slack
        wait_for(lambda: ["start", str(job_id), "c", "2"] in runs(cluster.log), timeout=10)
    finally:
        proxy.kill()


def _port_open(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


PROXY = '''
import asyncio, sys
port, upstream = int(sys.argv[1]), sys.argv[2]
host, uport = upstream.rsplit(":", 1)

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    ur, uw = await asyncio.open_connection(host, int(uport))
    asyncio.ensure_future(pipe(reader, uw))
    asyncio.ensure_future(pipe(ur, writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


BIG_MODULE = '''
from rawjobs import job_type, Param, JobContext

@job_type("big", description="A result over PostgreSQL's NOTIFY limit",
          params=[Param("size", int, default=20000, min=1, max=100000)])
async def big(ctx: JobContext) -> dict:
    return {"blob": "x" * ctx.params["size"]}
'''


def test_large_results_are_fetched_not_notified(tmp_path, pg_dsn, start_server):
    (tmp_path / "bigjobs.py").write_text(BIG_MODULE)
    a = start_server("--jobs", "bigjobs", "--concurrency", "0", db=pg_dsn)
    start_server("--jobs", "bigjobs", "--concurrency", "1", db=pg_dsn)

    async def scenario():
        async with websockets.connect(a.ws_url, max_size=2**20) as ws:
            await ws.recv()
            r = await asyncio.to_thread(httpx.post, a.url + "/api/jobs",
                                        json={"job_type": "big", "params": {"size": 20000}})
            job_id = r.json()["id"]
            async with asyncio.timeout(15):
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("type") == "job_completed":
                        return job_id, message["data"]

    job_id, data = asyncio.run(scenario())
    assert data["job_id"] == job_id and data["result"] == {"blob": "x" * 20000}


def test_lost_event_channel_resyncs_clients(cluster, pg_dsn):
    a, b = cluster("a", 0), cluster("b", 0)

    async def scenario():
        async with websockets.connect(a.ws_url) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "queue_state"
            await asyncio.to_thread(subprocess.run, [
                "psql", pg_dsn, "-c",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"], check=True,
                capture_output=True)
            async with asyncio.timeout(10):
                second = json.loads(await ws.recv())
                while second["type"] != "queue_state":
                    second = json.loads(await ws.recv())
                # both nodes listen again: a job created on b reaches a's client live
                job_id = await asyncio.to_thread(create, b, 0)
                while True:
                    message = json.loads(await ws.recv())
                    if message["type"] == "job_created":
                        return first, second, job_id, message

    first, second, job_id, created = asyncio.run(scenario())
    assert second["seq"] > first["seq"]
    assert created["data"]["id"] == job_id and created["seq"] > second["seq"]


def test_dashboard_shows_the_nodes(cluster):
    from playwright.sync_api import sync_playwright

    a, _b = cluster("a", 1), cluster("b", 2)
    wait_for(lambda: len(httpx.get(a.url + "/api/stats").json()["worker"].get("nodes", [])) == 2,
             timeout=10)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(a.url + "/")
            page.wait_for_selector("#worker-nodes li.worker-node >> nth=1", timeout=10_000)
            ids = page.eval_on_selector_all("#worker-nodes li", "els => els.map(e => e.dataset.nodeId)")
        finally:
            browser.close()
    assert ids == ["a", "b"] and not errors
