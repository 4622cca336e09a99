"""``/ws/queue``: the dashboard's WebSocket protocol (PROTOCOL.md, "WebSocket").

On connect a client gets ``queue_state`` and joins the feed; every broadcast event is
encoded once (``{"type", "data", "seq"}`` as one text frame) and written to every
client. The snapshot and the join happen in one step of the event loop, so the
next broadcast a client receives carries ``queue_state.seq + 1``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.errors import JobError
from ..core.events import RESYNC, Event, EventHub
from ..core.jobs import Registry
from ..core.queue import JobQueue
from ..core.worker import Worker
from ..web.fanout import Fanout, SocketWriter
from ..web.http import Request, Response, json_bytes
from ..web.websocket import WebSocket, WebSockets, text_frame
from .common import BadJSON, job_options, parse_job_id, parse_json_object

Command = Callable[[WebSocket, dict[str, Any]], Awaitable[None]]


class CommandError(Exception):
    """A client message we answer with ``{"type": "error", "message"}``."""


class QueueFeed:
    """The ``/ws/queue`` endpoint: a WebSocket handler over the queue.

    ``max_buffer``: bytes a client may lag before it is closed with 1013;
    ``ping_interval``: seconds between the application-level ``ping`` messages;
    ``slice_size`` and ``writer``: how broadcasts are written (rawjobs.web.fanout)."""

    def __init__(self, queue: JobQueue, worker: Worker, registry: Registry, hub: EventHub,
                 sockets: WebSockets, max_buffer: int, ping_interval: float = 25.0,
                 slice_size: int = 256, writer: SocketWriter | None = None) -> None:
        self.queue = queue
        self.worker = worker
        self.registry = registry
        self.sockets = sockets
        self.ping_interval = ping_interval
        self.fanout = Fanout(max_buffer, slice_size, writer=writer)
        self._ticker: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._commands: dict[str, Command] = {
            "create_job": self._create_job,
            "cancel_job": self._cancel_job,
            "retry_job": self._retry_job,
            "clear_completed": self._clear_completed,
            "get_state": self._get_state,
            "get_job_types": self._get_job_types,
            "ping": self._ping,
        }
        hub.subscribe(self._on_event)

    async def handle(self, request: Request) -> Response | WebSocket:
        return self.sockets.accept(request, self)

    # -- broadcast ------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if not len(self.fanout):
            return
        if event.type == RESYNC:
            self._spawn(self._resync())
            return
        data = text_frame(json_bytes({"type": event.type, "data": event.data, "seq": event.seq}))
        self.fanout.broadcast(lambda framing: data)

    def _send_ping(self) -> None:
        self._ticker = None
        data = text_frame(json_bytes({"type": "ping", "ts": int(time.time())}))
        self.fanout.broadcast(lambda framing: data)
        if len(self.fanout):
            self._start_pings()

    def _start_pings(self) -> None:
        if self._ticker is None:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.ping_interval, self._send_ping)

    async def _resync(self) -> None:
        """Events may have been missed (several nodes): every client gets a fresh
        ``queue_state``, which replaces everything it knew."""
        state = await self.queue_state()
        frame = text_frame(json_bytes(state))
        self.fanout.broadcast(lambda framing: frame)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def queue_state(self) -> dict[str, Any]:
        """The ``queue_state`` message; its ``seq`` is the newest event reflected."""
        snapshot = await self.queue.snapshot()
        return {"type": "queue_state", "jobs": snapshot["jobs"], "stats": snapshot["stats"],
                "worker": self.worker.stats(), "job_types": self.registry.schemas(),
                "seq": snapshot["seq"]}

    # -- WebSocketHandler -------------------------------------------------------------

    async def on_connect(self, ws: WebSocket) -> None:
        state = await self.queue_state()
        # No await between the snapshot's seq and joining the feed.
        ws.write(text_frame(json_bytes(state)))
        self.fanout.add(ws)
        self._start_pings()

    def on_disconnect(self, ws: WebSocket) -> None:
        self.fanout.discard(ws)

    async def on_message(self, ws: WebSocket, text: str) -> None:
        try:
            message = parse_json_object(text)
            kind = message.get("type")
            command = self._commands.get(kind) if isinstance(kind, str) else None
            if command is None:
                raise CommandError(f"Unknown message type: {kind!r}")
            await command(ws, message)
        except (BadJSON, CommandError) as exc:
            self._reply(ws, {"type": "error", "message": str(exc)})
        except JobError as exc:
            self._reply(ws, {"type": "error", "message": exc.message, **exc.fields})

    # -- commands -------------------------------------------------------------------

    async def _create_job(self, ws: WebSocket, message: dict[str, Any]) -> None:
        job, created = await self.queue.create(message.get("job_type"), message.get("params"),
                                               job_options(message))
        reply: dict[str, Any] = {"type": "job_created_ack", "job_id": job.id}
        if not created:
            reply["duplicate"] = True
        self._reply(ws, reply)

    async def _cancel_job(self, ws: WebSocket, message: dict[str, Any]) -> None:
        job_id = _message_job_id(message)
        await self.queue.cancel(job_id)
        self._reply(ws, {"type": "job_cancelled_ack", "job_id": job_id, "success": True})

    async def _retry_job(self, ws: WebSocket, message: dict[str, Any]) -> None:
        job_id = _message_job_id(message)
        job = await self.queue.retry(job_id)
        self._reply(ws, {"type": "job_created_ack", "job_id": job.id, "retry_of": job_id})

    async def _clear_completed(self, ws: WebSocket, message: dict[str, Any]) -> None:
        self._reply(ws, {"type": "jobs_cleared_ack", "cleared": await self.queue.clear_finished()})

    async def _get_state(self, ws: WebSocket, message: dict[str, Any]) -> None:
        self._reply(ws, await self.queue_state())

    async def _get_job_types(self, ws: WebSocket, message: dict[str, Any]) -> None:
        self._reply(ws, {"type": "job_types", "job_types": self.registry.schemas()})

    async def _ping(self, ws: WebSocket, message: dict[str, Any]) -> None:
        self._reply(ws, {"type": "pong", "ts": message.get("ts")})

    def _reply(self, ws: WebSocket, message: dict[str, Any]) -> None:
        """A direct reply, after every broadcast this client is owed before it."""
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        if not self.fanout.send_to(ws, text_frame(text.encode("utf-8"))):
            ws.send_text(text)

    def close_all(self) -> None:
        """Shutdown: stop the application pings (connections are closed by web)."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None




def _message_job_id(message: dict[str, Any]) -> int:
    job_id = parse_job_id(message.get("job_id"))
    if job_id is None:
        raise CommandError("job_id must be a positive integer")
    return job_id
