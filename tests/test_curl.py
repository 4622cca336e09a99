"""The three curl commands of PROTOCOL.md ("Curl, as a user types it"), run through the
real `curl` binary by a shell exactly as written there; only the port (5001) and the
created job's id (1) are substituted."""

from __future__ import annotations

import json
import shutil
import subprocess

# Verbatim from PROTOCOL.md, "Curl, as a user types it".
PROTOCOL_CURL = r"""
curl -X POST http://localhost:5001/api/jobs -H "Content-Type: application/json" \
     -d '{"job_type":"countdown","params":{"seconds":5}}'
curl -N http://localhost:5001/api/jobs/1/progress -H "Accept: text/event-stream"
curl http://localhost:5001/api/stats
""".strip()


def commands() -> list[str]:
    """The three commands, one string each (the first spans two lines)."""
    out: list[str] = []
    for line in PROTOCOL_CURL.splitlines():
        if out and out[-1].endswith("\\"):
            out[-1] += "\n" + line
        else:
            out.append(line)
    assert len(out) == 3 and all(c.startswith("curl ") for c in out)
    return out


def substitute(command: str, port: int, job_id: int | None = None) -> str:
    assert command.count("localhost:5001") == 1
    command = command.replace("localhost:5001", f"localhost:{port}")
    if job_id is not None:
        assert command.count("/api/jobs/1/") == 1
        command = command.replace("/api/jobs/1/", f"/api/jobs/{job_id}/")
    return command


def shell(command: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``command`` as a user's shell would."""
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                          timeout=timeout)


def sse_events(text: str) -> list[tuple[str | None, str | None, dict]]:
    """``(id, event, data)`` for every event block of an SSE body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            events.append((fields.get("id"), fields.get("event"), json.loads(fields["data"])))
    return events


def test_the_three_curl_commands_of_the_protocol(server):
    assert shutil.which("curl"), "the curl binary is needed"
    create, follow, stats = commands()

    result = shell(substitute(create, server.port))
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["type"] == "countdown"
    assert job["params"] == {"seconds": 5}
    assert job["status"] == "pending"
    assert isinstance(job["id"], int) and job["id"] >= 1
    assert isinstance(job["created_at"], float)

    result = shell(substitute(follow, server.port, job["id"]))
    assert result.returncode == 0, result.stderr  # the server ended the stream cleanly
    events = sse_events(result.stdout)
    names = [name for _, name, _ in events]
    assert names[0] == "status", result.stdout
    assert events[0][2]["id"] == job["id"]
    assert names[-1] == "complete", result.stdout
    assert set(names[1:-1]) == {"progress"}, names
    assert all(event_id is not None and event_id.isdigit() for event_id, _, _ in events)
    messages = [data["message"] for _, name, data in events if name == "progress"]
    expected = ["Starting...", "5 seconds remaining...", "4 seconds remaining...",
                "3 seconds remaining...", "2 seconds remaining...", "1 second remaining...",
                "Complete!"]
    # the first ones may predate curl's connection (the status event shows the latest)
    assert messages == expected[len(expected) - len(messages):], messages
    assert len(messages) >= 5
    complete = events[-1][2]
    assert complete["status"] == "completed"
    assert complete["result"] == {"message": "Countdown complete!", "duration": 5}
    assert 4 <= complete["duration"] < 15

    result = shell(substitute(stats, server.port))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["queue"] == {"pending": 0, "running": 0, "completed": 1, "failed": 0,
                             "cancelled": 0, "total": 1}
    assert body["worker"] == {"active": 0, "capacity": 3, "processed": 1, "is_running": True}
