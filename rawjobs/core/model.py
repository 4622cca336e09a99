"""The job record and its statuses (PROTOCOL.md, "Job object")."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from typing import Any

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})

QUEUED_PROGRESS = {"percent": 0, "message": "Queued"}
STARTING_PROGRESS = {"percent": 0, "message": "Starting..."}
FINAL_PROGRESS_EVENT = {"percent": 100, "message": "Complete!"}
COMPLETED_PROGRESS = {"percent": 100, "message": "Complete"}


@dataclass(frozen=True)
class JobOptions:
    """Per-job controls (issue 4), validated by the job-type registry.

    ``priority``: higher runs first; ``run_at``: Unix seconds of the earliest start or
    None; ``timeout``: seconds per run or None; ``max_attempts``: runs allowed, >= 1;
    ``idempotency_key``: client-chosen string or None.
    """

    priority: int = 0
    run_at: float | None = None
    timeout: float | None = None
    max_attempts: int = 1
    idempotency_key: str | None = None


@dataclass
class Job:
    """One job as stored. ``to_dict`` gives the wire shape of PROTOCOL.md.

    Times are Unix seconds (float). ``interruptions`` counts runs lost to a crash
    (not to a graceful shutdown); it is internal and not on the wire.
    """

    id: int
    type: str
    params: dict[str, Any]
    status: str = PENDING
    progress: dict[str, Any] = field(default_factory=lambda: dict(QUEUED_PROGRESS))
    result: Any = None
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    priority: int = 0
    run_at: float | None = None
    timeout: float | None = None
    max_attempts: int = 1
    idempotency_key: str | None = None
    fingerprint: str | None = None
    retry_of: int | None = None
    terminal_seq: int | None = None
    interruptions: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def copy(self) -> Job:
        """A copy whose ``params`` and ``progress`` dicts are its own. Built by
        ``__init__`` from every field read at once: ``dataclasses.replace`` and
        ``copy.copy`` are slower, and going through ``__dict__`` would make every job
        carry a separate dictionary (one more object for the garbage collector, and
        slower attribute reads)."""
        job = Job(*_field_values(self))
        job.params = dict(job.params)
        job.progress = dict(job.progress)
        return job

    def to_dict(self) -> dict[str, Any]:
        """The job object of PROTOCOL.md plus its [+] fields."""
        return {
            "id": self.id,
            "type": self.type,
            "params": self.params,
            "status": self.status,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "attempts": self.attempts,
            "priority": self.priority,
            "run_at": self.run_at,
            "timeout": self.timeout,
            "max_attempts": self.max_attempts,
            "retry_of": self.retry_of,
        }

    def options(self) -> JobOptions:
        return JobOptions(
            priority=self.priority,
            run_at=self.run_at,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            idempotency_key=self.idempotency_key,
        )


_field_values = operator.attrgetter(*(f.name for f in fields(Job)))
"""Every field of a job, in ``__init__`` order."""
