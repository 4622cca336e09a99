"""Issue 4: user-defined job types and job options, against real server processes.

Every server test writes a job module into its temporary directory (the server's
cwd) and loads it with ``--jobs``; clients are httpx (REST), httpx-sse (SSE) and
websockets (/ws/queue). The last section checks the registration API in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from httpx_sse import connect_sse

from rawjobs import JobContext, JobTypeError, Param, job_type
from rawjobs.core.jobs import Registry, make_job_type

# --------------------------------------------------------------------------------------
# The job module the servers load
# --------------------------------------------------------------------------------------

JOBS_MODULE = '''
"""Job types for the rawjobs issue 4 tests (written by tests/test_job_types.py)."""

import os
import signal
import time

from rawjobs import JobContext, Param, job_type


@job_type("greet", description="Greet someone, a few times",
          params=[Param("name", str, default="world", max_length=20, description="Who"),
                  Param("times", int, default=2, min=1, max=5, description="How often")])
async def greet(ctx: JobContext) -> dict:
    times = ctx.params["times"]
    for i in range(times):
        await ctx.progress((i + 1) * 100 // (times + 1), f"greeting {i + 1} of {times}")
        await ctx.sleep(0.05)
    return {"greeting": f"Hello, {ctx.params['name']}!", "times": times,
            "job_id": ctx.job_id, "attempt": ctx.attempt}


@job_type("kinds", description="One parameter of every kind",
          params=[Param("count", int, default=3, min=1, max=10, description="an integer"),
                  Param("ratio", float, default=0.5, min=0.0, max=1.0, description="a number"),
                  Param("label", str, default="abc", max_length=5, description="a string"),
                  Param("flag", bool, default=False, description="a boolean"),
                  Param("mode", "choice", default="fast", choices=["fast", "slow", "auto"],
                        description="a choice")])
async def kinds(ctx: JobContext) -> dict:
    return {"params": dict(ctx.params)}


@job_type("quick", description="Return at once")
async def quick(ctx: JobContext) -> dict:
    return {"job_id": ctx.job_id}


@job_type("hold", description="Run until cancelled")
async def hold(ctx: JobContext) -> None:
    await ctx.progress(1, "holding")
    await ctx.sleep(3600)


@job_type("nap", description="Sleep on the event loop",
          params=[Param("seconds", float, default=5.0, min=0.0, max=60.0)])
async def nap(ctx: JobContext) -> dict:
    await ctx.progress(1, "napping")
    await ctx.sleep(ctx.params["seconds"])
    return {"slept": ctx.params["seconds"]}


@job_type("boom", description="Always raises")
async def boom(ctx: JobContext) -> None:
    await ctx.progress(10, "about to explode")
    raise RuntimeError("boom: the widget exploded")


@job_type("flaky", description="Fails until attempt `succeed_on`, records fail times",
          params=[Param("succeed_on", int, default=3, min=1, max=10)])
async def flaky(ctx: JobContext) -> dict:
    if ctx.attempt < ctx.params["succeed_on"]:
        raise RuntimeError(f"flaky attempt {ctx.attempt} failed at {time.time()!r}")
    return {"attempt": ctx.attempt}


@job_type("doomed", description="Fails on every attempt")
async def doomed(ctx: JobContext) -> None:
    raise RuntimeError(f"doomed attempt {ctx.attempt}")


@job_type("tuned", description="Has per-type option defaults",
          priority=5, timeout=2, max_attempts=2)
async def tuned(ctx: JobContext) -> dict:
    return {"attempt": ctx.attempt}


@job_type("slowtuned", description="Type default timeout 0.5 s, sleeps 30 s",
          timeout=0.5)
async def slowtuned(ctx: JobContext) -> None:
    await ctx.sleep(30)


# -- process-pool handlers (plain def, module level) -----------------------------------

@job_type("square", description="Square a number in a worker process",
          params=[Param("n", int, default=4, min=0, max=1000)])
def square(ctx) -> dict:
    ctx.progress(10, f"pid {os.getpid()}")
    ctx.progress(60, "squaring")
    ctx.sleep(0.05)
    return {"square": ctx.params["n"] ** 2, "pid": os.getpid(), "job_id": ctx.job_id,
            "attempt": ctx.attempt, "ctx": type(ctx).__name__}


@job_type("spin", description="CPU-bound forever, with occasional progress")
def spin(ctx) -> None:
    ctx.progress(1, f"pid {os.getpid()}")
    n, last = 0, time.monotonic()
    while True:
        n += 1
        if n % 50000 == 0 and time.monotonic() - last > 0.25:
            ctx.progress(2, f"spun {n}")
            last = time.monotonic()


@job_type("stubborn", description="CPU-bound forever, ignores SIGTERM")
def stubborn(ctx) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx.progress(1, f"pid {os.getpid()}")
    n = 0
    while True:
        n += 1


@job_type("psleep", description="Sleep in a worker process", executor="process",
          params=[Param("seconds", float, default=5.0, min=0.0, max=60.0)])
def psleep(ctx) -> dict:
    ctx.progress(1, f"pid {os.getpid()}")
    ctx.sleep(ctx.params["seconds"])
    return {"slept": ctx.params["seconds"]}


@job_type("pboom", description="Raises in a worker process")
def pboom(ctx) -> None:
    ctx.progress(5, "about to explode")
    raise ValueError("pboom: the process widget exploded")


@job_type("pcrash", description="The worker process dies under the job")
def pcrash(ctx) -> None:
    ctx.progress(5, f"pid {os.getpid()}")
    os._exit(3)
'''

TERMINAL = ("completed", "failed", "cancelled")


def write_module(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(text))


@pytest.fixture
def jobs_server(start_server, tmp_path):
    """``jobs_server(*args)``: a server with the test job module loaded."""
    write_module(tmp_path, "myjobs", JOBS_MODULE)

    def start(*args: str, **kwargs: Any):
        # a short --grace: a job a test leaves running does not hold up the teardown
        return start_server("--jobs", "myjobs", "--grace", "1", *args, **kwargs)

    return start


@pytest.fixture
def db(request, tmp_path) -> str:
    """The store: in memory, unless a test asks for ``sqlite`` too with
    ``@both_stores``."""
    kind = getattr(request, "param", "memory")
    return ":memory:" if kind == "memory" else str(tmp_path / "jobs.db")


both_stores = pytest.mark.parametrize("db", ["memory", "sqlite"], indirect=True)


@pytest.fixture
def srv(jobs_server, db):
    return jobs_server(db=db)


@pytest.fixture
def api(srv):
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        yield c


def create(client: httpx.Client, job_type: str, params: dict | None = None,
           expect: int = 201, headers: dict | None = None, **options: Any) -> dict:
    body: dict[str, Any] = {"job_type": job_type, **options}
    if params is not None:
        body["params"] = params
    r = client.post("/api/jobs", json=body, headers=headers)
    assert r.status_code == expect, (r.status_code, r.text)
    return r.json()


def wait_for(client: httpx.Client, job_id: int, statuses=TERMINAL, timeout: float = 15,
             pred=None) -> dict:
    """Poll the job until its status is in ``statuses`` (and ``pred(job)`` holds)."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job.get("status") in statuses and (pred is None or pred(job)):
            return job
        time.sleep(0.03)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def pid_from(message: str) -> int:
    m = re.search(r"pid (\d+)", message)
    assert m, message
    return int(m.group(1))


