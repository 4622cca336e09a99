"""Builds the whole server: store, queue, worker, routes, HTTP server (DESIGN.md).

``App(settings)`` wires the layers; ``start`` opens the store, recovers, starts the
worker and listens; ``stop`` is the graceful shutdown of issue 3.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import importlib
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .api.dashboard import QueueFeed
from .api.openapi import serve_openapi
from .api.progress import ProgressStreams
from .api.rest import RestAPI
from .core.builtin import register_builtins
from .core.cluster import Cluster
from .core.events import EventHub
from .core.jobs import Registry
from .core.jobs import registry as default_registry
from .core.procpool import ProcessPool
from .core.queue import JobQueue
from .core.store.base import SharedStore, Store
from .core.store.memory import MemoryStore
from .core.store.sqlite import SQLiteStore
from .core.worker import Worker
from .web.fanout import SocketWriter
from .web.http import Request, Response, Takeover, error_response
from .web.routing import Router, route
from .web.server import HTTPServer, Limits
from .web.static import StaticFiles
from .web.websocket import WebSocketConfig, WebSockets

log = logging.getLogger("rawjobs")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
_HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::[0-9]{1,5})?")  # RFC 9110 7.2


def default_fanout_threads() -> int:
    """Fan-out threads besides the event loop's: one when this process may use two
    CPUs or more, else none (see rawjobs.web.fanout.SocketWriter)."""
    return 1 if len(os.sched_getaffinity(0)) > 1 else 0


@dataclass
class Settings:
    """Everything the command line sets (see ``rawjobs --help`` for each option)."""

    host: str = "127.0.0.1"
    port: int = 5001
    db: str = "rawjobs.db"
    concurrency: int = 3
    jobs: list[str] = field(default_factory=list)
    grace: float = 10.0
    keep_finished: int = 10_000
    max_pending: int = 100_000
    max_subscriber_buffer: int = 256 * 1024
    fanout_slice: int = 256
    fanout_threads: int = field(default_factory=default_fanout_threads)
    sse_keepalive: float = 15.0
    limits: Limits = field(default_factory=Limits)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    allowed_hosts: list[str] = field(default_factory=list)
    token: str | None = None
    static_dir: str | None = None
    node_id: str | None = None
    heartbeat: float = 5.0
    lease: float = 15.0


def static_root() -> Path:
    """``static/`` inside the installed package, else the source checkout's."""
    packaged = Path(__file__).resolve().parent / "static"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "static"


def make_store(settings: Settings) -> Store:
    """``:memory:``, a ``postgresql://`` URL (several nodes), or a SQLite file."""
    db = settings.db
    if db == ":memory:":
        return MemoryStore()
    if db.startswith(("postgresql://", "postgres://")):
        from .core.store.postgres import PostgresStore

        node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
        return PostgresStore(db, node_id, lease_seconds=settings.lease)
    return SQLiteStore(db)


def build_registry(modules: list[str]) -> Registry:
    """The built-in job types, then those the ``modules`` register with ``@job_type``.
    Raises ImportError, or JobTypeError for a bad or duplicate job type."""
    registry = Registry()
    register_builtins(registry)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        importlib.import_module(name)
    for jt in default_registry:
        registry.add(jt)
    return registry


