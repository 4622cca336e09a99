"""Fan-out: encode once, write many (DESIGN.md, "Fan-out" and "Backpressure").

A subscriber is its transport and nothing more: no per-subscriber queue or writer
task. An event is encoded once per wire format ("framing") and the same bytes are
written to every subscriber's transport. A subscriber whose transport has more than
``max_buffer`` bytes waiting is evicted (its ``evict`` closes it: WebSocket 1013, SSE
end of stream) instead of letting the server buffer without bound.

A small channel writes at once. A channel with more than ``slice_size`` subscribers
(or with writes still pending) keeps an ordered log of operations, drained by one task
that writes ``slice_size`` subscribers at a time and yields to the event loop in
between: one event to 10,000 subscribers is some 40 ms of ``send`` calls, and other
requests are served between its slices instead of after all of it. Events that wait
in the log together are written together: one ``send`` per subscriber for all of them,
which roughly halves the CPU of a burst (each ``send`` is a TCP segment, asyncio sets
TCP_NODELAY). Everything a
subscriber gets through its channel (events, direct replies, its joining) keeps the
order in which it was asked for.

A large channel's slice can be written by more than one thread (``SocketWriter``):
on loopback or a fast LAN most of a ``send``'s cost is the kernel's TCP work, which
runs outside the GIL, so a second core shortens how long one event takes to reach
the last of its subscribers (2,000 loopback subscribers on 2 cores: 33-40 ms with
one thread, 21-28 ms with two). The event loop's thread takes part and waits until
the slice is written, so no other code writes to those sockets meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Protocol

Encode = Callable[[str], bytes]
Write = tuple[asyncio.WriteTransport, int, bytes]
"""One write of a slice: the transport, its socket's file descriptor, the bytes."""


class Subscriber(Protocol):
    """What the fan-out needs of a subscriber."""

    transport: asyncio.WriteTransport
    framing: str

    def evict(self) -> None:
        """Called once when the subscriber fell too far behind; it must close."""


class _Broadcast:
    """One event being written: its encodings (made once per framing, when first
    needed), the subscribers it goes to, and how far the writing got."""

    __slots__ = ("encode", "encoded", "targets", "done")

    def __init__(self, encode: Encode) -> None:
        self.encode = encode
        self.encoded: dict[str, bytes] = {}
        self.targets: list[Subscriber] | None = None
        self.done = 0

    def data(self, framing: str) -> bytes:
        data = self.encoded.get(framing)
        if data is None:
            data = self.encoded[framing] = self.encode(framing)
        return data