def sse_events(base_url: str, job_id: int, timeout: float = 20) -> list[tuple[str, Any]]:
    """The whole SSE stream of a job: ``[(event name, parsed data)]``. Blocks without
    data (the ``retry:`` field alone) are no events (httpx-sse yields them anyway)."""
    events = []
    with httpx.Client(base_url=base_url, timeout=timeout) as c, \
            connect_sse(c, "GET", f"/api/jobs/{job_id}/progress") as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if sse.data == "" and sse.event == "message":
                continue
            events.append((sse.event, json.loads(sse.data)))
    return events


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (a zombie still counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return not os.path.exists(f"/proc/{pid}")


def wait_gone(pid: int, timeout: float = 6) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return False


def proc_state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return "gone"
    return "?"


# -- WebSocket helpers ------------------------------------------------------------------


async def ws_open(url: str):
    ws = await websockets.connect(url, open_timeout=10)
    state = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert state["type"] == "queue_state"
    return ws, state


async def ws_until(ws, pred, timeout: float = 15, log: list | None = None) -> dict:
    """Receive messages until ``pred(msg)``; every message seen is appended to ``log``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no matching WebSocket message in {timeout} s; saw {log}")
        msg = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        if log is not None:
            log.append(msg)
        if pred(msg):
            return msg


async def ws_collect(ws, seconds: float) -> list[dict]:
    """Every message received in the next ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    out: list[dict] = []
    while (remaining := deadline - loop.time()) > 0:
        try:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), remaining)))
        except TimeoutError:
            break
    return out


def about(job_id: int):
    def pred(msg: dict) -> bool:
        data = msg.get("data")
        return isinstance(data, dict) and (data.get("job_id") == job_id
                                           or (msg["type"] == "job_created"
                                               and data.get("id") == job_id))
    return pred


def is_terminal_for(job_id: int):
    return lambda m: m.get("type") in ("job_completed", "job_failed", "job_cancelled") \
        and m["data"].get("job_id") == job_id


# ======================================================================================
# A custom job type over REST, SSE and WebSocket
# ======================================================================================


def test_custom_type_listed_with_schema(api):
    types = api.get("/api/job-types").json()
    names = [t["name"] for t in types]
    # built-ins first (same API, registered first), then the module's, in order
    assert names[:4] == ["countdown", "prime", "fibonacci", "echo"]
    assert names.index("greet") < names.index("kinds") < names.index("square")
    greet = types[names.index("greet")]
    assert greet["description"] == "Greet someone, a few times"
    assert greet["params"] == [
        {"name": "name", "type": "string", "default": "world", "max_length": 20,
         "description": "Who"},
        {"name": "times", "type": "integer", "default": 2, "min": 1, "max": 5,
         "description": "How often"},
    ]
    kinds = {p["name"]: p for p in types[names.index("kinds")]["params"]}
    assert [p["name"] for p in types[names.index("kinds")]["params"]] == \
        ["count", "ratio", "label", "flag", "mode"]
    assert kinds["count"]["type"] == "integer"
    assert (kinds["count"]["min"], kinds["count"]["max"], kinds["count"]["default"]) == (1, 10, 3)
    assert kinds["ratio"]["type"] == "number"
    assert (kinds["ratio"]["min"], kinds["ratio"]["max"], kinds["ratio"]["default"]) == (0, 1, 0.5)
    assert kinds["label"]["type"] == "string"
    assert kinds["label"]["max_length"] == 5 and "min" not in kinds["label"]
    assert kinds["flag"]["type"] == "boolean" and kinds["flag"]["default"] is False
    assert kinds["mode"]["type"] == "choice"
    assert kinds["mode"]["choices"] == ["fast", "slow", "auto"]
    assert kinds["mode"]["default"] == "fast"
    # the built-ins keep their PROTOCOL.md schema
    countdown = types[0]["params"][0]
    assert {k: countdown[k] for k in ("name", "type", "default", "min", "max")} == \
        {"name": "seconds", "type": "integer", "default": 10, "min": 1, "max": 60}


def test_custom_type_over_rest(api):
    created = create(api, "greet", {"name": "Ada", "times": 3})
    assert created["type"] == "greet"
    assert created["params"] == {"name": "Ada", "times": 3}
    assert created["status"] == "pending"
    job = wait_for(api, created["id"])
    assert job["status"] == "completed", job
    assert job["result"] == {"greeting": "Hello, Ada!", "times": 3, "job_id": created["id"],
                             "attempt": 1}
    assert job["progress"] == {"percent": 100, "message": "Complete"}
    assert job["error"] is None
    # defaults filled, digit strings normalised
    created = create(api, "greet", {"times": "1"})
    assert created["params"] == {"name": "world", "times": 1}
    assert wait_for(api, created["id"])["result"]["greeting"] == "Hello, world!"
    # the type filter of the list knows it
    listed = api.get("/api/jobs", params={"type": "greet"}).json()
    assert {j["id"] for j in listed} >= {created["id"]}
    assert all(j["type"] == "greet" for j in listed)


def test_custom_type_over_sse(api, srv):
    # a short delay: the stream is open before the job starts, so it sees every event
    created = create(api, "greet", {"name": "Sse", "times": 3}, delay=0.5)
    events = sse_events(srv.url, created["id"])
    names = [e for e, _ in events]
    assert names[0] == "status"
    assert events[0][1]["id"] == created["id"] and events[0][1]["type"] == "greet"
    assert names[-1] == "complete"
    assert names.count("complete") == 1 and "failed" not in names
    assert events[0][1]["status"] == "pending"
    progress = [(d["percent"], d["message"]) for e, d in events if e == "progress"]
    assert progress == [(0, "Starting..."), (25, "greeting 1 of 3"), (50, "greeting 2 of 3"),
                        (75, "greeting 3 of 3"), (100, "Complete!")]
    assert events[-1][1]["status"] == "completed"
    assert events[-1][1]["result"]["greeting"] == "Hello, Sse!"