class App:
    """The running server. ``port`` is known once ``start`` returns."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or build_registry(settings.jobs)
        self.store = make_store(settings)
        self.hub = EventHub(self.store.reserve_seq if self.store.durable else None)
        self.queue = JobQueue(self.store, self.registry, self.hub,
                              keep_finished=settings.keep_finished,
                              max_pending=settings.max_pending)
        self.pool = ProcessPool()
        self.worker = Worker(self.queue, self.registry, self.hub, self.pool,
                             concurrency=settings.concurrency)
        self.sockets = WebSockets(settings.websocket)
        buffer = settings.max_subscriber_buffer
        self.writer = SocketWriter(settings.fanout_threads)
        self.rest = RestAPI(self.queue, self.worker, self.registry)
        self.progress = ProgressStreams(self.queue, self.hub, buffer,
                                        keepalive=settings.sse_keepalive,
                                        slice_size=settings.fanout_slice, writer=self.writer)
        self.feed = QueueFeed(self.queue, self.worker, self.registry, self.hub, self.sockets,
                              buffer, slice_size=settings.fanout_slice, writer=self.writer)
        self.router = Router(
            self.rest.routes() + [
                route("GET", "/api/jobs/{id}/progress", self.progress.handle),
                route("GET", "/ws/queue", self.feed.handle),
                route("GET", "/api/openapi.json", serve_openapi),
            ],
            fallback=StaticFiles(settings.static_dir or static_root()),
        )
        self.server = HTTPServer(self.handle, settings.limits)
        self.cluster = (Cluster(self.store, self.queue, self.worker, self.hub,
                                heartbeat=settings.heartbeat)
                        if isinstance(self.store, SharedStore) else None)
        hosts = (*LOOPBACK_HOSTS, settings.host, *settings.allowed_hosts)
        self._allowed_hosts = {h.lower() for h in hosts} | {
            f"[{h.lower()}]" for h in hosts if ":" in h and not h.startswith("[")}

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await self.queue.start()
        if self.cluster is not None:
            await self.cluster.start()
        self.worker.start()
        await self.server.start(self.settings.host, self.settings.port)

    async def handle(self, request: Request) -> Response | Takeover:
        """Access checks (Host, token), then the route table."""
        if not self._host_allowed(request.host()):
            return error_response(400, "Host not allowed")
        if self.settings.token and request.path.startswith(("/api/", "/ws/")):
            if not self._token_ok(request):
                return error_response(401, "Missing or wrong access token",
                                      headers=[("WWW-Authenticate", "Bearer")])
        return await self.router.dispatch(request)

    def _host_allowed(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: nothing to rebind
            return True
        match = _HOST_RE.fullmatch(host.strip().lower())
        return match is not None and match.group(1) in self._allowed_hosts

    def _token_ok(self, request: Request) -> bool:
        assert self.settings.token is not None
        expected = self.settings.token.encode()
        auth = request.header("authorization") or ""
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(),
                                                                 expected):
            return True
        given = request.query_value("token")
        return given is not None and hmac.compare_digest(given.encode(), expected)

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, close WebSockets (1001) and SSE streams,
        give running jobs ``grace`` seconds, put the rest back to pending, flush."""
        started = time.monotonic()
        self.server.stop_accepting()
        self.sockets.close_all()
        self.progress.end_all()
        self.feed.close_all()
        await self.worker.stop(self.settings.grace)
        await self.queue.release_running()
        await self.worker.wait_idle(0.5)
        self.pool.close()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.server.shutdown(timeout=max(0.2, 1.0 - (time.monotonic() - started)))
        await self.queue.close()
        self.writer.close()
        log.info("stopped in %.2f s", time.monotonic() - started)


GC_YOUNG_THRESHOLD = 10_000
"""Net allocations between collections of the youngest generation (Python's default
is 700)."""


def tune_gc() -> None:
    """Garbage-collector settings for a long-running server process.

    What startup built (modules, routes, job types) lives as long as the process:
    ``gc.freeze`` takes it out of every later collection. The youngest generation is
    collected every ``GC_YOUNG_THRESHOLD`` net allocations instead of 700: with
    hundreds of jobs and requests in flight, 700 collects so often that short-lived
    objects (tasks, events, job copies) survive into the older generations, whose
    collections then scan every job kept in memory. Collection stays automatic, and
    nothing else changes; memory held by garbage cycles waits a little longer.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


async def serve(settings: Settings, stop: asyncio.Event, ready: asyncio.Event | None = None
                ) -> App:
    """Run an App until ``stop`` is set, then shut it down gracefully."""
    app = App(settings)
    await app.start()
    tune_gc()
    if ready is not None:
        ready.set()
    print(f"rawjobs: dashboard at http://{_url_host(settings.host)}:{app.port}/", flush=True)
    await stop.wait()
    await app.stop()
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
