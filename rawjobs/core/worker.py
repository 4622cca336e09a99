"""The worker: runs at most ``concurrency`` jobs at once (DESIGN.md, core/worker).

It is woken by new work (and by a timer for the earliest delayed job), never by a
polling loop. A cancelled job's task is cancelled at once; a job's exception never
escapes (its text is the job's error, its traceback goes to the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from .events import EventHub
from .jobs import JobContext, JobType, Registry
from .model import Job
from .procpool import ProcessPool
from .queue import JobQueue

log = logging.getLogger("rawjobs.worker")


class Worker:
    """Claims jobs from ``queue`` and runs their handlers: ``async`` job types on the
    event loop, ``process`` job types in ``pool``."""

    def __init__(
        self,
        queue: JobQueue,
        registry: Registry,
        hub: EventHub,
        pool: ProcessPool,
        concurrency: int = 3,
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.hub = hub
        self.pool = pool
        self.capacity = concurrency
        self.processed = 0
        self.nodes: list[dict[str, Any]] | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        queue.on_work = self.wake
        queue.on_cancel = self._cancel_task

    def stats(self) -> dict[str, Any]:
        """``{"active", "capacity", "processed", "is_running"}`` (PROTOCOL.md), plus
        ``nodes: [{id, active, capacity, processed, last_seen}]`` with several nodes."""
        stats: dict[str, Any] = {
            "active": len(self._tasks),
            "capacity": self.capacity,
            "processed": self.processed,
            "is_running": self._loop_task is not None and not self._stopping,
        }
        if self.nodes is not None:  # several nodes: each one's last heartbeat
            stats["nodes"] = self.nodes
        return stats

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="worker")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Claim nothing more; wait up to ``grace`` seconds for running jobs to end.
        Jobs still running then are left to ``JobQueue.release_running``."""
        self._stopping = True
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        await self.wait_idle(grace)

    async def wait_idle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the running jobs' tasks to end."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._fill()
                timeout = await self._idle_timeout()
            except Exception:
                log.exception("claiming a job failed; retrying in 1 s")
                timeout = 1.0
            if self._stopping:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _fill(self) -> None:
        """Claim and launch jobs until every slot is taken or none is runnable. A
        claim that returns fewer jobs than asked means none was left at that moment;
        work added since has set ``_wake``, so the loop comes back for it."""
        while not self._stopping:
            free = self.capacity - len(self._tasks)
            if free <= 0:
                return
            jobs = await self.queue.claim(free)
            for job in jobs:
                self._launch(job)
            if len(jobs) < free:
                return

    async def _idle_timeout(self) -> float | None:
        """Seconds until the earliest delayed job is due (None: wait for a wake-up)."""
        if len(self._tasks) >= self.capacity:
            return None
        run_at = await self.queue.next_run_at()
        return None if run_at is None else max(0.0, run_at - time.time()) + 0.001

    def _launch(self, job: Job) -> None:
        self.queue.started(job)
        task = asyncio.get_running_loop().create_task(self._run_job(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        self.hub.publish("worker_stats", self.stats())

    def _cancel_task(self, job_id: int) -> None:
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            # A task cancelled before its first step never runs its body, so its
            # ``finally`` neither: its done callback frees the slot then.
            task.add_done_callback(lambda done, job_id=job_id: self._task_done(job_id, done))

    def _task_done(self, job_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_id) is task:  # the body did not run to its ``finally``
            self._finished(job_id)

    def _finished(self, job_id: int) -> None:
        self._tasks.pop(job_id, None)
        self.processed += 1
        self.hub.publish("worker_stats", self.stats())
        self.wake()

    async def _run_job(self, job: Job) -> None:
        """Run the job's handler and report how it ended; then free the slot (in
        this task's last step, rather than a done callback one loop turn later)."""
        try:
            try:
                result = await self._call_handler(job)
            except asyncio.CancelledError:
                if self.queue.is_live(job.id):  # not a job cancel: the worker is stopping
                    raise
                return
            except TimeoutError:
                await self.queue.fail(job.id, "timeout")
            except Exception as exc:
                log.exception("job %s (%s) failed", job.id, job.type)
                await self.queue.fail(job.id, str(exc) or type(exc).__name__)
            else:
                await self.queue.complete(job.id, result)
        finally:
            self._finished(job.id)

    def _call_handler(self, job: Job) -> Awaitable[Any]:
        """The handler's run, to be awaited: on the loop or in the process pool, within
        the job's timeout if it has one."""
        jt = self.registry.get(job.type)
        if jt is None:
            raise LookupError(f"Unknown job type: {job.type}")
        run = self._start_handler(jt, job)
        return run if job.timeout is None else _within(job.timeout, run)

    def _start_handler(self, jt: JobType, job: Job) -> Awaitable[Any]:
        """The handler's run, to be awaited: on the loop, or in the process pool."""
        def report(percent: int, message: str) -> None:
            self.queue.progress(job.id, percent, message)

        if jt.executor == "process":
            return self.pool.run(jt.handler, job.id, job.params, job.attempts, report)
        return jt.handler(JobContext(job.id, job.params, job.attempts, report))


async def _within(seconds: float, run: Awaitable[Any]) -> Any:
    """Await ``run``; TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await run