async def test_custom_type_over_websocket(srv):
    ws, state = await ws_open(srv.ws_url)
    async with ws:
        assert "greet" in [t["name"] for t in state["job_types"]]
        await ws.send(json.dumps({"type": "get_job_types"}))
        reply = await ws_until(ws, lambda m: m.get("type") == "job_types")
        assert "kinds" in [t["name"] for t in reply["job_types"]]

        await ws.send(json.dumps({"type": "create_job", "job_type": "greet",
                                  "params": {"name": "Wes", "times": 2}}))
        log: list = []
        ack = await ws_until(ws, lambda m: m.get("type") == "job_created_ack", log=log)
        job_id = ack["job_id"]
        assert "duplicate" not in ack or ack["duplicate"] is False
        created = [m for m in log if m.get("type") == "job_created"]
        assert created and created[0]["data"]["id"] == job_id  # broadcast before the ack
        assert created[0]["data"]["params"] == {"name": "Wes", "times": 2}
        await ws_until(ws, is_terminal_for(job_id), log=log)
        mine = [m for m in log if about(job_id)(m)]
        types = [m["type"] for m in mine]
        assert types[0] == "job_created" and types[1] == "job_started"
        assert types[-1] == "job_completed"
        progress = [m["data"]["message"] for m in mine if m["type"] == "job_progress"]
        assert progress == ["greeting 1 of 2", "greeting 2 of 2", "Complete!"]
        assert mine[-1]["data"]["result"]["greeting"] == "Hello, Wes!"

        # a bad param over the WebSocket: an error reply naming it; the socket stays open
        await ws.send(json.dumps({"type": "create_job", "job_type": "greet",
                                  "params": {"times": 99}}))
        err = await ws_until(ws, lambda m: m.get("type") == "error")
        assert "times" in err["message"]
        # job options over the WebSocket are validated the same way
        await ws.send(json.dumps({"type": "create_job", "job_type": "greet",
                                  "max_attempts": 0}))
        err = await ws_until(ws, lambda m: m.get("type") in ("error", "job_created_ack"))
        assert err["type"] == "error" and "max_attempts" in err["message"], err
        await ws.send(json.dumps({"type": "create_job", "job_type": "greet",
                                  "delay": 1, "run_at": time.time() + 5}))
        err = await ws_until(ws, lambda m: m.get("type") in ("error", "job_created_ack"))
        assert err["type"] == "error", err
        await ws.send(json.dumps({"type": "ping", "ts": 7}))
        assert (await ws_until(ws, lambda m: m.get("type") == "pong"))["ts"] == 7


VALID_KINDS = [
    ({}, {"count": 3, "ratio": 0.5, "label": "abc", "flag": False, "mode": "fast"}),
    ({"count": 10, "ratio": 1, "label": "", "flag": True, "mode": "auto"},
     {"count": 10, "ratio": 1, "label": "", "flag": True, "mode": "auto"}),
    ({"count": "7", "ratio": 0.25, "label": "abcde", "mode": "slow"},
     {"count": 7, "ratio": 0.25, "label": "abcde", "flag": False, "mode": "slow"}),
    ({"count": 1, "ratio": 0}, {"count": 1, "ratio": 0, "label": "abc", "flag": False,
                                "mode": "fast"}),
]

INVALID_KINDS = [
    ("count", 0), ("count", 11), ("count", 2.5), ("count", True), ("count", "x"),
    ("count", -1), ("count", None),
    ("ratio", -0.01), ("ratio", 1.5), ("ratio", "0.5"), ("ratio", True), ("ratio", [0.5]),
    ("label", "abcdef"), ("label", 5), ("label", None),
    ("flag", "true"), ("flag", 1), ("flag", None),
    ("mode", "medium"), ("mode", "FAST"), ("mode", 1), ("mode", None),
]


def test_param_kinds_validated(api):
    for params, normalised in VALID_KINDS:
        created = create(api, "kinds", params)
        assert created["params"] == normalised, params
    last = wait_for(api, created["id"])
    assert last["result"] == {"params": VALID_KINDS[-1][1]}

    before = api.get("/api/stats").json()["queue"]["total"]
    for name, value in INVALID_KINDS:
        r = api.post("/api/jobs", json={"job_type": "kinds", "params": {name: value}})
        assert r.status_code == 400, (name, value, r.text)
        body = r.json()
        assert body.get("param") == name, (name, value, body)
        assert name in body["error"], (name, value, body)
    r = api.post("/api/jobs", json={"job_type": "kinds", "params": {"colour": "red"}})
    assert r.status_code == 400 and r.json().get("param") == "colour"
    # the choices are named in the error, so a user can fix the request
    r = api.post("/api/jobs", json={"job_type": "kinds", "params": {"mode": "medium"}})
    assert all(c in r.json()["error"] for c in ("fast", "slow", "auto"))
    assert api.get("/api/stats").json()["queue"]["total"] == before  # nothing was created


# ======================================================================================
# Process handlers
# ======================================================================================


def test_process_handler_progress_and_result(api, srv):
    created = create(api, "square", {"n": 12}, delay=0.5)  # the stream opens first
    events = sse_events(srv.url, created["id"])
    job = wait_for(api, created["id"])
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["square"] == 144
    assert result["job_id"] == created["id"] and result["attempt"] == 1
    assert result["ctx"] == "SyncJobContext"
    assert result["pid"] != srv.proc.pid  # it really ran in another process
    assert events[0][0] == "status" and events[0][1]["status"] == "pending"
    assert events[-1][0] == "complete" and events[-1][1]["result"]["square"] == 144
    progress = [(d["percent"], d["message"]) for e, d in events if e == "progress"]
    assert progress == [(0, "Starting..."), (10, f"pid {result['pid']}"), (60, "squaring"),
                        (100, "Complete!")]
    # the built-in prime runs the same way
    prime = create(api, "prime", {"limit": 100})
    done = wait_for(api, prime["id"])
    assert done["status"] == "completed" and done["result"]["prime_count"] == 25


async def _started_pid(ws, job_id: int, timeout: float = 20) -> int:
    msg = await ws_until(ws, lambda m: m.get("type") == "job_progress"
                         and m["data"]["job_id"] == job_id
                         and m["data"]["message"].startswith("pid "), timeout)
    return pid_from(msg["data"]["message"])


