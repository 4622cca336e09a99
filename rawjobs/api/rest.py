"""The REST endpoints of PROTOCOL.md: turn requests into queue calls, and results and
core errors into JSON responses."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from ..core.errors import JobError
from ..core.jobs import Registry
from ..core.model import STATUSES
from ..core.queue import JobQueue
from ..core.worker import Worker
from ..web.http import Request, Response, error_response, json_response
from ..web.routing import Route, route
from .common import BadJSON, job_error_response, job_options, parse_job_id, parse_json_object

MAX_LIMIT = 1000


def _list_query(request: Request) -> dict[str, Any] | Response:
    """The filters of ``GET /api/jobs``, or a 400 response."""
    status = request.query_value("status")
    if status is not None and status not in STATUSES:
        return error_response(400, f"Unknown status: {status}", param="status")
    limit_text = request.query_value("limit")
    limit = 100
    if limit_text is not None:
        if not re.fullmatch(r"[0-9]{1,4}", limit_text) or not 1 <= int(limit_text) <= MAX_LIMIT:
            return error_response(400, f"limit must be an integer from 1 to {MAX_LIMIT}",
                                  param="limit")
        limit = int(limit_text)
    before_text = request.query_value("before")
    before = None
    if before_text is not None:
        before = parse_job_id(before_text)
        if before is None:
            return error_response(400, "before must be a positive integer job id",
                                  param="before")
    return {"status": status, "type_": request.query_value("type") or None,
            "limit": limit, "before": before}


def read_create_request(request: Request) -> tuple[dict[str, Any], dict[str, Any]] | Response:
    """The JSON body and the job options of a create request (``POST /api/jobs``):
    ``(body, options)``, or the 415 (not ``application/json``) or 400 (not one JSON
    object) response to send instead."""
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return error_response(415, "Content-Type must be application/json")
    try:
        body = parse_json_object(request.body)
    except BadJSON as exc:
        return error_response(400, str(exc))
    return body, job_options(body, request.header("idempotency-key"))


class RestAPI:
    """Handlers for ``/api/stats``, ``/api/job-types`` and ``/api/jobs...``."""

    def __init__(self, queue: JobQueue, worker: Worker, registry: Registry) -> None:
        self.queue = queue
        self.worker = worker
        self.registry = registry

    def routes(self) -> list[Route]:
        return [
            route("GET", "/api/stats", self.stats),
            route("GET", "/api/job-types", self.job_types),
            route("GET", "/api/jobs", self.list_jobs),
            route("POST", "/api/jobs", self.create_job),
            route("POST", "/api/jobs/clear-completed", self.clear_completed),
            route("GET", "/api/jobs/{id}", self.get_job),
            route("DELETE", "/api/jobs/{id}", self.cancel_job),
            route("POST", "/api/jobs/{id}/retry", self.retry_job),
        ]

    async def stats(self, request: Request) -> Response:
        return json_response({"queue": await self.queue.current_stats(),
                              "worker": self.worker.stats()})

    async def job_types(self, request: Request) -> Response:
        return json_response(self.registry.schemas())

    async def list_jobs(self, request: Request) -> Response:
        query = _list_query(request)
        if isinstance(query, Response):
            return query
        jobs = await self.queue.list(**{**query, "limit": query["limit"] + 1})
        more = len(jobs) > query["limit"]
        jobs = jobs[: query["limit"]]
        headers = []
        if more and jobs:
            params = {k: v for k, v in (("status", query["status"]), ("type", query["type_"]))
                      if v is not None}
            params.update(limit=query["limit"], before=jobs[-1].id)
            headers.append(("Link", f'</api/jobs?{urlencode(params)}>; rel="next"'))
        return json_response([job.to_dict() for job in jobs], headers=headers)

    async def create_job(self, request: Request) -> Response:
        read = read_create_request(request)
        if isinstance(read, Response):
            return read
        body, options = read
        try:
            job, created = await self.queue.create(body.get("job_type"), body.get("params"),
                                                   options)
        except JobError as exc:
            return job_error_response(exc)
        return json_response(job.to_dict(), status=201 if created else 200,
                             headers=[("Location", f"/api/jobs/{job.id}")])

    async def _on_job(self, request: Request,
                      action: Callable[[int], Awaitable[Response]]) -> Response:
        """Run ``action(job_id)`` for the ``{id}`` of the path: 400 for an id that is
        not a positive integer, core errors mapped to their status."""
        job_id = parse_job_id(request.path_params["id"])
        if job_id is None:
            return error_response(400, f"Invalid job id: {request.path_params['id']}")
        try:
            return await action(job_id)
        except JobError as exc:
            return job_error_response(exc)

    async def get_job(self, request: Request) -> Response:
        async def action(job_id: int) -> Response:
            return json_response((await self.queue.get(job_id)).to_dict())

        return await self._on_job(request, action)

    async def cancel_job(self, request: Request) -> Response:
        async def action(job_id: int) -> Response:
            await self.queue.cancel(job_id)
            return json_response({"success": True, "job_id": job_id})

        return await self._on_job(request, action)

    async def retry_job(self, request: Request) -> Response:
        async def action(job_id: int) -> Response:
            job = await self.queue.retry(job_id)
            return json_response(job.to_dict(), status=201,
                                 headers=[("Location", f"/api/jobs/{job.id}")])

        return await self._on_job(request, action)

    async def clear_completed(self, request: Request) -> Response:
        return json_response({"cleared": await self.queue.clear_finished()})
