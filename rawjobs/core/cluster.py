"""Several nodes on one shared store (PostgreSQL): events, leases, heartbeats.

Each node publishes its own events locally at once and forwards them to the others
over the store's event channel (LISTEN/NOTIFY), one sender task keeping their order.
A payload over ``MAX_PAYLOAD`` bytes (PostgreSQL's limit is 8000) carries only the job
id, and receivers fetch the job instead. Every payload carries its origin and a
per-origin counter, so a receiver that sees a gap, or that lost its listening
connection, publishes ``resync``: its clients then get fresh state.

Every ``heartbeat`` seconds the node records itself alive, renews the leases of the
jobs it runs (stopping any it no longer holds), takes back the jobs of nodes whose
leases expired, and prunes finished jobs beyond ``keep_finished``. A node that cannot
reach the database for a whole lease stops its running jobs: another node will run
them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from .events import RESYNC, EventHub
from .queue import JobQueue
from .store.base import SharedStore
from .worker import Worker

log = logging.getLogger("rawjobs.cluster")
MAX_PAYLOAD = 7000
_FETCHABLE = {"job_created": lambda job: job.to_dict(),
              "job_completed": lambda job: {
                  "job_id": job.id, "result": job.result,
                  "duration": round((job.completed_at or 0) - (job.started_at or 0), 3)}}


class Cluster:
    """Joins this node to the others sharing ``store``. ``heartbeat``: seconds
    between heartbeats; the lease length is ``store.lease_seconds``."""

    def __init__(self, store: SharedStore, queue: JobQueue, worker: Worker, hub: EventHub,
                 heartbeat: float = 5.0) -> None:
        self.store = store
        self.queue = queue
        self.worker = worker
        self.hub = hub
        self.heartbeat = heartbeat
        self.node_id = store.node_id
        self._sent = 0
        self._seen: dict[str, int] = {}
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: Any = None
        self._last_beat = time.monotonic()
        self._stopping = False

    async def start(self) -> None:
        self.queue.forward = self._forward
        await self._listen()
        loop = asyncio.get_running_loop()
        for coro in (self._send_loop(), self._receive_loop(), self._beat_loop()):
            self._tasks.append(loop.create_task(coro))

    async def stop(self) -> None:
        self._stopping = True
        await self._flush_outbox()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        with contextlib.suppress(Exception):
            await self.store.forget_node()

    async def _flush_outbox(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._outbox.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- events out ---------------------------------------------------------------

    def _forward(self, type_: str, data: dict[str, Any]) -> None:
        self._sent += 1
        message = {"node": self.node_id, "n": self._sent, "type": type_, "data": data}
        payload = json.dumps(message, separators=(",", ":"))
        if len(payload.encode()) > MAX_PAYLOAD:
            job_id = data.get("job_id", data.get("id"))
            message["data"] = {"job_id": job_id}
            message["fetch"] = True
            payload = json.dumps(message, separators=(",", ":"))
        self._outbox.put_nowait(payload)

    async def _send_loop(self) -> None:
        """Forward what is waiting, in order, one round trip for all of it."""
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 500:
                batch.append(self._outbox.get_nowait())
            try:
                await self.store.notify(batch)
            except Exception as exc:  # the others see a gap and resync
                log.warning("could not forward %d event(s): %s", len(batch), exc)
            finally:
                for _ in batch:
                    self._outbox.task_done()

    # -- events in ------------------------------------------------------------------

    async def _listen(self) -> None:
        self._listener = await self.store.listen(self._inbox.put_nowait)
        self._listener.add_termination_listener(lambda _conn: self._on_listener_lost())

    def _on_listener_lost(self) -> None:
        if self._stopping:
            return
        log.warning("lost the event channel; reconnecting")
        asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self, delay: float = 0.5) -> None:
        while True:
            try:
                await self._listen()
                break
            except Exception as exc:
                log.warning("event channel: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self._seen.clear()
        self.hub.publish(RESYNC, {})

    async def _receive_loop(self) -> None:
        while True:
            payload = await self._inbox.get()
            try:
                await self._receive(json.loads(payload))
            except Exception:
                log.exception("could not apply an event from another node")

    async def _receive(self, message: dict[str, Any]) -> None:
        origin = message["node"]
        if origin == self.node_id:
            return
        last = self._seen.get(origin)
        self._seen[origin] = message["n"]
        if last is not None and message["n"] != last + 1:
            log.warning("missed %d event(s) from node %s", message["n"] - last - 1, origin)
            self.hub.publish(RESYNC, {})
        data = message["data"]
        if message.get("fetch"):
            job = await self.store.get(data["job_id"])
            build = _FETCHABLE.get(message["type"])
            if job is None or build is None:
                return
            data = build(job)
        self.queue.apply_remote(message["type"], data)

    # -- heartbeat -------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        while True:
            try:
                await self._beat()
                self._last_beat = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
                if time.monotonic() - self._last_beat > self.store.lease_seconds:
                    self.queue.drop_live(set(self.queue.live_ids()))
            self.worker.wake()
            await asyncio.sleep(self.heartbeat)

    async def _beat(self) -> None:
        running = self.queue.live_ids()
        held = await self.store.heartbeat(self.worker.stats(), running)
        self.queue.drop_live(set(running) - held)
        await self.queue.apply_recovered(await self.store.reap(self.queue.max_interruptions))
        excess = await self.store.finished_count() - self.queue.keep_finished
        if excess > 0:
            await self.store.prune_finished(excess)
        self.worker.nodes = await self.store.nodes(max_age=3 * self.heartbeat)