@pytest.mark.parametrize("kind", ["spin", "stubborn"])
async def test_cpu_bound_job_cancelled(jobs_server, kind):
    """Cancel a CPU-bound process job mid-run: its process is gone, the slot free.
    ``stubborn`` ignores SIGTERM, so it must be killed."""
    srv = jobs_server("--concurrency", "1")
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": kind})
        assert r.status_code == 201
        job_id = r.json()["id"]
        pid = await _started_pid(ws, job_id)
        assert pid != srv.proc.pid and not process_gone(pid)
        if kind == "spin":  # it keeps reporting while it spins
            await ws_until(ws, lambda m: m.get("type") == "job_progress"
                           and m["data"]["job_id"] == job_id
                           and m["data"]["message"].startswith("spun"), 10)
        else:
            await asyncio.sleep(0.3)
        r = await c.delete(f"/api/jobs/{job_id}")
        assert r.status_code == 200 and r.json() == {"success": True, "job_id": job_id}
        log: list = []
        await ws_until(ws, is_terminal_for(job_id), log=log)
        assert log[-1]["type"] == "job_cancelled"
        gone = await asyncio.to_thread(wait_gone, pid, 6)
        assert gone, f"process {pid} still there: {proc_state(pid)}"
        job = (await c.get(f"/api/jobs/{job_id}")).json()
        assert job["status"] == "cancelled"
        # the only slot (--concurrency 1) is free: another process job runs and completes
        r = await c.post("/api/jobs", json={"job_type": "square", "params": {"n": 3}})
        other = r.json()["id"]
        await ws_until(ws, is_terminal_for(other), 20, log=log)
        assert log[-1]["type"] == "job_completed", log[-1]
        assert log[-1]["data"]["result"]["square"] == 9
        assert log[-1]["data"]["result"]["pid"] != pid
        # nothing about the cancelled job followed its terminal event
        after = log[[m.get("type") for m in log].index("job_cancelled") + 1:]
        assert not [m for m in after if about(job_id)(m)], after
        for _ in range(100):  # the worker_stats after job_completed may still be on its way
            stats = (await c.get("/api/stats")).json()
            if stats["worker"]["active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["worker"]["active"] == 0 and stats["queue"]["running"] == 0, stats


async def test_shutdown_right_after_cancelling_a_stubborn_job(jobs_server):
    """Cancel a job whose process ignores SIGTERM, then stop the server at once
    (within the pool's SIGTERM-to-SIGKILL grace): the server still exits, and the
    process does not outlive it."""
    srv = jobs_server()
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "stubborn"})
        job_id = r.json()["id"]
        pid = await _started_pid(ws, job_id)
        assert (await c.delete(f"/api/jobs/{job_id}")).status_code == 200
    try:
        try:
            code = await asyncio.to_thread(srv.terminate, 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("server did not exit within 10 s of SIGTERM; log:\n"
                                 + srv.log()) from None
        assert code == 0, srv.log()
        gone = await asyncio.to_thread(wait_gone, pid, 6)
        assert gone, f"job process {pid} outlived the server: {proc_state(pid)}"
    finally:
        if not process_gone(pid) and proc_state(pid)[:1] != "Z":
            os.kill(pid, 9)  # do not leave a CPU-burning orphan behind


def test_process_that_dies(jobs_server):
    """A worker process that exits under its job: the job fails (not hangs), the slot
    and the pool recover."""
    srv = jobs_server("--concurrency", "1")
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        created = create(c, "pcrash")
        job = wait_for(c, created["id"], timeout=20)
        assert job["status"] == "failed"
        assert job["error"] and "Traceback" not in job["error"]
        after = create(c, "square", {"n": 5})
        done = wait_for(c, after["id"], timeout=20)
        assert done["status"] == "completed" and done["result"]["square"] == 25


# ======================================================================================
# Errors, timeouts
# ======================================================================================


@pytest.mark.parametrize("kind,text", [("boom", "boom: the widget exploded"),
                                       ("pboom", "pboom: the process widget exploded")])
def test_job_that_raises(api, srv, kind, text):
    created = create(api, kind)
    job = wait_for(api, created["id"])
    assert job["status"] == "failed"
    assert job["error"] == text
    assert job["result"] is None
    for body in (api.get(f"/api/jobs/{created['id']}").text, api.get("/api/jobs").text):
        assert "Traceback" not in body and 'File "' not in body
    # the SSE terminal event carries the text, not the traceback
    events = sse_events(srv.url, created["id"])
    assert events[-1] == ("failed", {"status": "failed", "error": text})
    # the traceback, with the handler's frame, is in the server's log
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = srv.log()
        if "Traceback (most recent call last)" in log and text in log:
            break
        time.sleep(0.1)
    assert "Traceback (most recent call last)" in log
    assert text in log
    assert f"in {kind}" in log  # the handler's frame: 'File ".../myjobs.py", line N, in boom'


@pytest.mark.parametrize("kind", ["nap", "psleep"])
def test_timeout(api, kind):
    start = time.monotonic()
    created = create(api, kind, {"seconds": 30}, timeout=0.5)
    assert created["timeout"] == 0.5
    job = wait_for(api, created["id"], timeout=15)
    assert job["status"] == "failed", job
    assert job["error"] == "timeout"
    assert time.monotonic() - start < 15  # long before the 30 s sleep would end
    assert job["attempts"] == 1


async def test_timeout_stops_process(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "psleep", "params": {"seconds": 30},
                                            "timeout": 2.0})
        job_id = r.json()["id"]
        pid = await _started_pid(ws, job_id)
        log: list = []
        await ws_until(ws, is_terminal_for(job_id), 20, log)
        assert log[-1] == {"type": "job_failed", "data": {"job_id": job_id, "error": "timeout"},
                           "seq": log[-1]["seq"]}
    gone = await asyncio.to_thread(wait_gone, pid, 6)
    assert gone, f"process {pid} still there: {proc_state(pid)}"


def test_type_default_timeout(api):
    created = create(api, "slowtuned")
    assert created["timeout"] == 0.5
    job = wait_for(api, created["id"])
    assert (job["status"], job["error"]) == ("failed", "timeout")


def test_timeout_not_hit(api):
    created = create(api, "nap", {"seconds": 0.2}, timeout=5)
    job = wait_for(api, created["id"])
    assert job["status"] == "completed" and job["result"] == {"slept": 0.2}


# ======================================================================================
# Retries
# ======================================================================================

SLACK = 0.35  # seconds of scheduling slack on the backoff bounds


def _fail_time(error: str) -> float:
    m = re.search(r"failed at ([0-9.]+)", error)
    assert m, error
    return float(m.group(1))


async def test_retries_until_success(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "flaky", "params": {"succeed_on": 3},
                                            "max_attempts": 3})
        assert r.status_code == 201
        job_id = r.json()["id"]
        assert r.json()["max_attempts"] == 3
        log: list = []
        retry1 = await ws_until(ws, lambda m: m.get("type") == "job_retrying"
                                and m["data"]["job_id"] == job_id, 10, log)
        # while it waits, the job is pending with run_at
        waiting = (await c.get(f"/api/jobs/{job_id}")).json()
        assert waiting["status"] == "pending", waiting
        assert waiting["run_at"] == pytest.approx(retry1["data"]["run_at"])
        assert waiting["attempts"] == 1
        await ws_until(ws, is_terminal_for(job_id), 20, log)
    mine = [m for m in log if about(job_id)(m)]
    types = [m["type"] for m in mine]
    assert types.count("job_retrying") == 2
    assert "job_failed" not in types
    assert types[-1] == "job_completed"
    assert mine[-1]["data"]["result"] == {"attempt": 3}
    assert types.count("job_started") == 3
    retrying = [m["data"] for m in mine if m["type"] == "job_retrying"]
    started = [m["data"] for m in mine if m["type"] == "job_started"]
    # retry n (after attempt n failed) is the run started by started[n]
    for n, (event, start) in enumerate(zip(retrying, started[1:], strict=True), 1):
        assert set(event) >= {"job_id", "attempt", "error", "run_at"}
        assert event["attempt"] == n
        assert event["error"].startswith(f"flaky attempt {n} failed at")
        failed_at = _fail_time(event["error"])
        low, high = 0.5 * 2 ** (n - 1), 1.0 * 2 ** (n - 1)
        gap = event["run_at"] - failed_at
        assert low - 0.05 <= gap <= high + SLACK, (n, gap)
        # the retry did not start before run_at, and not much after it
        assert start["started_at"] >= event["run_at"] - 0.01, (start, event)
        assert low - 0.05 <= start["started_at"] - failed_at <= high + SLACK + 0.5
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        job = c.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "completed"
    assert job["attempts"] == 3
    assert job["max_attempts"] == 3
    assert job["run_at"] is None


def test_retried_job_that_succeeds_shows_no_error(api):
    """While it waits for its retry the job may show the last error; once a later
    attempt completes, the job is a success: ``error`` is null, like any completed job."""
    created = create(api, "flaky", {"succeed_on": 2}, max_attempts=2)
    job = wait_for(api, created["id"], timeout=20)
    assert (job["status"], job["attempts"], job["result"]) == ("completed", 2, {"attempt": 2})
    assert job["error"] is None, job


@both_stores
def test_retries_exhausted(api):
    created = create(api, "doomed", max_attempts=2)
    job = wait_for(api, created["id"], timeout=20)
    assert job["status"] == "failed"
    assert job["error"] == "doomed attempt 2"  # only the last failure is terminal
    assert job["attempts"] == 2


