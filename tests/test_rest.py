"""Every REST endpoint of PROTOCOL.md ("REST", "Job types", "Job object"), through httpx
against a real server; the queue's behaviour (concurrency cap, FIFO order, cancel,
a free event loop under CPU-heavy jobs) is watched over /ws/queue with `websockets`."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

JOB_KEYS = {"id", "type", "params", "status", "progress", "result", "error",
            "created_at", "started_at", "completed_at"}
FINISHED = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def shared(start_module_server):
    """One default server for the stateless checks (validation, methods, HEAD...):
    they never depend on which jobs exist, so they need not pay for a server each."""
    return start_module_server("--grace", "0")


@pytest.fixture
def api(shared):
    with httpx.Client(base_url=shared.url, timeout=10) as c:
        yield c


# -- helpers -------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int) -> dict:
    """``r`` is ``status`` with a JSON error body ``{"error": "<sentence>", ...}``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0].strip() == "application/json"
    body = r.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


def create(c: httpx.Client, job_type: str, params: dict | None = None) -> int:
    body: dict = {"job_type": job_type}
    if params is not None:
        body["params"] = params
    r = c.post("/api/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_until(check, timeout: float = 15.0, interval: float = 0.05):
    """Poll ``check()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(interval)


def wait_status(c: httpx.Client, job_id: int, statuses, timeout: float = 15.0) -> dict:
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)

    def check():
        job = c.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout)


def next_link(r: httpx.Response) -> str | None:
    link = r.headers.get("link")
    if link is None:
        return None
    m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
    assert m, link
    return m.group(1)


class Feed:
    """A /ws/queue connection recording every message with its arrival time."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.log: list[tuple[float, dict]] = []
        self.state: dict = {}

    @classmethod
    async def open(cls, url: str) -> Feed:
        feed = cls(await ws_connect(url, max_size=None))
        feed.state = await feed.next()
        assert feed.state["type"] == "queue_state"
        return feed

    async def next(self, timeout: float = 15.0) -> dict:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        msg = json.loads(raw)
        self.log.append((time.monotonic(), msg))
        return msg

    async def until(self, predicate, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(msg):
                return msg

    async def wait_for(self, predicate, timeout: float = 20.0) -> dict:
        """The first message so far matching ``predicate``, else the next one to come."""
        for _, msg in self.log:
            if predicate(msg):
                return msg
        return await self.until(predicate, timeout)

    async def drain(self, seconds: float) -> None:
        """Record whatever arrives during ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await self.next(left)
            except TimeoutError:
                return

    def events(self, *types: str) -> list[dict]:
        return [m for _, m in self.log if "seq" in m and "data" in m
                and (not types or m["type"] in types)]

    def about(self, job_id: int) -> list[dict]:
        """Broadcast events whose data names ``job_id``."""
        return [m for m in self.events()
                if m["data"].get("job_id") == job_id
                or (m["type"] == "job_created" and m["data"].get("id") == job_id)]

    async def close(self) -> None:
        await self.ws.close()


def terminal_of(job_id: int):
    return lambda m: (m.get("type") in ("job_completed", "job_failed", "job_cancelled")
                      and m["data"]["job_id"] == job_id)


# -- /api/stats and /api/job-types -----------------------------------------------------


def test_stats_shape_on_a_fresh_server(client):
    r = client.get("/api/stats")
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == "application/json"
    assert r.json() == {
        "queue": {"pending": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0,
                  "total": 0},
        "worker": {"active": 0, "capacity": 3, "processed": 0, "is_running": True},
    }


def test_stats_counts_follow_the_jobs(client):
    done = create(client, "fibonacci", {"count": 5})
    wait_status(client, done, "completed")
    long_ids = [create(client, "countdown", {"seconds": 30}) for _ in range(4)]
    wait_until(lambda: client.get("/api/stats").json()["queue"]["running"] == 3)
    client.delete(f"/api/jobs/{long_ids[-1]}")
    stats = client.get("/api/stats").json()
    assert stats["queue"] == {"pending": 0, "running": 3, "completed": 1, "failed": 0,
                              "cancelled": 1, "total": 5}
    assert stats["worker"] == {"active": 3, "capacity": 3, "processed": 1, "is_running": True}
    for group in stats.values():
        for key, value in group.items():
            if key != "is_running":
                assert type(value) is int, (key, value)


EXPECTED_TYPES = [
    ("countdown", [{"name": "seconds", "type": "integer", "default": 10, "min": 1, "max": 60}]),
    ("prime", [{"name": "limit", "type": "integer", "default": 1000, "min": 10, "max": 100000}]),
    ("fibonacci", [{"name": "count", "type": "integer", "default": 20, "min": 5, "max": 50}]),
    ("echo", [{"name": "message", "type": "string", "default": "Hello, World!", "max_length": 200},
              {"name": "delay", "type": "integer", "default": 3, "min": 1, "max": 30}]),
]


def test_job_types_schemas_in_stable_order(api):
    r = api.get("/api/job-types")
    assert r.status_code == 200
    types = r.json()
    assert [t["name"] for t in types] == [name for name, _ in EXPECTED_TYPES]
    for t, (name, params) in zip(types, EXPECTED_TYPES, strict=True):
        assert {"name", "description", "params"} <= set(t)
        assert isinstance(t["description"], str) and t["description"]
        assert [p["name"] for p in t["params"]] == [p["name"] for p in params]
        for got, want in zip(t["params"], params, strict=True):
            for key, value in want.items():
                assert got[key] == value, (name, key, got)
                assert type(got[key]) is type(value), (name, key, got)
            assert isinstance(got.get("description"), str) and got["description"]
            if want["type"] == "string":  # max_length instead of min/max for strings
                assert "min" not in got and "max" not in got, got
    # stable: the same list, in the same order, every time
    assert api.get("/api/job-types").json() == types
    assert api.get("/api/job-types").json() == types


# -- GET /api/jobs ---------------------------------------------------------------------


def ids_of(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [job["id"] for job in r.json()]


def test_list_jobs_newest_first_with_filters_and_pages(client):
    assert client.get("/api/jobs").json() == []
    for _ in range(3):
        create(client, "countdown", {"seconds": 30})
    create(client, "echo", {"message": "hi", "delay": 30})
    create(client, "fibonacci", {"count": 5})
    wait_until(lambda: client.get("/api/stats").json()["queue"]["running"] == 3)

    r = client.get("/api/jobs")
    assert ids_of(r) == [5, 4, 3, 2, 1]
    assert "link" not in r.headers
    for job in r.json():
        assert JOB_KEYS <= set(job)
    assert ids_of(client.get("/api/jobs", params={"status": "running"})) == [3, 2, 1]
    assert ids_of(client.get("/api/jobs", params={"status": "pending"})) == [5, 4]
    assert ids_of(client.get("/api/jobs", params={"status": "completed"})) == []
    assert ids_of(client.get("/api/jobs", params={"type": "echo"})) == [4]
    assert ids_of(client.get("/api/jobs", params={"type": "countdown"})) == [3, 2, 1]
    assert ids_of(client.get("/api/jobs", params={"type": "fibonacci",
                                                  "status": "pending"})) == [5]
    assert ids_of(client.get("/api/jobs", params={"before": 3})) == [2, 1]
    assert ids_of(client.get("/api/jobs", params={"limit": 1000})) == [5, 4, 3, 2, 1]

    # pages of two, following Link rel="next"
    pages = []
    r = client.get("/api/jobs", params={"limit": 2})
    while True:
        pages.append(ids_of(r))
        url = next_link(r)
        if url is None:
            break
        assert len(pages) < 5, pages
        r = client.get(url)
    assert pages == [[5, 4], [3, 2], [1]]

    # the link keeps the filters
    r = client.get("/api/jobs", params={"status": "running", "limit": 2})
    assert ids_of(r) == [3, 2]
    url = next_link(r)
    assert url is not None
    r = client.get(url)
    assert ids_of(r) == [1]
    assert next_link(r) is None


@pytest.mark.parametrize("query", [
    {"limit": "0"}, {"limit": "1001"}, {"limit": "-1"}, {"limit": "abc"}, {"limit": "1.5"},
    {"limit": ""}, {"before": "abc"}, {"before": "1.5"}, {"status": "bogus"},
    {"status": "done"},
])
def test_list_jobs_bad_query_is_400(api, query):
    assert_error(api.get("/api/jobs", params=query), 400)


# -- POST /api/jobs --------------------------------------------------------------------


def test_create_job_201_location_and_normalised_params(client):
    before = time.time()
    r = client.post("/api/jobs", json={"job_type": "countdown", "params": {"seconds": "5"}})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/api/jobs/1"
    body = r.json()
    assert {k: body[k] for k in ("id", "type", "params", "status")} == {
        "id": 1, "type": "countdown", "params": {"seconds": 5}, "status": "pending"}
    assert type(body["params"]["seconds"]) is int
    assert isinstance(body["created_at"], float)
    assert before - 5 <= body["created_at"] <= time.time() + 5

    # the Location is the job
    job = client.get(r.headers["location"])
    assert job.status_code == 200
    assert job.json()["id"] == 1 and job.json()["params"] == {"seconds": 5}

    # defaults fill missing params; ids follow creation order
    r = client.post("/api/jobs", json={"job_type": "countdown"})
    assert (r.status_code, r.json()["id"], r.json()["params"]) == (201, 2, {"seconds": 10})
    assert r.headers["location"] == "/api/jobs/2"
    r = client.post("/api/jobs", json={"job_type": "echo", "params": {}})
    assert r.status_code == 201
    assert r.json()["params"] == {"message": "Hello, World!", "delay": 3}
    r = client.post("/api/jobs", json={"job_type": "echo", "params": {"delay": "2"}})
    assert r.json()["params"] == {"message": "Hello, World!", "delay": 2}
    r = client.post("/api/jobs", json={"job_type": "prime"})
    assert r.json()["params"] == {"limit": 1000}
    r = client.post("/api/jobs", json={"job_type": "fibonacci"})
    assert r.json()["params"] == {"count": 20}
    assert r.json()["id"] == 6

    # application/json with parameters is still JSON
    r = client.post("/api/jobs", content=json.dumps({"job_type": "fibonacci",
                                                     "params": {"count": 5}}).encode(),
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == 7


@pytest.mark.parametrize("job_type, params", [
    ("countdown", {"seconds": 1}),
    ("countdown", {"seconds": 60}),
    ("countdown", {"seconds": "60"}),
    ("prime", {"limit": 10}),
    ("fibonacci", {"count": "50"}),
    ("echo", {"message": "x" * 200, "delay": 30}),
    ("echo", {"message": "\u00e9" * 200, "delay": 1}),  # 200 characters, 400 bytes
])
def test_create_job_accepts_the_bounds(api, job_type, params):
    r = api.post("/api/jobs", json={"job_type": job_type, "params": params})
    assert r.status_code == 201, r.text
    normalised = r.json()["params"]
    for name, value in params.items():
        assert normalised[name] == (int(value) if isinstance(value, str)
                                    and value.isdigit() else value)


BAD_PARAMS = [
    # out of range
    ("countdown", {"seconds": 0}, "seconds"),
    ("countdown", {"seconds": 61}, "seconds"),
    ("countdown", {"seconds": "61"}, "seconds"),
    ("prime", {"limit": 9}, "limit"),
    ("prime", {"limit": 100001}, "limit"),
    ("fibonacci", {"count": 4}, "count"),
    ("fibonacci", {"count": 51}, "count"),
    ("echo", {"delay": 0}, "delay"),
    ("echo", {"delay": 31}, "delay"),
    # negative
    ("countdown", {"seconds": -1}, "seconds"),
    ("countdown", {"seconds": "-1"}, "seconds"),
    # floats, even integral ones
    ("countdown", {"seconds": 2.5}, "seconds"),
    ("countdown", {"seconds": 5.0}, "seconds"),
    ("countdown", {"seconds": "5.0"}, "seconds"),
    # booleans
    ("countdown", {"seconds": True}, "seconds"),
    ("fibonacci", {"count": False}, "count"),
    # wrong type
    ("countdown", {"seconds": "abc"}, "seconds"),
    ("countdown", {"seconds": " 5"}, "seconds"),
    ("countdown", {"seconds": "\u0665"}, "seconds"),  # ARABIC-INDIC DIGIT FIVE: not ASCII
    ("countdown", {"seconds": None}, "seconds"),
    ("countdown", {"seconds": [5]}, "seconds"),
    ("echo", {"message": 5}, "message"),
    ("echo", {"message": ["hi"]}, "message"),
    # string length
    ("echo", {"message": ""}, "message"),
    ("echo", {"message": "x" * 201}, "message"),
    # undeclared parameter
    ("countdown", {"seconds": 5, "speed": 2}, "speed"),
    ("echo", {"text": "hi"}, "text"),
]


@pytest.mark.parametrize("job_type, params, name", BAD_PARAMS,
                         ids=[f"{t}-{json.dumps(p)[:40]}" for t, p, _ in BAD_PARAMS])
def test_create_job_bad_param_is_400_naming_it(api, job_type, params, name):
    before = api.get("/api/stats").json()["queue"]["total"]
    body = assert_error(api.post("/api/jobs", json={"job_type": job_type, "params": params}),
                        400)
    assert body.get("param") == name or name in body["error"], body
    assert api.get("/api/stats").json()["queue"]["total"] == before  # nothing was created


@pytest.mark.parametrize("raw", [
    b"{", b"", b"not json", b"{'job_type': 'countdown'}", b'{"job_type": "countdown",}',
    b"[1, 2]", b'"countdown"', b"42", b"null",
], ids=["truncated", "empty", "text", "single-quotes", "trailing-comma", "array", "string",
        "number", "null"])
def test_create_job_invalid_json_or_not_an_object_is_400(api, raw):
    assert_error(api.post("/api/jobs", content=raw,
                          headers={"Content-Type": "application/json"}), 400)


@pytest.mark.parametrize("body", [
    {}, {"params": {"seconds": 5}}, {"job_type": ""}, {"job_type": None}, {"job_type": 5},
    {"job_type": "nope"}, {"job_type": "Countdown"},
    {"job_type": "countdown", "params": [5]}, {"job_type": "countdown", "params": "seconds=5"},
], ids=["empty", "no-job-type", "blank", "null", "number", "unknown", "wrong-case",
        "params-array", "params-string"])
def test_create_job_missing_or_unknown_type_is_400(api, body):
    assert_error(api.post("/api/jobs", json=body), 400)


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
    "text/json", "application/jsonp",
])
def test_create_job_without_json_content_type_is_415(api, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    request = api.build_request("POST", "/api/jobs",
                                content=b'{"job_type": "countdown", "params": {"seconds": 1}}',
                                headers=headers)
    if content_type is None:
        assert "content-type" not in request.headers
    before = api.get("/api/stats").json()["queue"]["total"]
    assert_error(api.send(request), 415)
    assert api.get("/api/stats").json()["queue"]["total"] == before


def test_create_job_body_over_the_limit_is_413(api):
    message = "x" * (1024 * 1024 + 100)
    body = json.dumps({"job_type": "echo", "params": {"message": message}}).encode()
    assert_error(api.post("/api/jobs", content=body,
                          headers={"Content-Type": "application/json"}), 413)


# -- GET and DELETE /api/jobs/{id} -----------------------------------------------------


def test_get_job_object_and_404_and_400(client):
    job_id = create(client, "fibonacci", {"count": 5})
    r = client.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200
    job = r.json()
    assert JOB_KEYS <= set(job)
    assert (job["id"], job["type"], job["params"]) == (job_id, "fibonacci", {"count": 5})
    assert job["status"] in ("pending", "running")

    job = wait_status(client, job_id, "completed")
    assert job["progress"] == {"percent": 100, "message": "Complete"}
    assert job["error"] is None
    assert isinstance(job["started_at"], float) and isinstance(job["completed_at"], float)
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]

    body = assert_error(client.get("/api/jobs/7"), 404)
    assert body["error"] == "Job not found: 7"
    assert set(body) <= {"error", "job_id"}, body
    assert body.get("job_id", 7) == 7
    for bad in ("abc", "1.5", "1e3", "one"):
        assert_error(client.get(f"/api/jobs/{bad}"), 400)


def test_pending_job_object_is_queued(client):
    ids = [create(client, "countdown", {"seconds": 30}) for _ in range(4)]
    wait_until(lambda: client.get("/api/stats").json()["queue"]["running"] == 3)
    job = client.get(f"/api/jobs/{ids[3]}").json()
    assert job["status"] == "pending"
    assert job["progress"] == {"percent": 0, "message": "Queued"}
    assert job["result"] is None and job["error"] is None
    assert job["started_at"] is None and job["completed_at"] is None
    running = client.get(f"/api/jobs/{ids[0]}").json()
    assert running["status"] == "running"
    assert isinstance(running["started_at"], float) and running["completed_at"] is None


def test_delete_pending_running_finished_and_unknown(client):
    ids = [create(client, "countdown", {"seconds": 30}) for _ in range(4)]
    wait_until(lambda: client.get("/api/stats").json()["queue"]["running"] == 3)

    r = client.delete(f"/api/jobs/{ids[3]}")  # pending
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "job_id": ids[3]}
    assert client.get(f"/api/jobs/{ids[3]}").json()["status"] == "cancelled"
    assert client.get("/api/stats").json()["queue"]["pending"] == 0

    r = client.delete(f"/api/jobs/{ids[1]}")  # running
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "job_id": ids[1]}
    job = client.get(f"/api/jobs/{ids[1]}").json()
    assert job["status"] == "cancelled"
    assert isinstance(job["completed_at"], float)
    assert client.get("/api/stats").json()["queue"]["running"] == 2

    assert_error(client.delete(f"/api/jobs/{ids[3]}"), 409)  # cancelled already
    assert_error(client.delete(f"/api/jobs/{ids[1]}"), 409)
    done = create(client, "fibonacci", {"count": 5})
    wait_status(client, done, "completed")
    assert_error(client.delete(f"/api/jobs/{done}"), 409)
    assert client.get(f"/api/jobs/{done}").json()["status"] == "completed"

    body = assert_error(client.delete("/api/jobs/99"), 404)
    assert body["error"] == "Job not found: 99"
    assert_error(client.delete("/api/jobs/abc"), 400)


# -- clear-completed, methods, unknown paths, HEAD -----------------------------------------


def test_clear_completed(client):
    assert client.post("/api/jobs/clear-completed").json() == {"cleared": 0}
    fibs = [create(client, "fibonacci", {"count": 5}) for _ in range(2)]
    for job_id in fibs:
        wait_status(client, job_id, "completed")
    keep = create(client, "countdown", {"seconds": 30})
    gone = create(client, "countdown", {"seconds": 30})
    assert client.delete(f"/api/jobs/{gone}").status_code == 200
    wait_status(client, keep, "running")

    r = client.post("/api/jobs/clear-completed")
    assert r.status_code == 200
    assert r.json() == {"cleared": 3}
    for job_id in (*fibs, gone):
        assert_error(client.get(f"/api/jobs/{job_id}"), 404)
    assert ids_of(client.get("/api/jobs")) == [keep]
    assert client.get("/api/stats").json()["queue"] == {
        "pending": 0, "running": 1, "completed": 0, "failed": 0, "cancelled": 0, "total": 1}
    assert client.post("/api/jobs/clear-completed").json() == {"cleared": 0}
    # ids are never reused
    assert create(client, "fibonacci", {"count": 5}) == gone + 1


def test_get_on_clear_completed_is_405_allow_post(api):
    for method in ("GET", "HEAD", "DELETE"):
        r = api.request(method, "/api/jobs/clear-completed")
        assert r.status_code == 405, (method, r.status_code)
        assert r.headers["allow"] == "POST"
        if method != "HEAD":
            assert_error(r, 405)
        else:
            assert r.content == b""


def allowed(r: httpx.Response) -> set[str]:
    return {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/api/stats", {"GET", "HEAD"}),
    ("POST", "/api/stats", {"GET", "HEAD"}),
    ("DELETE", "/api/job-types", {"GET", "HEAD"}),
    ("PUT", "/api/jobs", {"GET", "HEAD", "POST"}),
    ("DELETE", "/api/jobs", {"GET", "HEAD", "POST"}),
    ("PATCH", "/api/jobs/1", {"GET", "HEAD", "DELETE"}),
    ("POST", "/api/jobs/1", {"GET", "HEAD", "DELETE"}),
    ("POST", "/api/jobs/1/progress", {"GET", "HEAD"}),
    ("PUT", "/api/jobs/clear-completed", {"POST"}),
])
def test_wrong_method_is_405_with_allow(api, method, path, allow):
    r = api.request(method, path)
    assert_error(r, 405)
    assert allow <= allowed(r), r.headers.get("allow")
    assert method not in allowed(r)


@pytest.mark.parametrize("path", ["/api/nope", "/api/jobs/1/nope", "/api", "/nope",
                                  "/nope.html", "/css/nope.css"])
def test_unknown_path_is_404_json(api, path):
    assert_error(api.get(path), 404)


def test_head_works_where_get_does(api):
    job_id = create(api, "fibonacci", {"count": 5})
    for path in ("/api/stats", "/api/job-types", "/api/jobs", f"/api/jobs/{job_id}", "/",
                 "/js/app.js"):
        get = api.get(path)
        head = api.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    for path in ("/api/job-types", "/"):  # stable bodies: same length announced
        assert api.head(path).headers["content-length"] == str(len(api.get(path).content))
    r = api.head("/api/jobs/999999")
    assert r.status_code == 404 and r.content == b""


# -- the four job types ------------------------------------------------------------------


def progress_of(feed: Feed, job_id: int) -> list[tuple[int, str]]:
    return [(m["data"]["percent"], m["data"]["message"])
            for m in feed.about(job_id) if m["type"] == "job_progress"]


async def test_job_types_progress_and_results(server):
    feed = await Feed.open(server.ws_url)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        specs = [
            ("countdown", "countdown", {"seconds": 2}),
            ("echo", "echo", {"message": "hi there", "delay": 2}),
            ("fibonacci", "fibonacci", {"count": 5}),
            ("prime", "prime", {"limit": 100}),
            ("prime10", "prime", {"limit": 10}),
        ]
        ids = {}
        for key, job_type, params in specs:
            r = await c.post("/api/jobs", json={"job_type": job_type, "params": params})
            assert r.status_code == 201, r.text
            ids[key] = r.json()["id"]
        for job_id in ids.values():
            await feed.wait_for(terminal_of(job_id), timeout=30)
        jobs = {key: (await c.get(f"/api/jobs/{job_id}")).json() for key, job_id in ids.items()}
    await feed.close()

    for key, job in jobs.items():
        assert job["status"] == "completed", job
        assert job["progress"] == {"percent": 100, "message": "Complete"}
        completed = [m["data"] for m in feed.about(ids[key]) if m["type"] == "job_completed"]
        assert len(completed) == 1
        assert completed[0]["result"] == job["result"]
        steps = progress_of(feed, ids[key])
        assert steps[-1] == (100, "Complete!"), (key, steps)
        percents = [p for p, _ in steps]
        assert percents == sorted(percents), (key, steps)
        assert all(type(p) is int and 0 <= p <= 100 for p in percents)

    assert [m for _, m in progress_of(feed, ids["countdown"])] == [
        "2 seconds remaining...", "1 second remaining...", "Complete!"]
    assert jobs["countdown"]["result"] == {"message": "Countdown complete!", "duration": 2}

    assert [m for _, m in progress_of(feed, ids["echo"])] == [
        "Echoing in 2 seconds...", "Echoing in 1 second...", "Complete!"]
    assert jobs["echo"]["result"] == {"message": "hi there", "echoed": "hi there", "delay": 2}

    assert [m for _, m in progress_of(feed, ids["fibonacci"])] == [
        "Calculated F(0) = 0", "Calculated F(1) = 1", "Calculated F(2) = 1",
        "Calculated F(3) = 2", "Calculated F(4) = 3", "Complete!"]
    assert jobs["fibonacci"]["result"] == {"message": "Calculated 5 Fibonacci numbers",
                                           "count": 5, "sequence": [0, 1, 1, 2, 3], "last": 3}

    prime_steps = progress_of(feed, ids["prime"])[:-1]
    assert len(prime_steps) >= 10, prime_steps  # every 5 percent
    for _, message in prime_steps:
        assert re.fullmatch(r"Checked \d+ numbers, found \d+ primes\.\.\.", message), message
    assert jobs["prime"]["result"] == {
        "message": "Found 25 prime numbers up to 100", "prime_count": 25, "largest": 97,
        "sample": [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]}
    # fewer than ten primes: the sample is not padded
    assert jobs["prime10"]["result"] == {
        "message": "Found 4 prime numbers up to 10", "prime_count": 4, "largest": 7,
        "sample": [2, 3, 5, 7]}


# -- concurrency, FIFO, cancel, a free event loop ------------------------------------------


async def test_concurrency_cap_and_fifo_order(server):
    feed = await Feed.open(server.ws_url)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        ids = []
        for _ in range(5):
            r = await c.post("/api/jobs", json={"job_type": "countdown",
                                                "params": {"seconds": 1}})
            ids.append(r.json()["id"])
        for job_id in ids:
            await feed.wait_for(terminal_of(job_id), timeout=30)
        stats = (await c.get("/api/stats")).json()
    await feed.close()

    running: set[int] = set()
    peak = 0
    started = []
    for m in feed.events():
        if m["type"] == "job_started":
            running.add(m["data"]["job_id"])
            started.append(m["data"]["job_id"])
        elif m["type"] in ("job_completed", "job_failed", "job_cancelled"):
            running.discard(m["data"]["job_id"])
        elif m["type"] == "worker_stats":
            assert m["data"]["active"] <= 3, m
            assert m["data"]["capacity"] == 3
        peak = max(peak, len(running))
    assert peak == 3, "the cap is 3 and five jobs were waiting: three must run at once"
    assert started == ids, "jobs start in creation order"
    assert stats["queue"]["completed"] == 5
    assert stats["worker"]["processed"] == 5


def test_concurrency_cap_seen_over_rest(client):
    ids = [create(client, "countdown", {"seconds": 1}) for _ in range(5)]
    seen_running = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = client.get("/api/stats").json()
        assert stats["queue"]["running"] <= 3, stats
        assert stats["worker"]["active"] <= 3, stats
        jobs = client.get("/api/jobs").json()
        running = [j["id"] for j in jobs if j["status"] == "running"]
        assert len(running) <= 3, jobs
        seen_running.add(len(running))
        # FIFO: a job runs or has run only if every older job has started too
        started = {j["id"] for j in jobs if j["status"] != "pending"}
        assert started == set(ids[: len(started)]), started
        if stats["queue"]["completed"] == 5:
            break
        time.sleep(0.05)
    assert stats["queue"]["completed"] == 5
    assert 3 in seen_running


async def test_cancel_pending_and_running_frees_the_slot_at_once(server):
    feed = await Feed.open(server.ws_url)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        ids = []
        for _ in range(5):
            r = await c.post("/api/jobs", json={"job_type": "countdown",
                                                "params": {"seconds": 30}})
            ids.append(r.json()["id"])
        j1, j2, j3, j4, j5 = ids
        for job_id in (j1, j2, j3):
            await feed.wait_for(lambda m, i=job_id: m.get("type") == "job_started"
                             and m["data"]["job_id"] == i)

        # a pending job leaves the queue and never starts
        r = await c.delete(f"/api/jobs/{j5}")
        assert r.json() == {"success": True, "job_id": j5}
        await feed.wait_for(terminal_of(j5))

        # a running job stops at once and the next one (j4) takes its slot
        r = await c.delete(f"/api/jobs/{j2}")
        assert r.status_code == 200 and r.json() == {"success": True, "job_id": j2}
        started = await feed.until(lambda m: m.get("type") == "job_started", timeout=5)
        assert started["data"]["job_id"] == j4
        await feed.drain(1.6)  # countdown reports every second: a live j2 would show
        cancelled_job = (await c.get(f"/api/jobs/{j2}")).json()
        started_job = (await c.get(f"/api/jobs/{j4}")).json()
        stats = (await c.get("/api/stats")).json()
    await feed.close()

    times = {(m["type"], m["data"].get("job_id")): t for t, m in feed.log if "data" in m}
    gap = times[("job_started", j4)] - times[("job_cancelled", j2)]
    assert 0 <= gap < 0.1, f"slot freed {gap * 1000:.0f} ms after job_cancelled"
    server_gap = started_job["started_at"] - cancelled_job["completed_at"]
    assert server_gap < 0.1, f"server started j4 {server_gap * 1000:.0f} ms after the cancel"

    about_j2 = feed.about(j2)
    assert about_j2[-1]["type"] == "job_cancelled", about_j2
    assert [m["type"] for m in about_j2].count("job_cancelled") == 1
    about_j5 = [m["type"] for m in feed.about(j5)]
    assert about_j5 == ["job_created", "job_cancelled"], about_j5
    assert cancelled_job["status"] == "cancelled"
    assert stats["queue"]["running"] == 3 and stats["queue"]["cancelled"] == 2
    assert stats["queue"]["pending"] == 0
    assert stats["worker"]["active"] == 3


def test_stats_fast_while_three_primes_run(client):
    samples: list[float] = []
    for _ in range(4):  # each round: three limit-100000 primes, measured while they run
        ids = [create(client, "prime", {"limit": 100000}) for _ in range(3)]
        while True:
            t0 = time.perf_counter()
            r = client.get("/api/stats")
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200
            queue = r.json()["queue"]
            if queue["running"] == 0 and queue["pending"] == 0:
                break
            if queue["running"] == 3:
                samples.append(elapsed)
        for job_id in ids:
            job = wait_status(client, job_id, FINISHED)
            assert job["status"] == "completed"
            assert job["result"]["prime_count"] == 9592
            assert job["result"]["largest"] == 99991
        if len(samples) >= 10:
            break
    assert len(samples) >= 5, f"only {len(samples)} requests answered while 3 primes ran"
    slow = [round(s * 1000) for s in samples if s >= 0.1]
    assert not slow, f"GET /api/stats took {slow} ms while three primes ran"
