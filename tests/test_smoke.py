"""The server starts, answers, and runs a job end to end."""

import json
import subprocess
import sys
import time

import pytest


def test_stats_and_a_job(client):
    r = client.get("/api/stats")
    assert r.status_code == 200
    assert r.json()["worker"] == {"active": 0, "capacity": 3, "processed": 0, "is_running": True}
    r = client.post("/api/jobs", json={"job_type": "echo", "params": {"message": "hi", "delay": 1}})
    assert r.status_code == 201
    job_id = r.json()["id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] == "completed":
            break
        time.sleep(0.1)
    assert job["status"] == "completed"
    assert job["result"] == {"message": "hi", "echoed": "hi", "delay": 1}


def test_on_uvloop(start_server):
    """``--loop uvloop``: the same job end to end, its progress over SSE, and the
    /ws/queue feed, on uvloop's event loop."""
    import httpx
    from httpx_sse import connect_sse
    from websockets.sync.client import connect

    server = start_server("--loop", "uvloop")
    with connect(f"ws://127.0.0.1:{server.port}/ws/queue") as ws, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        assert json.loads(ws.recv(timeout=5))["type"] == "queue_state"
        job_id = client.post("/api/jobs", json={"job_type": "countdown",
                                                "params": {"seconds": 1}}).json()["id"]
        with connect_sse(client, "GET", f"/api/jobs/{job_id}/progress") as source:
            events = [sse.event for sse in source.iter_sse() if sse.data]
        assert events[0] == "status" and events[-1] == "complete"
        seen = set()
        while "job_completed" not in seen:
            seen.add(json.loads(ws.recv(timeout=5))["type"])
    assert "Traceback" not in server.log()


def test_uvloop_missing_is_a_clear_error(tmp_path):
    """Without uvloop installed, ``--loop uvloop`` exits 2 with a hint."""
    import subprocess
    import sys

    blocker = tmp_path / "uvloop.py"
    blocker.write_text("raise ImportError('no uvloop here')\n")
    result = subprocess.run([sys.executable, "-m", "rawjobs", "--loop", "uvloop"],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert "pip install 'rawjobs[uvloop]'" in result.stderr


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--fanout-threads", "x", "not a whole number: 'x'"),
    ("--fanout-threads", "-1", "must be 0 or more"),
    ("--concurrency", "1.5", "not a whole number: '1.5'"),
    ("--fanout-slice", "0", "must be 1 or more"),
])
def test_bad_option_values_are_clear_errors(option, value, message):
    """A bad count on the command line exits 2 and names the option and the problem."""
    result = subprocess.run([sys.executable, "-m", "rawjobs", option, value],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"argument {option}: {message}" in result.stderr
