"""Fan-out: encode once, write many (DESIGN.md, "Fan-out" and "Backpressure").

A subscriber is its transport and nothing more: no queue, no writer task. An event
is encoded once per wire format ("framing") and the same bytes are written to
every subscriber's transport. A subscriber whose transport has more than
``max_buffer`` bytes waiting is evicted (its ``evict`` closes it: WebSocket 1013, SSE
end of stream) instead of letting the server buffer without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Subscriber(Protocol):
    """What the fan-out needs of a subscriber."""

    transport: asyncio.WriteTransport
    framing: str

    def evict(self) -> None:
        """Called once when the subscriber fell too far behind; it must close."""


class Fanout:
    """Subscribers grouped by framing; ``broadcast`` writes one encoding per framing.

    ``max_buffer``: bytes a subscriber's transport may hold before it is evicted."""

    def __init__(self, max_buffer: int) -> None:
        self.max_buffer = max_buffer
        self._groups: dict[str, dict[Subscriber, None]] = {}

    def add(self, subscriber: Subscriber) -> None:
        self._groups.setdefault(subscriber.framing, {})[subscriber] = None

    def discard(self, subscriber: Subscriber) -> None:
        group = self._groups.get(subscriber.framing)
        if group is not None:
            group.pop(subscriber, None)

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def __contains__(self, subscriber: object) -> bool:
        return any(subscriber in g for g in self._groups.values())

    def subscribers(self) -> list[Subscriber]:
        return [s for g in self._groups.values() for s in g]

    def broadcast(self, encode: Callable[[str], bytes]) -> int:
        """Write ``encode(framing)`` to every subscriber of that framing, encoding
        each framing once. Returns the number of subscribers written to."""
        written = 0
        for framing, group in self._groups.items():
            if not group:
                continue
            data = encode(framing)
            laggards = None
            for subscriber in group:
                transport = subscriber.transport
                if transport.is_closing() or transport.get_write_buffer_size() > self.max_buffer:
                    laggards = laggards or []
                    laggards.append(subscriber)
                    continue
                transport.write(data)
                written += 1
            if laggards:
                self._evict(group, laggards)
        return written

    @staticmethod
    def _evict(group: dict[Subscriber, None], laggards: list[Subscriber]) -> None:
        for subscriber in laggards:
            group.pop(subscriber, None)
            if not subscriber.transport.is_closing():
                subscriber.evict()
