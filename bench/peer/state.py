"""The peer's jobs, event hub and worker: the conventional design, in memory.

Every event is put on one ``asyncio.Queue`` per subscriber; the subscriber's writer
encodes it (``json.dumps``) and sends it. Event order per job matches rawjobs:
``job_created``, ``job_started``, ``worker_stats``, ``job_progress``...,
``job_progress`` 100 "Complete!", ``job_completed``, ``worker_stats``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

try:
    from bench import benchjob
except ImportError:  # bench/ itself on sys.path
    import benchjob  # type: ignore[no-redef]

TERMINAL = ("complete", "failed", "cancelled")
STATUSES = ("pending", "running", "completed", "failed", "cancelled")
PARAMS = {"events": (int, 5), "interval": ((int, float), 0.0), "gate": (str, "")}


class JobError(ValueError):
    """A request for an unknown job type or with bad params."""


def validate(job_type: Any, params: Any) -> dict[str, Any]:
    if job_type != benchjob.NAME:
        raise JobError(f"Unknown job type: {job_type}")
    if not isinstance(params, dict) or set(params) - set(PARAMS):
        raise JobError("Bad params")
    out = {}
    for name, (kind, default) in PARAMS.items():
        value = params.get(name, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise JobError(f"Parameter '{name}' has the wrong type")
        out[name] = value
    return out


@dataclass
class Job:
    id: int
    type: str
    params: dict[str, Any]
    status: str = "pending"
    progress: dict[str, Any] = field(default_factory=lambda: {"percent": 0,
                                                              "message": "Queued"})
    result: Any = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "params": self.params,
                "status": self.status, "progress": self.progress, "result": self.result,
                "error": None, "created_at": self.created_at,
                "started_at": self.started_at, "completed_at": self.completed_at}

    def status_data(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "status": self.status,
                "progress": self.progress, "started_at": self.started_at}


def sse_event(type_: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A broadcast event as ``(SSE event name, data)``, or None if streams skip it."""
    if type_ == "job_started":
        return "progress", {"percent": 0, "message": "Starting..."}
    if type_ == "job_progress":
        return "progress", {"percent": data["percent"], "message": data["message"]}
    if type_ == "job_completed":
        return "complete", {"status": "completed", "result": data["result"],
                            "duration": data["duration"]}
    return None


class Hub:
    """``subscribers``: one queue per /ws/queue client; ``followers``: per job id,
    one queue per SSE stream."""

    def __init__(self) -> None:
        self.seq = 0
        self.subscribers: set[asyncio.Queue] = set()
        self.followers: dict[int, set[asyncio.Queue]] = {}

    def follow(self, job_id: int, queue: asyncio.Queue) -> None:
        self.followers.setdefault(job_id, set()).add(queue)

    def unfollow(self, job_id: int, queue: asyncio.Queue) -> None:
        self.followers.get(job_id, set()).discard(queue)

    def publish(self, type_: str, data: dict[str, Any]) -> None:
        self.seq += 1
        event = {"type": type_, "data": data, "seq": self.seq}
        for queue in self.subscribers:
            queue.put_nowait(event)
        followers = self.followers.get(data.get("job_id"))
        converted = sse_event(type_, data) if followers else None
        if converted is not None:
            for queue in followers:
                queue.put_nowait((*converted, self.seq))


class Runner:
    """Jobs in a dict, a pending queue and ``concurrency`` worker tasks."""

    def __init__(self, concurrency: int = 10) -> None:
        self.concurrency = concurrency
        self.hub = Hub()
        self.jobs: dict[int, Job] = {}
        self.counts = dict.fromkeys(STATUSES, 0)
        self.active = 0
        self.processed = 0
        self._pending: asyncio.Queue[Job] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def worker_stats(self) -> dict[str, Any]:
        return {"active": self.active, "capacity": self.concurrency,
                "processed": self.processed, "is_running": True}

    def stats(self) -> dict[str, Any]:
        queue = dict(self.counts, total=sum(self.counts.values()))
        return {"queue": queue, "worker": self.worker_stats()}

    def queue_state(self) -> dict[str, Any]:
        newest = sorted(self.jobs, reverse=True)[:100]
        return {"type": "queue_state", "jobs": [self.jobs[i].to_dict() for i in newest],
                "stats": self.stats()["queue"], "worker": self.worker_stats(),
                "job_types": [{"name": benchjob.NAME, "description": benchjob.DESCRIPTION,
                               "params": []}], "seq": self.hub.seq}

    def create(self, job_type: Any, params: Any) -> Job:
        job = Job(id=len(self.jobs) + 1, type=benchjob.NAME,
                  params=validate(job_type, params))
        self.jobs[job.id] = job
        self.counts["pending"] += 1
        self.hub.publish("job_created", job.to_dict())
        self._pending.put_nowait(job)
        return job

    def _move(self, job: Job, status: str) -> None:
        self.counts[job.status] -= 1
        self.counts[status] += 1
        job.status = status

    async def _work(self) -> None:
        while True:
            job = await self._pending.get()
            self.active += 1
            self._move(job, "running")
            job.started_at = time.time()
            job.progress = {"percent": 0, "message": "Starting..."}
            self.hub.publish("job_started", {"job_id": job.id, "started_at": job.started_at})
            self.hub.publish("worker_stats", self.worker_stats())
            await self._run(job)
            self.active -= 1
            self.processed += 1
            self.hub.publish("worker_stats", self.worker_stats())

    async def _run(self, job: Job) -> None:
        async def progress(percent: int, message: str) -> None:
            job.progress = {"percent": percent, "message": message}
            self.hub.publish("job_progress", {"job_id": job.id, "percent": percent,
                                              "message": message})

        result = await benchjob.run(job.params, progress, asyncio.sleep)
        await progress(100, "Complete!")
        job.result, job.completed_at = result, time.time()
        job.progress = {"percent": 100, "message": "Complete"}
        self._move(job, "completed")
        duration = round(job.completed_at - (job.started_at or job.completed_at), 3)
        self.hub.publish("job_completed", {"job_id": job.id, "result": result,
                                           "duration": duration})
