"""GET /api/jobs/{id}/progress (PROTOCOL.md, "Server-Sent Events") through httpx-sse
against a real server: headers, `status` first, `progress` events, one terminal event
and the end of the response, ids, Last-Event-ID, 404, HEAD, any Accept header."""

from __future__ import annotations

import json
import textwrap
import time

import httpx
import pytest
from httpx_sse import EventSource, ServerSentEvent, connect_sse

STATUS_KEYS = {"id", "type", "status", "progress", "started_at"}

FAILING_JOBS = textwrap.dedent('''
    """A job type that fails on purpose, for the `failed` terminal event."""
    from rawjobs import Param, job_type


    @job_type("boom", description="Fails after a moment",
              params=[Param("after", float, default=0.3, min=0, max=5)])
    async def boom(ctx):
        await ctx.progress(10, "about to fail")
        await ctx.sleep(ctx.params["after"])
        raise RuntimeError("boom: on purpose")
''')


@pytest.fixture(scope="module")
def shared(start_module_server):
    """One default server for the checks that need no fresh state."""
    return start_module_server("--grace", "0")


@pytest.fixture
def api(shared):
    with httpx.Client(base_url=shared.url, timeout=10) as c:
        yield c


def create(c: httpx.Client, job_type: str, params: dict) -> int:
    r = c.post("/api/jobs", json={"job_type": job_type, "params": params})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_status(c: httpx.Client, job_id: int, statuses: set[str], timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def real_events(source: EventSource):
    """The events a browser would dispatch: a block without data (the ``retry:``
    field alone) dispatches nothing (WHATWG HTML, "dispatch the event", step 2)."""
    for sse in source.iter_sse():
        if sse.data != "":
            yield sse


def read_stream(c: httpx.Client, job_id: int, timeout: float = 20, on_event=None,
                headers: dict | None = None) -> tuple[httpx.Response, list[ServerSentEvent]]:
    """Follow a job's stream to its end (failing after ``timeout`` s); returns the
    response and its events. ``on_event(sse)`` runs as each event arrives."""
    events: list[ServerSentEvent] = []
    deadline = time.monotonic() + timeout
    with connect_sse(c, "GET", f"/api/jobs/{job_id}/progress", headers=headers or {}) as source:
        for sse in real_events(source):
            events.append(sse)
            if on_event is not None:
                on_event(sse)
            assert time.monotonic() < deadline, [e.event for e in events]
        return source.response, events


def data(sse: ServerSentEvent) -> dict:
    return json.loads(sse.data)


# -- a live stream, start to end ------------------------------------------------------------


def test_live_stream_headers_status_progress_complete_end(client):
    # three jobs fill the slots, so ours is seen while pending, then starting
    for _ in range(3):
        create(client, "countdown", {"seconds": 1})
    job_id = create(client, "countdown", {"seconds": 1})
    response, events = read_stream(client, job_id)
    ended = time.monotonic()

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-length" not in response.headers

    names = [e.event for e in events]
    assert names[0] == "status"
    status = data(events[0])
    assert set(status) == STATUS_KEYS
    assert (status["id"], status["type"], status["status"]) == (job_id, "countdown", "pending")
    assert status["progress"] == {"percent": 0, "message": "Queued"}
    assert status["started_at"] is None

    assert names[1:] == ["progress"] * (len(names) - 2) + ["complete"], names
    steps = [data(e) for e in events[1:-1]]
    for step in steps:
        assert set(step) == {"percent", "message"}
    assert steps == [{"percent": 0, "message": "Starting..."},
                     {"percent": 0, "message": "1 second remaining..."},
                     {"percent": 100, "message": "Complete!"}]

    complete = data(events[-1])
    assert set(complete) == {"status", "result", "duration"}
    assert complete["status"] == "completed"
    assert complete["result"] == {"message": "Countdown complete!", "duration": 1}
    assert isinstance(complete["duration"], (int, float)) and 0.9 <= complete["duration"] < 10

    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "completed"
    assert time.monotonic() - ended < 5


def test_every_event_has_an_id_increasing_and_a_retry_field(client):
    job_id = create(client, "fibonacci", {"count": 5})
    with client.stream("GET", f"/api/jobs/{job_id}/progress") as r:
        assert r.status_code == 200
        raw = r.read().decode("utf-8")
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    assert any(line.startswith("retry:") for b in blocks for line in b.split("\n"))
    ids, names = [], []
    for block in blocks:
        fields = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, value[1:] if value.startswith(" ") else value)
        if "data" not in fields:
            continue
        assert "id" in fields, f"event without id: {block!r}"
        assert fields["id"].isdigit(), block
        ids.append(int(fields["id"]))
        names.append(fields.get("event"))
    assert names[0] == "status" and names[-1] == "complete", names
    assert names.count("progress") >= 5  # F(1)..F(4) at least (F(0) may predate us), Complete!
    assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"


# -- terminal events ------------------------------------------------------------------------