async def test_retries_exhausted_events(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "doomed", "max_attempts": 2})
        job_id = r.json()["id"]
        log: list = []
        await ws_until(ws, is_terminal_for(job_id), 20, log)
        # a moment more: nothing may follow the terminal event
        later = await ws_collect(ws, 1.5)
        assert not [m for m in later if about(job_id)(m)], later
    mine = [m for m in log if about(job_id)(m)]
    types = [m["type"] for m in mine]
    assert types.count("job_retrying") == 1
    assert types.count("job_failed") == 1 and types[-1] == "job_failed"
    assert types.index("job_retrying") < types.index("job_failed")
    retrying = mine[types.index("job_retrying")]["data"]
    assert retrying["attempt"] == 1 and retrying["error"] == "doomed attempt 1"
    assert mine[-1]["data"] == {"job_id": job_id, "error": "doomed attempt 2"}


def test_no_retry_by_default(api):
    created = create(api, "doomed")
    assert created["max_attempts"] == 1
    job = wait_for(api, created["id"])
    assert (job["status"], job["error"], job["attempts"]) == ("failed", "doomed attempt 1", 1)


def test_timeout_is_retried(api):
    created = create(api, "nap", {"seconds": 30}, timeout=0.3, max_attempts=2)
    job = wait_for(api, created["id"], timeout=20)
    assert (job["status"], job["error"], job["attempts"]) == ("failed", "timeout", 2)


def test_sse_follows_a_retried_job_to_completion(api, srv):
    created = create(api, "flaky", {"succeed_on": 2}, max_attempts=2)
    names = [name for name, _ in sse_events(srv.url, created["id"])]
    assert names[-1] == "complete", names
    assert "failed" not in names


async def test_cancel_while_waiting_to_retry(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "flaky", "params": {"succeed_on": 2},
                                            "max_attempts": 2})
        job_id = r.json()["id"]
        retrying = await ws_until(ws, lambda m: m.get("type") == "job_retrying"
                                  and m["data"]["job_id"] == job_id)
        r = await c.delete(f"/api/jobs/{job_id}")
        assert r.status_code == 200, r.text
        log: list = []
        await ws_until(ws, is_terminal_for(job_id), log=log)
        assert log[-1]["type"] == "job_cancelled"
        # past the retry's run_at: it never starts again
        wait = max(0.0, retrying["data"]["run_at"] - time.time()) + 0.8
        later = await ws_collect(ws, wait)
        assert not [m for m in later if about(job_id)(m)], later
        job = (await c.get(f"/api/jobs/{job_id}")).json()
        assert job["status"] == "cancelled" and job["attempts"] == 1


async def test_cancel_delayed_job(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "quick", "delay": 0.6})
        job_id = r.json()["id"]
        assert (await c.delete(f"/api/jobs/{job_id}")).status_code == 200
        await ws_until(ws, is_terminal_for(job_id))
        later = await ws_collect(ws, 1.2)  # past the delay: it never starts
        assert not [m for m in later if about(job_id)(m)], later
        job = (await c.get(f"/api/jobs/{job_id}")).json()
        assert (job["status"], job["attempts"], job["started_at"]) == ("cancelled", 0, None)


# ======================================================================================
# Priorities, delayed start
# ======================================================================================


@both_stores
def test_priority_order(jobs_server, db):
    srv = jobs_server("--concurrency", "1", db=db)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        blocker = create(c, "hold")
        wait_for(c, blocker["id"], ("running",))
        order = [("low1", -3), ("high1", 10), ("mid1", 5), ("low2", -3), ("high2", 10),
                 ("zero", None), ("mid2", 5)]
        ids = {}
        for label, priority in order:
            options = {} if priority is None else {"priority": priority}
            job = create(c, "quick", **options)
            assert job["priority"] == (0 if priority is None else priority)
            ids[job["id"]] = label
        assert c.delete(f"/api/jobs/{blocker['id']}").status_code == 200
        for job_id in ids:
            wait_for(c, job_id)
        jobs = [c.get(f"/api/jobs/{i}").json() for i in ids]
    started = sorted(jobs, key=lambda j: j["started_at"])
    assert [ids[j["id"]] for j in started] == \
        ["high1", "high2", "mid1", "mid2", "zero", "low1", "low2"]


def test_priority_validation(api):
    for bad in (1.5, "high", True, [1]):
        r = api.post("/api/jobs", json={"job_type": "quick", "priority": bad})
        assert r.status_code == 400, bad
        assert r.json().get("param") == "priority"
        assert "priority" in r.json()["error"]


@both_stores
def test_delayed_start(api):
    before = time.time()
    created = create(api, "quick", delay=1.5)
    job = api.get(f"/api/jobs/{created['id']}").json()
    assert job["status"] == "pending"
    assert job["run_at"] is not None
    assert before + 1.5 - 0.05 <= job["run_at"] <= time.time() + 1.5 + 0.05
    time.sleep(0.7)
    assert api.get(f"/api/jobs/{created['id']}").json()["status"] == "pending"
    done = wait_for(api, created["id"], timeout=10)
    assert done["status"] == "completed"
    assert done["started_at"] >= job["run_at"]
    assert done["started_at"] <= job["run_at"] + 2  # and it did start (not much) after


def test_run_at_start(api):
    run_at = time.time() + 1.2
    created = create(api, "quick", run_at=run_at)
    job = api.get(f"/api/jobs/{created['id']}").json()
    assert job["status"] == "pending" and job["run_at"] == pytest.approx(run_at)
    # an undelayed job created afterwards runs first
    other = create(api, "quick")
    assert wait_for(api, other["id"])["status"] == "completed"
    assert api.get(f"/api/jobs/{created['id']}").json()["status"] == "pending"
    done = wait_for(api, created["id"], timeout=10)
    assert done["status"] == "completed"
    assert done["started_at"] >= run_at


def test_run_at_in_the_past_runs_now(api):
    created = create(api, "quick", run_at=time.time() - 60)
    assert wait_for(api, created["id"])["status"] == "completed"


def test_delay_options_validated(api):
    r = api.post("/api/jobs", json={"job_type": "quick", "delay": 1, "run_at": time.time() + 5})
    assert r.status_code == 400
    assert "delay" in r.json()["error"] and "run_at" in r.json()["error"]
    for body in ({"delay": -1}, {"delay": "soon"}, {"run_at": "tomorrow"}, {"run_at": -5},
                 {"timeout": 0}, {"timeout": -1}, {"timeout": "1"},
                 {"max_attempts": 0}, {"max_attempts": 1.5}):
        r = api.post("/api/jobs", json={"job_type": "quick", **body})
        assert r.status_code == 400, body
        name = next(iter(body))
        assert r.json().get("param") == name, (body, r.json())
    assert api.get("/api/stats").json()["queue"]["total"] == 0