class SocketWriter:
    """Writes a slice of a fan-out from the event loop's thread and ``threads`` more.

    Each write in a slice goes to a transport with nothing buffered, as one
    ``write(2)`` on its socket's file descriptor made by whichever thread takes it
    (the GIL is released during the call, so the kernel's work runs on several
    cores). ``write`` returns once every write was made: the event loop's thread
    writes too and then waits, so nothing else writes to those sockets or closes
    them meanwhile. What a socket did not take (a full buffer, a partial write, an
    error) then goes through the transport's own ``write``, which buffers the rest or
    closes the transport on the error, as it would have done itself. ``threads=0``:
    every write is ``transport.write`` on the event loop's thread."""

    CHUNK = 8
    """Writes a thread takes at a time (roughly 0.1 ms of ``send`` on loopback)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="rawjobs-fanout")
                      if threads else None)

    def write(self, writes: list[Write]) -> None:
        """Make every write in ``writes``, in parallel when there are threads."""
        if self._pool is None or len(writes) < 2:
            for transport, _, data in writes:
                transport.write(data)
            return
        chunks = itertools.count()
        futures = [self._pool.submit(self._send, writes, chunks) for _ in range(self.threads)]
        try:
            rest = self._send(writes, chunks)
        finally:
            # A thread that has not started yet (its core busy) is not waited for.
            started = [future for future in futures if not future.cancel()]
            wait(started)
        for future in started:
            rest += future.result()
        for transport, data in rest:
            transport.write(data)

    def close(self) -> None:
        """Stop the threads (after the slice being written, if any)."""
        if self._pool is not None:
            self._pool.shutdown()

    @classmethod
    def _send(cls, writes: list[Write], chunks: itertools.count[int]
              ) -> list[tuple[asyncio.WriteTransport, bytes]]:
        """Take ``CHUNK`` writes at a time until none are left; returns what the
        sockets did not take."""
        rest = []
        for chunk in chunks:
            part = writes[chunk * cls.CHUNK:(chunk + 1) * cls.CHUNK]
            if not part:
                return rest
            for transport, fd, data in part:
                try:
                    sent = os.write(fd, data)
                except OSError:  # would block, or an error the transport will see
                    sent = 0
                if sent < len(data):
                    rest.append((transport, data[sent:]))
        return rest


class Fanout:
    """Subscribers grouped by framing, and the writes still to be made to them.

    ``max_buffer``: bytes a subscriber's transport may hold before it is evicted;
    ``slice_size``: subscribers written to before yielding to the event loop;
    ``max_log``: operations waiting before the caller writes them all at once;
    ``writer``: writes a large channel's slices (default, or one without threads: the
    event loop's thread alone)."""

    def __init__(self, max_buffer: int, slice_size: int = 256, max_log: int = 1000,
                 writer: SocketWriter | None = None) -> None:
        self.max_buffer = max_buffer
        self.slice_size = slice_size
        self.max_log = max_log
        self.writer = writer if writer is not None and writer.threads else None
        self._members: dict[Subscriber, int] = {}  # each with its socket's fd, or -1
        self._joining: set[Subscriber] = set()
        self._log: deque[tuple[str, Any]] = deque()
        self._drainer: asyncio.Task[None] | None = None

    # -- membership -----------------------------------------------------------------

    def add(self, subscriber: Subscriber) -> None:
        """Join: the subscriber gets every broadcast asked for from now on."""
        if self._log:
            self._joining.add(subscriber)
            self._log.append(("join", subscriber))
        else:
            self._members[subscriber] = _fileno(subscriber.transport)

    def discard(self, subscriber: Subscriber) -> None:
        """Leave at once: nothing more is written to it (idempotent)."""
        self._members.pop(subscriber, None)
        self._joining.discard(subscriber)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, subscriber: object) -> bool:
        return subscriber in self._members

    def subscribers(self) -> list[Subscriber]:
        return list(self._members)

    # -- writing --------------------------------------------------------------------

    def broadcast(self, encode: Encode) -> None:
        """Write ``encode(framing)`` to every member, encoding each framing once."""
        op = _Broadcast(encode)
        if not self._log and len(self._members) <= self.slice_size:
            op.targets = list(self._members)
            self._write(op, len(op.targets))
        else:  # large, or behind earlier writes: in order, a slice at a time
            self._queue("broadcast", op)

    def send_to(self, subscriber: Subscriber, data: bytes) -> bool:
        """Write ``data`` to one member (or one joining), after every broadcast
        asked for before. False, and nothing written, for anyone else."""
        if subscriber not in self._members and subscriber not in self._joining:
            return False
        if self._log:
            self._queue("direct", (subscriber, data))
        else:
            self._write_one(subscriber, data)
        return True

    def after(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything asked for before has been written."""
        if self._log:
            self._queue("call", action)
        else:
            action()

    # -- internals --------------------------------------------------------------------

    def _queue(self, kind: str, op: Any) -> None:
        self._log.append((kind, op))
        if len(self._log) > self.max_log:
            # Producers outpace the writing: catch up now, as one long write would,
            # so the log never grows without bound.
            self._drain_some(None)
        elif self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._log:
            self._drain_some(self.slice_size)
            if self._log:
                await asyncio.sleep(0)

    def _drain_some(self, budget: int | None) -> None:
        """Carry out logged operations until ``budget`` writes were made (None: all)."""
        while self._log:
            kind, op = self._log[0]
            if kind == "broadcast":
                if op.targets is None:
                    op = self._coalesce()
                    op.targets = list(self._members)
                written = self._write(op, len(op.targets) if budget is None else budget,
                                      self.writer)
                if budget is not None:
                    budget -= written
                if op.done < len(op.targets):
                    return
            elif kind == "join":
                if op in self._joining:  # not discarded meanwhile
                    self._joining.discard(op)
                    self._members[op] = _fileno(op.transport)
            elif kind == "direct":
                if op[0] in self._members:
                    self._write_one(*op)
            else:
                op()
            self._log.popleft()
            if budget is not None and budget <= 0:
                return

    def _coalesce(self) -> _Broadcast:
        """Merge the broadcasts waiting at the head of the log, none of them started,
        into one: each subscriber then gets them in one write (one TCP segment instead
        of one per event), in the same order. They go to the same subscribers, as no
        join stands between them."""
        group = []
        while self._log and self._log[0][0] == "broadcast" and self._log[0][1].targets is None:
            group.append(self._log.popleft()[1])
        merged = group[0] if len(group) == 1 else _Broadcast(
            lambda framing: b"".join(op.data(framing) for op in group))
        self._log.appendleft(("broadcast", merged))
        return merged

    def _write(self, op: _Broadcast, count: int, writer: SocketWriter | None = None) -> int:
        """Write ``op`` to its next ``count`` targets, on this thread or through
        ``writer``; returns how many targets it went through."""
        assert op.targets is not None
        start, end = op.done, min(op.done + count, len(op.targets))
        members, writes = self._members, []
        for subscriber in op.targets[start:end]:
            fd = members.get(subscriber)
            if fd is None:  # left meanwhile
                continue
            buffered = self._admit(subscriber)
            if buffered is None:
                continue
            data = op.data(subscriber.framing)
            if writer is not None and buffered == 0 and fd >= 0:
                writes.append((subscriber.transport, fd, data))
            else:
                subscriber.transport.write(data)
        if writes:
            writer.write(writes)  # type: ignore[union-attr]
        op.done = end
        return end - start

    def _write_one(self, subscriber: Subscriber, data: bytes) -> None:
        if self._admit(subscriber) is not None:
            subscriber.transport.write(data)

    def _admit(self, subscriber: Subscriber) -> int | None:
        """Bytes waiting in the subscriber's transport, or None (and it is no longer
        a member) when the transport is closing or over ``max_buffer``."""
        transport = subscriber.transport
        if transport.is_closing():
            self._members.pop(subscriber, None)
            return None
        buffered = transport.get_write_buffer_size()
        if buffered > self.max_buffer:
            self._members.pop(subscriber, None)
            subscriber.evict()
            return None
        return buffered


def _fileno(transport: asyncio.BaseTransport) -> int:
    """The file descriptor of the transport's socket, or -1 when it has none or the
    transport is not a plain socket's (TLS: the bytes must go through it)."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("ssl_object") is not None:
        return -1
    return sock.fileno()
