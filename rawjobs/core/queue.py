"""The job queue: the only code that changes a job's state (DESIGN.md, core/queue).

Every transition (created, started, progress, retrying, completed, failed, cancelled,
cleared) is decided here, written to the store and published as one event. A running
job's record lives in memory (``_live``) while it runs, so transitions on it are
decided synchronously on the event loop: a job cancelled in its last instant stays
cancelled, and nothing is published about a job after its terminal event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .errors import Conflict, NotFound, QueueFull
from .events import EventHub
from .jobs import Registry, validate_options
from .model import (
    CANCELLED,
    COMPLETED,
    COMPLETED_PROGRESS,
    FAILED,
    FINAL_PROGRESS_EVENT,
    PENDING,
    QUEUED_PROGRESS,
    RUNNING,
    STATUSES,
    Job,
)
from .store.base import Store, empty_counts

log = logging.getLogger("rawjobs.queue")

RETRYABLE = (FAILED, CANCELLED)
_strict_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
"""What every client will parse: strict JSON (no NaN or Infinity, no cycles)."""
TERMINAL_EVENTS = frozenset({"job_completed", "job_failed", "job_cancelled"})
ENDING_FIELDS = ("status", "progress", "result", "error", "completed_at", "terminal_seq")
"""What ending a job running here may change since its claim was written: the write
at the end of a run saves these alone."""
TERMINAL_MEMORY = 10_000


def safe_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates) escaped, so a
    handler's message or error can always be sent to clients."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class JobQueue:
    """Jobs, their transitions and their events.

    ``keep_finished``: finished jobs kept (oldest pruned first); ``max_pending``: jobs
    waiting before ``create`` raises QueueFull; ``snapshot_size``: newest jobs in a
    ``queue_state`` snapshot; ``progress_interval``: seconds between progress writes
    to the store per running job; ``retry_backoff``: seconds before the first retry
    (doubled per attempt, up to ``retry_backoff_max``, with jitter).
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        hub: EventHub,
        *,
        keep_finished: int = 10_000,
        max_pending: int = 100_000,
        snapshot_size: int = 100,
        max_interruptions: int = 3,
        progress_interval: float = 0.5,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.hub = hub
        self.keep_finished = keep_finished
        self.max_pending = max_pending
        self.snapshot_size = snapshot_size
        self.max_interruptions = max_interruptions
        self.progress_interval = progress_interval
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.on_work: Callable[[], None] = lambda: None
        self.on_cancel: Callable[[int], None] = lambda job_id: None
        self._live: dict[int, Job] = {}
        self._recent: OrderedDict[int, Job] = OrderedDict()
        self._counts = empty_counts()
        self._pruning = 0
        self._prune_due = 0
        self._pruner = False
        self._progress_saved: dict[int, float] = {}
        self._progress_timers: dict[int, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.shared = store.shared
        self.forward: Callable[[str, dict[str, Any]], None] | None = None
        self._terminal_seqs: OrderedDict[int, int] = OrderedDict()

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, continue the seq, recover jobs a crash left running."""
        await self.store.open()
        await self.hub.start()
        if not self.shared:  # several nodes: the cluster reaps expired leases instead
            await self.apply_recovered(await self.store.recover(self.max_interruptions))
        self._counts = await self.store.stats()
        for job in reversed(await self.store.list(limit=self.snapshot_size)):
            self._recent[job.id] = job

    async def apply_recovered(self, jobs: list[Job]) -> None:
        """Publish what crash recovery (or lease reaping) did to ``jobs``."""
        for job in jobs:
            log.warning("job %s was interrupted: now %s", job.id, job.status)
            if job.status == FAILED:
                job.terminal_seq = self._publish(
                    "job_failed", {"job_id": job.id, "error": job.error}).seq
                await self.store.save(job)
            else:
                self._publish("job_retrying", {"job_id": job.id, "attempt": job.attempts,
                                               "error": "interrupted", "run_at": job.run_at})
        if jobs:
            self.on_work()

    async def release_running(self) -> None:
        """Shutdown: put every job still running here back to pending, not counting
        it as an interruption, and cancel its execution."""
        for job_id in list(self._live):
            job = self._live.pop(job_id)
            self._drop_progress_timer(job_id)
            job.status, job.progress, job.started_at = PENDING, dict(QUEUED_PROGRESS), None
            self._move(RUNNING, PENDING)
            self.on_cancel(job_id)
            await (self.store.finish(job) if self.shared else self.store.save(job))

    async def close(self) -> None:
        """Wait for background writes, then close the store."""
        for handle in self._progress_timers.values():
            handle.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()

    # -- queries ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``{"pending", "running", "completed", "failed", "cancelled", "total"}``
        as this node knows them (exact for a single node)."""
        out = dict(self._counts)
        out["total"] = sum(self._counts[s] for s in STATUSES)
        return out

    async def current_stats(self) -> dict[str, int]:
        """Like ``stats``, but from the database when several nodes share it."""
        if self.shared:
            self._counts = await self.store.stats()
        return self.stats()

    def terminal_seq(self, job: Job) -> int | None:
        """The seq of the job's terminal event, if known (stored, or seen here)."""
        if job.terminal_seq is not None:
            return job.terminal_seq
        return self._terminal_seqs.get(job.id)

    async def get(self, job_id: int) -> Job:
        """The job (its live state while running). Raises NotFound."""
        live = self._live.get(job_id)
        if live is not None:
            return live
        job = await self.store.get(job_id)
        if job is None:
            raise NotFound(f"Job not found: {job_id}", job_id=job_id)
        return job

    async def list(self, status=None, type_=None, limit=100, before=None) -> list[Job]:
        """Newest first; running jobs show their live progress."""
        jobs = await self.store.list(status=status, type_=type_, limit=limit, before=before)
        return [self._live.get(job.id, job) for job in jobs]

    async def snapshot(self) -> dict[str, Any]:
        """``{"jobs": [job...] newest first, "stats": {...}, "seq": n}``; ``seq`` is the
        newest event reflected in it. For a single node it is built without awaiting
        anything, so no event can slip between; with several nodes it is read from
        the database first."""
        if self.shared:
            recent = await self.store.list(limit=self.snapshot_size)
            jobs = {job.id: job for job in recent}
            stats = await self.current_stats()
        else:
            jobs = dict(self._recent)
            stats = self.stats()
        jobs.update(self._live)
        ordered = [jobs[i].to_dict() for i in sorted(jobs, reverse=True)]
        return {"jobs": ordered, "stats": stats, "seq": self.hub.seq}

    # -- client commands ------------------------------------------------------------

    async def create(
        self,
        job_type: Any,
        params: Any = None,
        options: dict[str, Any] | None = None,
        *,
        retry_of: int | None = None,
    ) -> tuple[Job, bool]:
        """Validate and store a new job, then publish ``job_created``.

        Returns ``(job, True)``, or ``(existing, False)`` for a repeated idempotency
        key with the same request. Raises ValidationError (400), Conflict (409: the key
        was used with a different request) or QueueFull (429).
        """
        options = options or {}
        jt = self.registry.require(job_type)
        normalised = jt.validate_params(params)
        opts = validate_options(options, jt)
        # What makes two requests "the same" for an idempotency key: the normalised
        # params and options (defaults filled), and the delay or run_at as sent.
        fingerprint = None if opts.idempotency_key is None else json.dumps(
            [jt.name, normalised, opts.priority, opts.timeout, opts.max_attempts,
             options.get("delay"), options.get("run_at")], sort_keys=True, default=str,
        )
        if self._counts[PENDING] >= self.max_pending:
            raise QueueFull(f"Too many pending jobs (limit {self.max_pending})", retry_after=5)
        job = Job(
            id=0, type=jt.name, params=normalised, created_at=time.time(),
            priority=opts.priority, run_at=opts.run_at, timeout=opts.timeout,
            max_attempts=opts.max_attempts, idempotency_key=opts.idempotency_key,
            fingerprint=fingerprint, retry_of=retry_of,
        )
        stored, created = await self.store.add(job)
        if not created:
            if stored.fingerprint != fingerprint:
                raise Conflict(
                    "Idempotency key already used with a different request", job_id=stored.id
                )
            return self._live.get(stored.id, stored), False
        self._counts[PENDING] += 1
        self._remember(stored)
        self._publish("job_created", stored.to_dict())
        self.on_work()
        return stored, True

    async def retry(self, job_id: int) -> Job:
        """A new job with the type, params and options of a failed or cancelled one;
        its ``retry_of`` names the original, which is left as it was. Raises NotFound,
        Conflict (job not failed or cancelled) or what ``create`` raises."""
        original = await self.get(job_id)
        if original.status not in RETRYABLE:
            raise Conflict(f"Cannot retry job in status: {original.status}", job_id=job_id)
        options = {"priority": original.priority, "timeout": original.timeout,
                   "max_attempts": original.max_attempts}
        job, _ = await self.create(original.type, original.params, options, retry_of=job_id)
        return job

    async def cancel(self, job_id: int) -> Job:
        """Cancel a pending or running job; a running one stops at once. Raises
        NotFound, or Conflict for a finished job."""
        live = self._live.get(job_id)
        if live is not None:
            return await self._cancel_live(live)
        job, cancelled = await self.store.cancel_pending(job_id, time.time())
        if job is None:
            raise NotFound(f"Job not found: {job_id}", job_id=job_id)
        if cancelled:
            self._move(PENDING, CANCELLED)
            self._finish(job, "job_cancelled", {"job_id": job_id})
            await self.store.save(job)
            return job
        live = self._live.get(job_id)
        if live is not None:  # claimed while we asked the store
            return await self._cancel_live(live)
        if job.status == RUNNING:  # running on another node
            cancelled_job = await self.store.cancel_running(job_id, time.time())
            if cancelled_job is not None:
                self._move(RUNNING, CANCELLED)
                self._finish(cancelled_job, "job_cancelled", {"job_id": job_id})
                return cancelled_job
            job = await self.store.get(job_id) or job
        raise Conflict(f"Cannot cancel job in status: {job.status}", job_id=job_id)

    async def clear_finished(self) -> int:
        """Delete every finished job; publishes ``jobs_cleared``. Returns the count."""
        gone = await self.store.clear_finished()
        self._forget(gone)
        self._publish("jobs_cleared", {"count": len(gone)})
        return len(gone)

    # -- worker side ------------------------------------------------------------------

    async def claim(self, limit: int = 1) -> list[Job]:
        """Take up to ``limit`` runnable jobs and mark them running here; the worker
        calls ``started`` for each as it launches it."""
        jobs = await self.store.claim_many(time.time(), limit)
        live, recent = self._live, self._recent
        for job in jobs:
            live[job.id] = job
            if job.id in recent:
                recent[job.id] = job
        self._counts[PENDING] -= len(jobs)
        self._counts[RUNNING] += len(jobs)
        return jobs

    def started(self, job: Job) -> None:
        """Publish ``job_started`` for a job just claimed."""
        self._publish("job_started", {"job_id": job.id, "started_at": job.started_at})

    async def next_run_at(self) -> float | None:
        return await self.store.next_run_at()

    def is_live(self, job_id: int) -> bool:
        """True while the job runs here and has not reached a terminal state."""
        return job_id in self._live

    def progress(self, job_id: int, percent: int, message: str) -> None:
        """Record and publish a running job's progress; ignored once it has finished."""
        live = self._live.get(job_id)
        if live is None:
            return
        message = safe_text(message)
        live.progress = {"percent": percent, "message": message}
        self._publish("job_progress", {"job_id": job_id, "percent": percent,
                                          "message": message})
        self._schedule_progress_save(job_id)

    async def complete(self, job_id: int, result: Any) -> None:
        """Finish a running job with ``result`` (JSON-serialisable): publishes the
        final progress event, then ``job_completed``."""
        live = self._live.get(job_id)
        if live is None:
            return
        try:  # what every client will parse: strict JSON, valid UTF-8
            _strict_json(result).encode("utf-8")
        except (TypeError, ValueError):
            await self.fail(job_id, "Job result is not valid JSON (NaN, Infinity, lone "
                            "surrogates and non-JSON types are not allowed)", retry=False)
            return
        self._publish("job_progress", {"job_id": job_id, **FINAL_PROGRESS_EVENT})
        live.status, live.result, live.progress = COMPLETED, result, dict(COMPLETED_PROGRESS)
        live.error = None  # an earlier attempt's error no longer applies
        live.completed_at = time.time()
        duration = round(live.completed_at - (live.started_at or live.completed_at), 3)
        await self._end_live(live, "job_completed",
                             {"job_id": job_id, "result": result, "duration": duration})

    async def fail(self, job_id: int, error: str, *, retry: bool = True) -> None:
        """A run of a running job failed. While ``attempts < max_attempts`` the job
        waits for a retry (``job_retrying``); else it fails (``job_failed``)."""
        live = self._live.get(job_id)
        if live is None:
            return
        live.error = safe_text(error)
        if retry and live.attempts < live.max_attempts:
            await self._schedule_retry(live)
            return
        live.status, live.completed_at = FAILED, time.time()
        await self._end_live(live, "job_failed", {"job_id": job_id, "error": error})

    # -- internals --------------------------------------------------------------------

    async def _schedule_retry(self, live: Job) -> None:
        self._take_live(live.id)
        backoff = min(self.retry_backoff_max, self.retry_backoff * 2 ** (live.attempts - 1))
        live.run_at = time.time() + backoff * random.uniform(0.5, 1.0)
        live.status, live.progress = PENDING, {"percent": 0, "message": "Waiting to retry"}
        if self.shared and not await self.store.finish(live):
            return  # cancelled by another node meanwhile
        self._move(RUNNING, PENDING)
        self._publish("job_retrying", {"job_id": live.id, "attempt": live.attempts,
                                       "error": live.error, "run_at": live.run_at})
        if not self.shared:
            await self.store.save(live)
        self.on_work()

    async def _cancel_live(self, live: Job) -> Job:
        live.status, live.completed_at = CANCELLED, time.time()
        self.on_cancel(live.id)
        await self._end_live(live, "job_cancelled", {"job_id": live.id})
        return live

    async def _end_live(self, live: Job, event_type: str, data: dict[str, Any]) -> None:
        """End a job running here. One node: publish, then write (the write carries
        the terminal seq). Several nodes: write only if the job is still ours, then
        publish, so a job cancelled elsewhere meanwhile gets no second ending."""
        self._take_live(live.id)
        if self.shared and not await self.store.finish(live):
            return
        self._move(RUNNING, live.status)
        self._finish(live, event_type, data)
        if not self.shared:
            await self.store.save(live, ENDING_FIELDS)

    def _take_live(self, job_id: int) -> None:
        self._live.pop(job_id, None)
        self._drop_progress_timer(job_id)
        self._progress_saved.pop(job_id, None)

    def _finish(self, job: Job, event_type: str, data: dict[str, Any]) -> None:
        """Publish a terminal event, remember its seq (for SSE ``Last-Event-ID``),
        and prune finished jobs beyond ``keep_finished``."""
        job.terminal_seq = self._publish(event_type, data).seq
        if job.id in self._recent:
            self._recent[job.id] = job
        if self.shared:  # the cluster prunes by the database's count
            return
        counts = self._counts
        finished = counts[COMPLETED] + counts[FAILED] + counts[CANCELLED]
        excess = finished - self._pruning - self.keep_finished
        if excess > 0:
            self._pruning += excess
            self._prune_due += excess
            if not self._pruner:
                self._pruner = True
                self._spawn(self._prune())

    async def _prune(self) -> None:
        """Prune what finishing jobs asked for: one store call for all the jobs that
        finished meanwhile, not one per job (a busy queue finishes hundreds at once)."""
        try:
            while self._prune_due:
                count, self._prune_due = self._prune_due, 0
                try:
                    self._forget(await self.store.prune_finished(count))
                finally:
                    self._pruning -= count
        finally:
            self._pruner = False

    def _forget(self, gone: list[tuple[int, str]]) -> None:
        for job_id, status in gone:
            self._counts[status] -= 1
            self._recent.pop(job_id, None)

    def _publish(self, type_: str, data: dict[str, Any]) -> Any:
        """Publish here and, with several nodes, forward to the others."""
        event = self.hub.publish(type_, data)
        if type_ in TERMINAL_EVENTS:
            self._note_terminal(data["job_id"], event.seq)
        if self.forward is not None:
            self.forward(type_, data)
        return event

    def _note_terminal(self, job_id: int, seq: int) -> None:
        self._terminal_seqs[job_id] = seq
        while len(self._terminal_seqs) > TERMINAL_MEMORY:
            self._terminal_seqs.popitem(last=False)

    def apply_remote(self, type_: str, data: dict[str, Any]) -> None:
        """An event from another node: publish it here, unless it is about a job
        whose terminal event was already published here. A ``job_cancelled`` for a
        job running here stops it (the canceller wrote the cancellation)."""
        job_id = data.get("job_id")
        if job_id is not None and job_id in self._terminal_seqs:
            return
        if type_ == "job_cancelled" and job_id in self._live:
            self._take_live(job_id)
            self.on_cancel(job_id)
        event = self.hub.publish(type_, data)
        if type_ in TERMINAL_EVENTS:
            self._note_terminal(job_id, event.seq)
        if type_ in ("job_created", "job_retrying"):
            self.on_work()

    def live_ids(self) -> list[int]:
        return list(self._live)

    def drop_live(self, job_ids: set[int]) -> None:
        """Stop running jobs this node no longer holds (lease lost): no write and no
        event, as another node now owns their fate."""
        for job_id in job_ids & set(self._live):
            log.warning("job %s: lease lost, stopping it here", job_id)
            self._take_live(job_id)
            self.on_cancel(job_id)

    def _move(self, old: str, new: str) -> None:
        self._counts[old] -= 1
        self._counts[new] += 1

    def _remember(self, job: Job) -> None:
        self._recent[job.id] = job
        while len(self._recent) > self.snapshot_size:
            self._recent.popitem(last=False)

    def _schedule_progress_save(self, job_id: int) -> None:
        if job_id in self._progress_timers:
            return
        now = time.monotonic()
        wait = self._progress_saved.get(job_id, 0.0) + self.progress_interval - now
        if wait <= 0:
            self._save_progress(job_id)
        else:
            loop = asyncio.get_running_loop()
            self._progress_timers[job_id] = loop.call_later(wait, self._save_progress, job_id)

    def _save_progress(self, job_id: int) -> None:
        self._progress_timers.pop(job_id, None)
        live = self._live.get(job_id)
        if live is None:
            return
        self._progress_saved[job_id] = time.monotonic()
        self._spawn(self.store.save_progress(job_id, dict(live.progress)))

    def _drop_progress_timer(self, job_id: int) -> None:
        handle = self._progress_timers.pop(job_id, None)
        if handle is not None:
            handle.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background store write failed", exc_info=task.exception())
