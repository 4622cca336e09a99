"""``GET /api/jobs/{id}/progress``: one job's progress as Server-Sent Events
(PROTOCOL.md, "Server-Sent Events").

One hub subscription serves every stream: each job event is encoded once per
framing and written to every stream following that job (DESIGN.md, "Fan-out").
Events: ``status`` first, ``progress`` per update, then one terminal event
(``complete``, ``failed`` or ``cancelled``) and the end of the response. ``id:`` is
the event's ``seq``; a reconnect whose ``Last-Event-ID`` is at or past the terminal
event gets 204, which stops a browser's EventSource.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..core.errors import JobError
from ..core.events import RESYNC, Event, EventHub
from ..core.model import CANCELLED, COMPLETED, FAILED, Job
from ..core.queue import JobQueue
from ..web.fanout import Fanout, SocketWriter
from ..web.http import Request, Response, error_response
from ..web.sse import (
    SSE_HEADERS,
    SSEStream,
    SSESubscriber,
    encode_comment,
    encode_event,
    encode_retry,
    frame,
)
from .common import job_error_response, parse_job_id

TERMINAL_EVENTS = {"job_completed": "complete", "job_failed": "failed",
                   "job_cancelled": "cancelled"}
_KEEPALIVE = encode_comment("keepalive")


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def status_data(job: Job) -> dict[str, Any]:
    return {"id": job.id, "type": job.type, "status": job.status,
            "progress": job.progress, "started_at": job.started_at}


def terminal_data(job: Job) -> tuple[str, dict[str, Any]]:
    """The terminal SSE event of a finished job: ``(name, data)``."""
    if job.status == COMPLETED:
        duration = round((job.completed_at or 0) - (job.started_at or job.completed_at or 0), 3)
        return "complete", {"status": COMPLETED, "result": job.result, "duration": duration}
    if job.status == FAILED:
        return "failed", {"status": FAILED, "error": job.error}
    return "cancelled", {"status": CANCELLED, "job_id": job.id}


def _sse_event(event: Event) -> tuple[str, dict[str, Any]] | None:
    """A core event as ``(SSE event name, data)``, or None if streams skip it."""
    data = event.data
    if event.type == "job_started":
        return "progress", {"percent": 0, "message": "Starting..."}
    if event.type == "job_progress":
        return "progress", {"percent": data["percent"], "message": data["message"]}
    if event.type == "job_retrying":
        return "retrying", data
    if event.type == "job_completed":
        return "complete", {"status": COMPLETED, "result": data["result"],
                            "duration": data["duration"]}
    if event.type == "job_failed":
        return "failed", {"status": FAILED, "error": data["error"]}
    if event.type == "job_cancelled":
        return "cancelled", {"status": CANCELLED, "job_id": data["job_id"]}
    return None


class ProgressStreams:
    """The SSE endpoint and its per-job fan-outs. ``keepalive``: seconds between
    ``: keepalive`` comments; ``retry_ms``: the reconnection delay sent to clients;
    ``max_buffer``: bytes a stream may lag before it is ended; ``slice_size``:
    streams written to before yielding, ``writer``: who writes them (see
    rawjobs.web.fanout)."""

    def __init__(self, queue: JobQueue, hub: EventHub, max_buffer: int,
                 keepalive: float = 15.0, retry_ms: int = 3000, slice_size: int = 256,
                 writer: SocketWriter | None = None) -> None:
        self.queue = queue
        self.slice_size = slice_size
        self.writer = writer
        self.hub = hub
        self.max_buffer = max_buffer
        self.keepalive = keepalive
        self.retry = encode_retry(retry_ms)
        self._channels: dict[int, Fanout] = {}
        self._ticker: asyncio.TimerHandle | None = None
        hub.subscribe(self._on_event)

    # -- the endpoint ---------------------------------------------------------------

    async def handle(self, request: Request) -> Response | SSEStream:
        job_id = parse_job_id(request.path_params["id"])
        if job_id is None:
            return error_response(400, f"Invalid job id: {request.path_params['id']}")
        try:
            job = await self.queue.get(job_id)
        except JobError as exc:
            return job_error_response(exc)
        last_id = parse_job_id(request.header("last-event-id") or "")
        if job.finished and last_id is not None:
            terminal = self.queue.terminal_seq(job)
            if terminal is None or last_id >= terminal:
                return Response(status=204)
        if request.method == "HEAD":
            return Response(status=200, headers=SSE_HEADERS[1:], content_type=SSE_HEADERS[0][1],
                             known_length=False)
        return SSEStream(lambda sub: self._open(job, sub), lambda sub: self._close(job_id, sub))

    async def _open(self, job: Job, sub: SSESubscriber) -> None:
        """Send ``status`` and follow the job; a job that finished meanwhile gets its
        terminal event from the store (whichever of the two comes first wins)."""
        sub.send(self.retry + encode_event(_dumps(status_data(job)), "status", self.hub.seq))
        if job.finished:
            self._replay_terminal(job, sub)
            return
        channel = self._channels.get(job.id)
        if channel is None:
            channel = self._channels[job.id] = Fanout(self.max_buffer, self.slice_size,
                                                        writer=self.writer)
        channel.add(sub)
        self._start_keepalive()
        try:
            fresh = await self.queue.get(job.id)
        except JobError:
            sub.end()
            return
        if fresh.finished and not sub.ended:
            self._replay_terminal(fresh, sub)

    def _replay_terminal(self, job: Job, sub: SSESubscriber) -> None:
        name, data = terminal_data(job)
        sub.send(encode_event(_dumps(data), name, self.queue.terminal_seq(job) or self.hub.seq))
        sub.end()

    def _close(self, job_id: int, sub: SSESubscriber) -> None:
        channel = self._channels.get(job_id)
        if channel is not None:
            channel.discard(sub)
            if not len(channel):
                del self._channels[job_id]

    # -- fan-out ------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.type == RESYNC:  # events may have been missed: clients reconnect
            self.end_all()
            return
        job_id = event.data.get("job_id")
        channel = self._channels.get(job_id) if job_id is not None else None
        if channel is None:
            return
        converted = _sse_event(event)
        if converted is None:
            return
        payload = encode_event(_dumps(converted[1]), converted[0], event.seq)
        channel.broadcast(lambda framing: frame(payload, framing))
        if event.type in TERMINAL_EVENTS:
            del self._channels[job_id]
            channel.after(lambda: [sub.end() for sub in channel.subscribers()])

    def _start_keepalive(self) -> None:
        if self._ticker is None:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.keepalive, self._send_keepalive)

    def _send_keepalive(self) -> None:
        self._ticker = None
        for channel in list(self._channels.values()):
            channel.broadcast(lambda framing: frame(_KEEPALIVE, framing))
        if self._channels:
            self._start_keepalive()

    def end_all(self) -> None:
        """Shutdown: end every stream."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            for sub in channel.subscribers():
                sub.end()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
