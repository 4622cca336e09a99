"""Events and the hub that hands them to subscribers (DESIGN.md, core/events).

An event is ``(seq, type, data)``. ``seq`` is unique and increasing by one per event
for the life of the store, restarts included: the hub takes numbers from blocks it
reserves in the store ahead of need, as database sequences do, so a restart starts
past every number handed out before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

log = logging.getLogger("rawjobs.events")

Reserve = Callable[[int, int], Awaitable[int]]
"""``reserve(count, at_least) -> first``: persist that numbers below ``first + count``
are taken and return ``first`` (>= ``at_least``)."""


class Event(NamedTuple):
    seq: int
    type: str
    data: dict[str, Any]


Subscriber = Callable[[Event], None]

RESYNC = "resync"
"""An internal event: subscribers may have missed events (another node's were lost);
clients should be given fresh state. Never sent to clients as such."""


_new_tuple = tuple.__new__  # Event(...) without the Python-level __new__ of NamedTuple
_UNLIMITED = 1 << 62


class EventHub:
    """Assigns ``seq`` and calls every subscriber synchronously, in subscription order.

    A subscriber must not block; an exception it raises is logged and does not reach
    the publisher or the other subscribers.
    """

    def __init__(self, reserve: Reserve | None = None, block: int = 100_000) -> None:
        self._reserve = reserve
        self._block = block
        self._next = 1
        self._limit = _UNLIMITED if reserve is None else 1
        self._refill_at = self._limit  # taking this number asks the store for more
        self._refill: asyncio.Task[None] | None = None
        self._subscribers: dict[int, Subscriber] = {}
        self._calls: tuple[Subscriber, ...] = ()  # the subscribers, as publish iterates
        self._token = 0

    async def start(self) -> None:
        """Reserve the first block of sequence numbers (store restarts continue)."""
        if self._reserve is not None:
            first = await self._reserve(self._block, 1)
            self._next = first
            self._set_limit(first + self._block)

    def _set_limit(self, limit: int) -> None:
        self._limit = limit
        self._refill_at = limit if self._reserve is None else limit - self._block // 2

    @property
    def seq(self) -> int:
        """The seq of the newest event published (0 before any)."""
        return self._next - 1

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns a function that removes it (idempotent)."""
        self._token += 1
        token = self._token
        self._subscribers[token] = subscriber
        self._calls = tuple(self._subscribers.values())
        return lambda: self._unsubscribe(token)

    def _unsubscribe(self, token: int) -> None:
        if self._subscribers.pop(token, None) is not None:
            self._calls = tuple(self._subscribers.values())

    def publish(self, type_: str, data: dict[str, Any]) -> Event:
        """Number the event, hand it to every subscriber, return it. The subscribers
        are those at the start of the call (one who leaves meanwhile still gets it)."""
        seq = self._next
        self._next = seq + 1
        if self._next > self._refill_at:
            self._low_on_numbers()
        event = _new_tuple(Event, (seq, type_, data))
        for subscriber in self._calls:
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber failed on %s", type_)
        return event

    def _low_on_numbers(self) -> None:
        """Half the reserved block is used: reserve the next one in the background."""
        if self._reserve is None:
            return
        self._start_refill()
        if self._next > self._limit:
            log.warning("seq block exhausted before refill; continuing in memory")
            self._set_limit(self._next)

    def _start_refill(self) -> None:
        if self._refill is not None and not self._refill.done():
            return
        self._refill = asyncio.get_running_loop().create_task(self._do_refill())

    async def _do_refill(self) -> None:
        assert self._reserve is not None
        asked_from = self._limit
        first = await self._reserve(self._block, asked_from)
        if first != asked_from:  # the store skipped ahead: numbering jumps with it
            self._next = max(self._next, first)
        self._set_limit(first + self._block)
