"""In-memory store (``--db :memory:``): fast, forgets everything at exit."""

from __future__ import annotations

import heapq
import time
from collections.abc import Collection
from typing import Any

from ..model import (
    CANCELLED,
    FINISHED,
    PENDING,
    RUNNING,
    STARTING_PROGRESS,
    Job,
)
from .base import Store, empty_counts, interrupt_job

_OWN_DICTS = frozenset({"params", "progress"})
"""Fields whose dict a stored job keeps a copy of (as ``Job.copy`` does)."""


class MemoryStore(Store):
    """Jobs in a dict; a heap of runnable jobs ``(-priority, id)`` and a heap of
    delayed ones ``(run_at, id)``; stale heap entries are skipped when popped."""

    durable = False

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._last_id = 0
        self._ready: list[tuple[int, int]] = []
        self._delayed: list[tuple[float, int]] = []
        self._finished: list[tuple[float, int]] = []  # heap of (completed_at, id)
        self._keys: dict[str, int] = {}
        self._seq_high = 1

    def _note_finished(self, job: Job) -> None:
        heapq.heappush(self._finished, (job.completed_at or 0.0, job.id))

    async def open(self) -> None:
        """Nothing to open: the jobs live in this object."""

    async def close(self) -> None:
        """Nothing to flush."""

    def _enqueue(self, job: Job) -> None:
        if job.run_at is not None:
            heapq.heappush(self._delayed, (job.run_at, job.id))
        else:
            heapq.heappush(self._ready, (-job.priority, job.id))

    async def add(self, job: Job) -> tuple[Job, bool]:
        key = job.idempotency_key
        if key is not None and key in self._keys:
            return self._jobs[self._keys[key]].copy(), False
        self._last_id += 1
        job = job.copy()
        job.id = self._last_id
        self._jobs[job.id] = job
        if key is not None:
            self._keys[key] = job.id
        if job.status == PENDING:
            self._enqueue(job)
        return job.copy(), True

    async def get(self, job_id: int) -> Job | None:
        job = self._jobs.get(job_id)
        return job.copy() if job else None

    async def list(self, status=None, type_=None, limit=100, before=None) -> list[Job]:
        out: list[Job] = []
        ids = sorted(self._jobs, reverse=True)
        for job_id in ids:
            if before is not None and job_id >= before:
                continue
            job = self._jobs[job_id]
            if (status and job.status != status) or (type_ and job.type != type_):
                continue
            out.append(job.copy())
            if len(out) >= limit:
                break
        return out

    def _promote_due(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            run_at, job_id = heapq.heappop(self._delayed)
            job = self._jobs.get(job_id)
            if job and job.status == PENDING and job.run_at == run_at:
                heapq.heappush(self._ready, (-job.priority, job_id))

    async def claim(self, now: float) -> Job | None:
        return self._claim_one(now)

    async def claim_many(self, now: float, limit: int) -> list[Job]:
        jobs = []
        while len(jobs) < limit:
            job = self._claim_one(now)
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _claim_one(self, now: float) -> Job | None:
        self._promote_due(now)
        while self._ready:
            neg_priority, job_id = heapq.heappop(self._ready)
            job = self._jobs.get(job_id)
            if job is None or job.status != PENDING or job.priority != -neg_priority:
                continue
            if job.run_at is not None and job.run_at > now:
                continue  # re-delayed after it was queued; its delayed entry remains
            job.status = RUNNING
            job.attempts += 1
            job.started_at = now
            job.run_at = None
            job.progress = dict(STARTING_PROGRESS)
            return job.copy()
        return None

    async def next_run_at(self) -> float | None:
        while self._delayed:
            run_at, job_id = self._delayed[0]
            job = self._jobs.get(job_id)
            if job and job.status == PENDING and job.run_at == run_at:
                return run_at
            heapq.heappop(self._delayed)
        return None

    async def save(self, job: Job, changed: Collection[str] | None = None) -> None:
        current = self._jobs.get(job.id)
        if current is None:
            return
        was_status, was_due = current.status, (current.run_at, current.priority)
        stored = self._store_fields(current, job, changed)
        if stored.status in FINISHED and was_status not in FINISHED:
            self._note_finished(job)
        if stored.status == PENDING and (
            was_status != PENDING or was_due != (stored.run_at, stored.priority)
        ):
            self._enqueue(stored)

    def _store_fields(self, current: Job, job: Job, changed: Collection[str] | None) -> Job:
        """Make the stored record hold ``job``'s fields (only ``changed`` ones, if
        named); returns the record."""
        if changed is None:
            stored = self._jobs[job.id] = job.copy()
            return stored
        for name in changed:
            value = getattr(job, name)
            setattr(current, name, dict(value) if name in _OWN_DICTS else value)
        return current

    async def finish(self, job: Job) -> bool:
        current = self._jobs.get(job.id)
        if current is None or current.status != RUNNING:
            return False
        await self.save(job)
        return True

    async def cancel_running(self, job_id: int, now: float) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.status != RUNNING:
            return None
        job.status, job.completed_at = CANCELLED, now
        self._note_finished(job)
        return job.copy()

    async def save_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.status == RUNNING:
            job.progress = dict(progress)

    async def cancel_pending(self, job_id: int, now: float) -> tuple[Job | None, bool]:
        job = self._jobs.get(job_id)
        if job is None:
            return None, False
        if job.status != PENDING:
            return job.copy(), False
        job.status = CANCELLED
        job.completed_at = now
        self._note_finished(job)
        return job.copy(), True

    def _delete(self, job_id: int, gone: list[tuple[int, str]]) -> None:
        job = self._jobs.pop(job_id)
        gone.append((job_id, job.status))
        if job.idempotency_key is not None:
            self._keys.pop(job.idempotency_key, None)

    async def clear_finished(self) -> list[tuple[int, str]]:
        gone: list[tuple[int, str]] = []
        for job_id in [i for i, j in self._jobs.items() if j.status in FINISHED]:
            self._delete(job_id, gone)
        self._finished.clear()
        return gone

    async def prune_finished(self, count: int) -> list[tuple[int, str]]:
        gone: list[tuple[int, str]] = []
        while len(gone) < count and self._finished:
            completed_at, job_id = heapq.heappop(self._finished)
            job = self._jobs.get(job_id)
            if job is not None and job.finished and job.completed_at == completed_at:
                self._delete(job_id, gone)
        return gone

    async def stats(self) -> dict[str, int]:
        counts = empty_counts()
        for job in self._jobs.values():
            counts[job.status] += 1
        return counts

    async def recover(self, max_interruptions: int) -> list[Job]:
        changed = []
        for job in self._jobs.values():
            if job.status == RUNNING:
                interrupt_job(job, max_interruptions, time.time())
                if job.status == PENDING:
                    self._enqueue(job)
                else:
                    self._note_finished(job)
                changed.append(job.copy())
        return changed

    async def reserve_seq(self, count: int, at_least: int) -> int:
        first = max(self._seq_high, at_least)
        self._seq_high = first + count
        return first