async def test_delayed_job_over_websocket(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws:
        await ws.send(json.dumps({"type": "create_job", "job_type": "quick", "delay": 0.8,
                                  "priority": 2}))
        log: list = []
        ack = await ws_until(ws, lambda m: m.get("type") == "job_created_ack", log=log)
        created = [m for m in log if m.get("type") == "job_created"][0]["data"]
        assert created["id"] == ack["job_id"]
        assert created["status"] == "pending" and created["run_at"] is not None
        assert created["priority"] == 2
        started = await ws_until(ws, lambda m: m.get("type") == "job_started"
                                 and m["data"]["job_id"] == ack["job_id"], 10)
        assert started["data"]["started_at"] >= created["run_at"]


# ======================================================================================
# Idempotency
# ======================================================================================


@both_stores
def test_idempotency_key_header(api):
    body = {"job_type": "greet", "params": {"name": "Idem"}, "priority": 1}
    r1 = api.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert r1.status_code == 201
    r2 = api.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert r2.status_code == 200, r2.text
    assert r2.json()["id"] == r1.json()["id"]
    assert r2.headers.get("location") == f"/api/jobs/{r1.json()['id']}"
    # different params, or different options, with the same key: 409
    r3 = api.post("/api/jobs", json={**body, "params": {"name": "Other"}},
                  headers={"Idempotency-Key": "order-17"})
    assert r3.status_code == 409, r3.text
    assert "error" in r3.json()
    r4 = api.post("/api/jobs", json={**body, "priority": 2},
                  headers={"Idempotency-Key": "order-17"})
    assert r4.status_code == 409
    r5 = api.post("/api/jobs", json={**body, "job_type": "kinds", "params": {}},
                  headers={"Idempotency-Key": "order-17"})
    assert r5.status_code == 409
    # another key: another job
    r6 = api.post("/api/jobs", json=body, headers={"Idempotency-Key": "order-18"})
    assert r6.status_code == 201 and r6.json()["id"] != r1.json()["id"]
    assert len(api.get("/api/jobs").json()) == 2


def test_idempotency_key_field(api):
    body = {"job_type": "quick", "idempotency_key": "field-key"}
    r1 = api.post("/api/jobs", json=body)
    assert r1.status_code == 201
    wait_for(api, r1.json()["id"])
    r2 = api.post("/api/jobs", json=body)  # still found after the job finished
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]
    assert r2.json()["status"] == "completed"
    r3 = api.post("/api/jobs", json={**body, "timeout": 3})
    assert r3.status_code == 409
    # the header and the field name the same key
    r4 = api.post("/api/jobs", json={"job_type": "quick"},
                  headers={"Idempotency-Key": "field-key"})
    assert r4.status_code == 200 and r4.json()["id"] == r1.json()["id"]
    # a key that is not a non-empty string
    for bad in ("", 5, True):
        r = api.post("/api/jobs", json={"job_type": "quick", "idempotency_key": bad})
        assert r.status_code == 400 and r.json().get("param") == "idempotency_key", bad


async def test_idempotency_over_websocket(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        msg = {"type": "create_job", "job_type": "quick", "idempotency_key": "ws-key"}
        await ws.send(json.dumps(msg))
        first = await ws_until(ws, lambda m: m.get("type") == "job_created_ack")
        assert not first.get("duplicate")
        job_id = first["job_id"]
        await ws_until(ws, is_terminal_for(job_id))
        log: list = []
        await ws.send(json.dumps(msg))
        second = await ws_until(ws, lambda m: m.get("type") == "job_created_ack", log=log)
        assert second["job_id"] == job_id
        assert second["duplicate"] is True
        assert not [m for m in log if m.get("type") == "job_created"]  # no new job
        # the same key with other params is refused
        await ws.send(json.dumps({**msg, "job_type": "greet"}))
        err = await ws_until(ws, lambda m: m.get("type") in ("error", "job_created_ack"))
        assert err["type"] == "error", err
        # REST sees the same key
        r = await c.post("/api/jobs", json={"job_type": "quick"},
                         headers={"Idempotency-Key": "ws-key"})
        assert r.status_code == 200 and r.json()["id"] == job_id
        # clearing the finished job frees its key
        await ws.send(json.dumps({"type": "clear_completed"}))
        cleared = await ws_until(ws, lambda m: m.get("type") == "jobs_cleared_ack")
        assert cleared["cleared"] >= 1
        assert (await c.get(f"/api/jobs/{job_id}")).status_code == 404
        await ws.send(json.dumps(msg))
        third = await ws_until(ws, lambda m: m.get("type") == "job_created_ack")
        assert not third.get("duplicate")
        assert third["job_id"] > job_id


def test_idempotency_with_delay_option(api):
    body = {"job_type": "quick", "delay": 60}
    r1 = api.post("/api/jobs", json=body, headers={"Idempotency-Key": "later"})
    r2 = api.post("/api/jobs", json=body, headers={"Idempotency-Key": "later"})
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r2.json()["id"] == r1.json()["id"]
    assert r2.json()["run_at"] == r1.json()["run_at"]
    r3 = api.post("/api/jobs", json={**body, "delay": 30}, headers={"Idempotency-Key": "later"})
    assert r3.status_code == 409


@both_stores
async def test_idempotency_concurrent_requests(srv):
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        responses = await asyncio.gather(*[
            c.post("/api/jobs", json={"job_type": "greet", "params": {"name": "race"}},
                   headers={"Idempotency-Key": "race-key"}) for _ in range(8)])
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * 7 + [201], codes
        assert len({r.json()["id"] for r in responses}) == 1
        assert len((await c.get("/api/jobs")).json()) == 1


@both_stores
def test_idempotency_key_freed_by_rest_clear(api):
    r1 = api.post("/api/jobs", json={"job_type": "quick"}, headers={"Idempotency-Key": "k"})
    wait_for(api, r1.json()["id"])
    assert api.post("/api/jobs/clear-completed").json()["cleared"] == 1
    r2 = api.post("/api/jobs", json={"job_type": "greet"}, headers={"Idempotency-Key": "k"})
    assert r2.status_code == 201
    assert r2.json()["id"] > r1.json()["id"]


# ======================================================================================
# Per-type defaults, the job object
# ======================================================================================


@both_stores
def test_type_defaults_and_overrides(api):
    plain = create(api, "tuned")
    job = api.get(f"/api/jobs/{plain['id']}").json()
    assert (job["priority"], job["timeout"], job["max_attempts"]) == (5, 2, 2)
    override = create(api, "tuned", priority=-1, timeout=9.5, max_attempts=4)
    job = api.get(f"/api/jobs/{override['id']}").json()
    assert (job["priority"], job["timeout"], job["max_attempts"]) == (-1, 9.5, 4)
    partial = create(api, "tuned", max_attempts=1)
    job = api.get(f"/api/jobs/{partial['id']}").json()
    assert (job["priority"], job["timeout"], job["max_attempts"]) == (5, 2, 1)
    # the others keep the global defaults
    quick = api.get(f"/api/jobs/{create(api, 'quick')['id']}").json()
    assert (quick["priority"], quick["timeout"], quick["max_attempts"]) == (0, None, 1)
    for created in (plain, override, partial):
        assert wait_for(api, created["id"])["status"] == "completed"


async def test_job_object_fields(srv):
    fields = {"priority", "attempts", "run_at", "timeout", "max_attempts", "retry_of"}
    protocol = {"id", "type", "params", "status", "progress", "result", "error",
                "created_at", "started_at", "completed_at"}
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "greet", "priority": 3, "timeout": 7,
                                            "max_attempts": 2, "delay": 30})
        job_id = r.json()["id"]
        created = await ws_until(ws, lambda m: m.get("type") == "job_created")
        got = (await c.get(f"/api/jobs/{job_id}")).json()
        listed = [j for j in (await c.get("/api/jobs")).json() if j["id"] == job_id][0]
        await ws.send(json.dumps({"type": "get_state"}))
        state = await ws_until(ws, lambda m: m.get("type") == "queue_state")
        in_state = [j for j in state["jobs"] if j["id"] == job_id][0]
        for job in (got, listed, in_state, created["data"]):
            assert set(job) >= fields | protocol, job
            assert job["status"] == "pending"
            assert (job["priority"], job["timeout"], job["max_attempts"]) == (3, 7, 2)
            assert job["attempts"] == 0 and job["retry_of"] is None
            assert job["run_at"] == pytest.approx(job["created_at"] + 30, abs=1)
        assert (await c.delete(f"/api/jobs/{job_id}")).status_code == 200


