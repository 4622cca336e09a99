"""The server starts, answers, and runs a job end to end."""

import time


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
