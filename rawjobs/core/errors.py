"""Errors the core raises for a client's request. The api layer maps each to an
HTTP status (and a WebSocket ``error`` message); none of them means a bug."""

from __future__ import annotations


class JobError(Exception):
    """Base: ``message`` is a sentence safe to show the client."""

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class ValidationError(JobError, ValueError):
    """Bad job type, params or options (HTTP 400). ``param`` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, **({"param": param} if param else {}))
        self.param = param


class NotFound(JobError):
    """No job with that id (HTTP 404)."""


class Conflict(JobError):
    """The job's state forbids the request, or an idempotency key is reused with a
    different request (HTTP 409)."""


class QueueFull(JobError):
    """Too many jobs waiting (HTTP 429). ``retry_after`` is in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