def test_failed_terminal_event_live_and_replayed(start_server, tmp_path):
    # the server runs in tmp_path and imports job types from modules found there
    (tmp_path / "sse_failing_jobs.py").write_text(FAILING_JOBS)
    server = start_server("--jobs", "sse_failing_jobs", "--grace", "0", cwd=tmp_path)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        job_id = create(c, "boom", {"after": 0.5})
        _, events = read_stream(c, job_id)
        names = [e.event for e in events]
        assert names[0] == "status" and names[-1] == "failed", names
        assert set(names[1:-1]) <= {"progress"}, names
        failed = data(events[-1])
        assert set(failed) == {"status", "error"}
        assert failed["status"] == "failed"
        assert isinstance(failed["error"], str) and "on purpose" in failed["error"]
        assert c.get(f"/api/jobs/{job_id}").json()["status"] == "failed"

        _, events = read_stream(c, job_id, timeout=5)
        assert [e.event for e in events] == ["status", "failed"]
        assert data(events[0])["status"] == "failed"
        assert data(events[1]) == failed


def test_cancelled_terminal_event_live(client, server):
    job_id = create(client, "countdown", {"seconds": 30})
    with httpx.Client(base_url=server.url, timeout=10) as other:
        def cancel_after_status(sse: ServerSentEvent) -> None:
            if sse.event == "status":
                assert other.delete(f"/api/jobs/{job_id}").status_code == 200

        _, events = read_stream(client, job_id, timeout=10, on_event=cancel_after_status)
    names = [e.event for e in events]
    assert names[0] == "status" and names[-1] == "cancelled", names
    assert set(names[1:-1]) <= {"progress"}
    assert data(events[-1]) == {"status": "cancelled", "job_id": job_id}


def test_finished_jobs_get_status_terminal_and_end_at_once(client):
    done = create(client, "fibonacci", {"count": 5})
    wait_status(client, done, {"completed"})
    for _ in range(3):
        create(client, "countdown", {"seconds": 30})
    dropped = create(client, "countdown", {"seconds": 30})  # pending: slots are full
    assert client.delete(f"/api/jobs/{dropped}").status_code == 200

    started = time.monotonic()
    _, events = read_stream(client, done, timeout=5)
    assert [e.event for e in events] == ["status", "complete"]
    status = data(events[0])
    assert set(status) == STATUS_KEYS
    assert status["status"] == "completed"
    assert status["progress"] == {"percent": 100, "message": "Complete"}
    assert isinstance(status["started_at"], float)
    complete = data(events[1])
    assert set(complete) == {"status", "result", "duration"}
    assert complete["status"] == "completed"
    assert complete["result"]["sequence"] == [0, 1, 1, 2, 3]

    _, events = read_stream(client, dropped, timeout=5)
    assert [e.event for e in events] == ["status", "cancelled"]
    assert data(events[0])["status"] == "cancelled"
    assert data(events[1]) == {"status": "cancelled", "job_id": dropped}
    assert time.monotonic() - started < 5


# -- Last-Event-ID, 404, HEAD, Accept -----------------------------------------------------------


def test_last_event_id_at_or_after_the_terminal_event_is_204(client):
    job_id = create(client, "fibonacci", {"count": 5})
    _, live = read_stream(client, job_id)
    terminal_id = int(live[-1].id)
    assert live[-1].event == "complete"

    for last in (terminal_id, terminal_id + 1, terminal_id + 1000):
        r = client.get(f"/api/jobs/{job_id}/progress", headers={"Last-Event-ID": str(last)})
        assert r.status_code == 204, (last, r.status_code)
        assert r.content == b""

    # a reconnect that had not seen the end gets the status and the end
    response, events = read_stream(client, job_id, timeout=5,
                                   headers={"Last-Event-ID": str(int(live[0].id))})
    assert response.status_code == 200
    assert [e.event for e in events] == ["status", "complete"]

    # a job still running: Last-Event-ID never cuts it short
    running = create(client, "countdown", {"seconds": 30})
    with client.stream("GET", f"/api/jobs/{running}/progress",
                       headers={"Last-Event-ID": str(terminal_id + 1000)}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")


def test_unknown_job_is_404_json(api):
    client = api
    for headers in ({}, {"Accept": "text/event-stream"}):
        r = client.get("/api/jobs/999999/progress", headers=headers)
        assert r.status_code == 404
        assert r.headers["content-type"].split(";")[0] == "application/json"
        assert r.json()["error"] == "Job not found: 999999"
    r = client.head("/api/jobs/999999/progress")
    assert r.status_code == 404 and r.content == b""


def test_head_answers_the_headers_of_a_200_and_no_body(api):
    client = api
    job_id = create(client, "countdown", {"seconds": 30})
    r = client.head(f"/api/jobs/{job_id}/progress")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache"
    assert r.content == b""
    # the connection is still good for the next request
    assert client.get("/api/stats").status_code == 200


@pytest.mark.parametrize("accept", ["application/json", "text/html", "*/*", "text/plain",
                                    None])
def test_served_whatever_the_accept_header_says(api, accept):
    client = api
    job_id = create(client, "fibonacci", {"count": 5})
    headers = {} if accept is None else {"Accept": accept}
    request = client.build_request("GET", f"/api/jobs/{job_id}/progress", headers=headers)
    if accept is None:
        del request.headers["accept"]
    response = client.send(request, stream=True)
    try:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        names = [e.event for e in real_events(EventSource(response))]
    finally:
        response.close()
    assert names[0] == "status" and names[-1] == "complete", names