# ======================================================================================
# POST /api/jobs/{id}/retry and retry_job
# ======================================================================================


@both_stores
def test_retry_failed_job(api):
    original = create(api, "boom", priority=4, timeout=8, max_attempts=1)
    failed = wait_for(api, original["id"])
    assert failed["status"] == "failed"
    r = api.post(f"/api/jobs/{original['id']}/retry")
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] != original["id"]
    assert r.headers.get("location") == f"/api/jobs/{new['id']}"
    assert new["retry_of"] == original["id"]
    assert new["type"] == "boom" and new["params"] == failed["params"]
    assert (new["priority"], new["timeout"], new["max_attempts"]) == (4, 8, 1)
    assert new["status"] == "pending" and new["attempts"] == 0
    again = wait_for(api, new["id"])
    assert again["status"] == "failed" and again["retry_of"] == original["id"]
    # the original stays exactly as it was
    assert api.get(f"/api/jobs/{original['id']}").json() == failed


def test_retry_cancelled_job_with_params(api):
    original = create(api, "nap", {"seconds": 20}, priority=-2, timeout=25, max_attempts=3)
    wait_for(api, original["id"], ("running",))
    assert api.delete(f"/api/jobs/{original['id']}").status_code == 200
    cancelled = wait_for(api, original["id"])
    assert cancelled["status"] == "cancelled"
    r = api.post(f"/api/jobs/{original['id']}/retry")
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["retry_of"] == original["id"]
    assert (new["type"], new["params"]) == ("nap", {"seconds": 20})
    assert (new["priority"], new["timeout"], new["max_attempts"]) == (-2, 25, 3)
    assert api.get(f"/api/jobs/{new['id']}").json()["retry_of"] == original["id"]
    assert api.get(f"/api/jobs/{original['id']}").json() == cancelled
    assert api.delete(f"/api/jobs/{new['id']}").status_code == 200
    # a retry of a retry names its own original
    r = api.post(f"/api/jobs/{new['id']}/retry")
    assert r.status_code == 201 and r.json()["retry_of"] == new["id"]
    api.delete(f"/api/jobs/{r.json()['id']}")


def test_retry_refused(api):
    done = create(api, "quick")
    wait_for(api, done["id"])
    r = api.post(f"/api/jobs/{done['id']}/retry")
    assert r.status_code == 409
    assert "completed" in r.json()["error"]
    pending = create(api, "quick", delay=30)
    r = api.post(f"/api/jobs/{pending['id']}/retry")
    assert r.status_code == 409
    assert "pending" in r.json()["error"]
    running = create(api, "hold")
    wait_for(api, running["id"], ("running",))
    assert api.post(f"/api/jobs/{running['id']}/retry").status_code == 409
    assert api.post("/api/jobs/999/retry").status_code == 404
    assert api.post("/api/jobs/abc/retry").status_code == 400
    assert api.get(f"/api/jobs/{done['id']}/retry").status_code == 405
    assert api.get("/api/stats").json()["queue"]["total"] == 3


async def test_retry_job_over_websocket(srv):
    ws, _ = await ws_open(srv.ws_url)
    async with ws, httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
        r = await c.post("/api/jobs", json={"job_type": "doomed", "priority": 6})
        original = r.json()["id"]
        await ws_until(ws, is_terminal_for(original))
        log: list = []
        await ws.send(json.dumps({"type": "retry_job", "job_id": original}))
        ack = await ws_until(ws, lambda m: m.get("type") == "job_created_ack", log=log)
        new_id = ack["job_id"]
        assert new_id != original
        created = [m for m in log if m.get("type") == "job_created"]
        assert created and created[0]["data"]["id"] == new_id
        assert created[0]["data"]["retry_of"] == original
        assert created[0]["data"]["priority"] == 6
        await ws_until(ws, is_terminal_for(new_id), log=log)
        assert log[-1]["type"] == "job_failed"
        # nothing about the original followed its terminal event
        assert not [m for m in log if about(original)(m)], log
        # retry of a completed job, of an unknown one, a bad id: error replies
        r = await c.post("/api/jobs", json={"job_type": "quick"})
        done = r.json()["id"]
        await ws_until(ws, is_terminal_for(done))
        for job_id, words in ((done, "completed"), (999, "not found"), ("x", "job_id")):
            await ws.send(json.dumps({"type": "retry_job", "job_id": job_id}))
            err = await ws_until(ws, lambda m: m.get("type") in ("error", "job_created_ack"))
            assert err["type"] == "error", err
            assert words in err["message"].lower() or words in err["message"], err


# ======================================================================================
# Registration errors: the server refuses to start
# ======================================================================================

BAD_MODULES = {
    "duplicate": ('''
        from rawjobs import job_type

        @job_type("twice")
        async def first(ctx):
            return 1

        @job_type("twice")
        async def second(ctx):
            return 2
    ''', ["twice", "duplicate"]),
    "builtin_clash": ('''
        from rawjobs import job_type

        @job_type("echo")
        async def my_echo(ctx):
            return 1
    ''', ["echo", "duplicate"]),
    "bad_default": ('''
        from rawjobs import job_type, Param

        @job_type("ranged", params=[Param("size", int, default=100, min=1, max=10)])
        async def ranged(ctx):
            return 1
    ''', ["size", "default"]),
    "unknown_type": ('''
        from rawjobs import job_type, Param

        @job_type("listy", params=[Param("items", list)])
        async def listy(ctx):
            return 1
    ''', ["items", "type"]),
    "bad_choice_default": ('''
        from rawjobs import job_type, Param

        @job_type("colours", params=[Param("c", "choice", default="blue",
                                           choices=["red", "green"])])
        async def colours(ctx):
            return 1
    ''', ["'c'", "default"]),
}


def _wait_exit(server, timeout: float = 20) -> int:
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server did not exit; log:\n{server.log()}") from None


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_registration_error_stops_server(start_server, tmp_path, case):
    text, words = BAD_MODULES[case]
    write_module(tmp_path, f"bad_{case}", text)
    server = start_server("--jobs", f"bad_{case}", ready=False)
    code = _wait_exit(server)
    log = server.log()
    assert code != 0, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines, "no message"
    # a clear one-line message, not a traceback
    assert "Traceback" not in log, log
    message = "\n".join(lines).lower()
    for word in words:
        assert word.lower() in message, (word, log)
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/api/stats", timeout=1)


