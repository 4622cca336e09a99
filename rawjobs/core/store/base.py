"""The store interface every backend implements in full (issue 3).

The queue and the worker use only this interface. A store is the source of truth
for jobs; ``add`` returns once the job is durable (for durable backends), so an
acknowledged job survives the process dying the next instant.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Collection
from typing import Any

from ..model import FAILED, PENDING, QUEUED_PROGRESS, STATUSES, Job


class Store(abc.ABC):
    """Where jobs live. All methods are coroutines; none blocks the event loop."""

    durable: bool = False
    shared: bool = False
    """True when several nodes share the store (PostgreSQL): transitions of running
    jobs are then written conditionally (``finish``) before they are published."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Prepare the backend (create schema, open files). Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush everything and release resources. Idempotent."""

    @abc.abstractmethod
    async def add(self, job: Job) -> tuple[Job, bool]:
        """Store a new job, assigning ``job.id`` (increasing, never reused).

        If ``job.idempotency_key`` names a job that still exists, nothing is added
        and ``(existing, False)`` is returned; else ``(stored, True)``.
        """

    @abc.abstractmethod
    async def get(self, job_id: int) -> Job | None:
        """The job with that id, or None."""

    @abc.abstractmethod
    async def list(
        self,
        status: str | None = None,
        type_: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[Job]:
        """Jobs newest first (by id), filtered by status and type, with id < before."""

    @abc.abstractmethod
    async def claim(self, now: float) -> Job | None:
        """Atomically take the next runnable pending job and mark it running.

        Order: highest ``priority`` first, then lowest id (FIFO); a job with
        ``run_at`` later than ``now`` (Unix seconds) is not runnable. The returned job
        has status running, ``attempts`` + 1, ``started_at = now``, ``run_at`` None and
        the "Starting..." progress.
        """

    async def claim_many(self, now: float, limit: int) -> list[Job]:
        """Claim up to ``limit`` jobs at once, in ``claim`` order. Backends override
        this to do it in one round trip."""
        jobs = []
        while len(jobs) < limit:
            job = await self.claim(now)
            if job is None:
                break
            jobs.append(job)
        return jobs

    @abc.abstractmethod
    async def next_run_at(self) -> float | None:
        """The earliest ``run_at`` among pending jobs that are not yet runnable."""

    @abc.abstractmethod
    async def save(self, job: Job, changed: Collection[str] | None = None) -> None:
        """Write an existing job (a transition decided by the queue): every field, or,
        when ``changed`` names fields, at least those (the caller vouches that the
        others are as last written, so a backend may skip them)."""

    @abc.abstractmethod
    async def finish(self, job: Job) -> bool:
        """Write the transition of a job this node runs (completed, failed, waiting
        for a retry, back to pending). False, with nothing written, when the job is no
        longer running here (cancelled by another node, or its lease lost)."""

    @abc.abstractmethod
    async def cancel_running(self, job_id: int, now: float) -> Job | None:
        """Mark a running job cancelled wherever it runs; None if it is not running.
        Its node stops it when the ``job_cancelled`` event reaches it."""

    @abc.abstractmethod
    async def save_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        """Record a running job's latest progress ``{"percent", "message"}``."""

    @abc.abstractmethod
    async def cancel_pending(self, job_id: int, now: float) -> tuple[Job | None, bool]:
        """Cancel the job if it is pending: ``(job after, True)``; else
        ``(job as it is, False)``, or ``(None, False)`` when there is no such job."""

    @abc.abstractmethod
    async def clear_finished(self) -> list[tuple[int, str]]:
        """Delete every finished job; returns ``(id, status)`` of each one deleted."""

    @abc.abstractmethod
    async def prune_finished(self, count: int) -> list[tuple[int, str]]:
        """Delete the ``count`` finished jobs that finished first (by completion time,
        then id); returns ``(id, status)`` of each one deleted."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]:
        """Counts by status: ``{"pending", "running", "completed", "failed",
        "cancelled"}``."""

    @abc.abstractmethod
    async def recover(self, max_interruptions: int) -> list[Job]:
        """After a crash: every job still marked running goes back to pending with
        ``interruptions`` + 1, or to failed with error "interrupted" once it reaches
        ``max_interruptions``. Returns the jobs changed."""

    @abc.abstractmethod
    async def reserve_seq(self, count: int, at_least: int) -> int:
        """Reserve ``count`` event sequence numbers: returns ``first`` >= ``at_least``
        and >= every number reserved before, and records ``first + count`` durably."""


class SharedStore(Store):
    """A store several nodes share: leases, heartbeats and an event channel."""

    shared = True
    node_id: str
    lease_seconds: float

    @abc.abstractmethod
    async def heartbeat(self, stats: dict[str, Any], running: list[int]) -> set[int]:
        """Record this node alive with worker ``stats`` (active, capacity, processed)
        and renew the leases of its ``running`` jobs; returns the ids still held."""

    @abc.abstractmethod
    async def reap(self, max_interruptions: int) -> list[Job]:
        """Jobs whose lease expired go back to pending (or fail "interrupted")."""

    @abc.abstractmethod
    async def nodes(self, max_age: float) -> list[dict[str, Any]]:
        """Nodes seen in the last ``max_age`` seconds."""

    @abc.abstractmethod
    async def forget_node(self) -> None:
        """Remove this node from the nodes list (clean shutdown)."""

    @abc.abstractmethod
    async def finished_count(self) -> int:
        """How many finished jobs are stored."""

    @abc.abstractmethod
    async def notify(self, payloads: list[str]) -> None:
        """Send ``payloads``, in order, to every listening node."""

    @abc.abstractmethod
    async def listen(self, callback: Callable[[str], None]) -> Any:
        """Start listening; ``callback(payload)`` per notification. Returns a handle
        with ``close()`` and ``add_termination_listener``."""


JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(Job))
"""A stored job's columns, in order: the fields of ``Job`` (``id`` first)."""
JSON_COLUMNS = ("params", "progress", "result")
"""The columns stored as JSON text."""


def empty_counts() -> dict[str, int]:
    return {status: 0 for status in STATUSES}


def interrupt_job(job: Job, max_interruptions: int, now: float) -> None:
    """A run lost to a crash: back to pending, or failed once it happened too often."""
    job.interruptions += 1
    if job.interruptions >= max_interruptions:
        job.status = FAILED
        job.error = "interrupted"
        job.completed_at = now
    else:
        job.status = PENDING
        job.progress = dict(QUEUED_PROGRESS)
        job.run_at = None