def test_missing_jobs_module_stops_server(start_server):
    server = start_server("--jobs", "no_such_module_xyz", ready=False)
    code = _wait_exit(server)
    assert code != 0
    assert "no_such_module_xyz" in server.log()


def test_several_jobs_modules(start_server, tmp_path):
    write_module(tmp_path, "jobs_a", '''
        from rawjobs import job_type

        @job_type("alpha", description="from module a")
        async def alpha(ctx):
            return {"from": "a"}
    ''')
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write_module(pkg, "jobs", '''
        from rawjobs import job_type, Param

        @job_type("beta", description="from mypkg.jobs",
                  params=[Param("x", int, default=1, min=0, max=9)])
        def beta(ctx):
            ctx.progress(50, "half")
            return {"from": "b", "x": ctx.params["x"]}
    ''')
    server = start_server("--jobs", "jobs_a", "--jobs", "mypkg.jobs")
    with httpx.Client(base_url=server.url, timeout=10) as c:
        names = [t["name"] for t in c.get("/api/job-types").json()]
        assert names == ["countdown", "prime", "fibonacci", "echo", "alpha", "beta"]
        a = create(c, "alpha")
        b = create(c, "beta", {"x": 7})
        assert wait_for(c, a["id"])["result"] == {"from": "a"}
        assert wait_for(c, b["id"])["result"] == {"from": "b", "x": 7}


def test_async_handler_with_process_executor(start_server, tmp_path):
    """``executor="process"`` on an ``async def`` handler: either it runs (in a worker
    process) or registration refuses it with a clear message; never a job type that
    is listed but fails every run."""
    write_module(tmp_path, "asyncproc", '''
        import os
        from rawjobs import job_type

        @job_type("aproc", executor="process")
        async def aproc(ctx):
            await ctx.progress(50, "half way")
            await ctx.sleep(0.01)
            return {"pid": os.getpid(), "job_id": ctx.job_id}
    ''')
    server = start_server("--jobs", "asyncproc", ready=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            httpx.get(server.url + "/api/stats", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    if server.proc.poll() is not None:  # refused at registration
        assert server.proc.returncode != 0
        message = server.log().lower()
        assert "aproc" in message and ("async" in message or "executor" in message), message
        return
    with httpx.Client(base_url=server.url, timeout=10) as c:
        created = create(c, "aproc", delay=0.5)  # the stream opens before the start
        events = sse_events(server.url, created["id"])
        job = wait_for(c, created["id"], timeout=20)
        assert job["status"] == "completed", job
        assert job["result"]["job_id"] == created["id"]
        assert job["result"]["pid"] != server.proc.pid
    assert (50, "half way") in [(d["percent"], d["message"]) for e, d in events
                                if e == "progress"], events


# ======================================================================================
# The registration API, in-process
# ======================================================================================


async def _handler(ctx: JobContext) -> dict:
    return {}


def _plain_handler(ctx) -> dict:
    return {}


def test_public_api_exports():
    import rawjobs

    for name in ("job_type", "Param", "JobContext", "JobTypeError"):
        assert hasattr(rawjobs, name), name
    assert issubclass(JobTypeError, Exception)


def test_param_kinds_and_schema():
    assert Param("a", int, default=1, min=0, max=5).schema() == \
        {"name": "a", "type": "integer", "default": 1, "min": 0, "max": 5, "description": ""}
    assert Param("a", "integer").kind == "integer"
    assert Param("b", float).kind == "number" and Param("b", "number").kind == "number"
    assert Param("c", str, max_length=3).schema()["max_length"] == 3
    assert Param("d", bool, default=True).kind == "boolean"
    choice = Param("e", "choice", default="x", choices=["x", "y"])
    assert choice.schema()["choices"] == ["x", "y"] and choice.schema()["type"] == "choice"
    assert Param("f", choices=[1, 2], default=1).kind == "choice"  # implied by choices
    required = Param("g", int)
    assert "default" not in required.schema()


@pytest.mark.parametrize("make,words", [
    (lambda: Param("n", list), ["unknown", "type", "'n'"]),
    (lambda: Param("n", "decimal"), ["unknown", "type", "'n'"]),
    (lambda: Param("n", int, default=11, min=1, max=10), ["default", "'n'"]),
    (lambda: Param("n", int, default="many"), ["default", "'n'"]),
    (lambda: Param("n", str, default="toolong", max_length=3), ["default", "'n'"]),
    (lambda: Param("n", bool, default="yes"), ["default", "'n'"]),
    (lambda: Param("n", "choice", default="z", choices=["x", "y"]), ["default", "'n'"]),
    (lambda: Param("n", "choice", choices=[]), ["choices", "'n'"]),
    (lambda: Param("n", int, min=5, max=1), ["min", "max", "'n'"]),
    (lambda: Param("bad name!", int), ["name"]),
])
def test_param_errors(make, words):
    with pytest.raises(JobTypeError) as info:
        make()
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, (word, message)


@pytest.mark.parametrize("kwargs,words", [
    ({"name": "bad name"}, ["name"]),
    ({"name": ""}, ["name"]),
    ({"params": [Param("a", int), Param("a", str)]}, ["duplicate", "param"]),
    ({"params": ["a"]}, ["param"]),
    ({"executor": "thread"}, ["executor", "thread"]),
    ({"executor": "async", "handler": _plain_handler}, ["async"]),
    ({"priority": 1.5}, ["priority"]),
    ({"max_attempts": 0}, ["max_attempts"]),
    ({"timeout": -1}, ["timeout"]),
    ({"handler": "not callable"}, ["callable"]),
])
def test_make_job_type_errors(kwargs, words):
    args = {"name": "ok", "handler": _handler, **kwargs}
    with pytest.raises(JobTypeError) as info:
        make_job_type(args.pop("name"), args.pop("handler"), **args)
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, (word, message)


def test_process_handler_must_be_module_level():
    def local(ctx):
        return {}

    with pytest.raises(JobTypeError, match="module-level"):
        make_job_type("local", local)
    with pytest.raises(JobTypeError, match="module-level"):
        make_job_type("local2", local, executor="process")


def test_make_job_type_executors_and_defaults():
    jt = make_job_type("a", _handler)
    assert (jt.executor, jt.priority, jt.timeout, jt.max_attempts) == ("async", 0, None, 1)
    assert make_job_type("b", _plain_handler).executor == "process"
    jt = make_job_type("d", _handler, priority=5, timeout=2, max_attempts=3,
                       params=[Param("x", int, default=1)], description="D")
    assert (jt.priority, jt.timeout, jt.max_attempts) == (5, 2, 3)
    assert jt.schema()["name"] == "d" and jt.schema()["description"] == "D"
    assert jt.validate_params({}) == {"x": 1}


def test_job_type_decorator_with_registry():
    reg = Registry()
    decorated = job_type("one", description="1", registry=reg)(_handler)
    assert decorated is _handler  # still callable as a plain function
    job_type("two", registry=reg)(_plain_handler)
    assert [t.name for t in reg] == ["one", "two"]
    with pytest.raises(JobTypeError, match="(?i)duplicate.*one|one.*duplicate"):
        job_type("one", registry=reg)(_handler)
    assert len(reg) == 2

