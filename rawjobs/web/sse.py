"""Server-Sent Events, written by hand (WHATWG HTML, "Server-sent events", 9.2).

``encode_event`` builds one event; ``frame`` wraps bytes for the stream's framing
(an HTTP/1.1 chunk, or raw bytes on an HTTP/1.0 close-delimited body), so one
encoding serves every subscriber of that framing. ``SSEStream`` is the takeover that
sends the head, hands the subscriber to the application and watches for the client
going away.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import HTTPConnection

SSE_HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
]
CHUNKED = "sse-chunked"
RAW = "sse"
_NEWLINES = re.compile(r"\r\n|\r|\n")
_MAX_INBOUND = 64 * 1024
log = logging.getLogger("rawjobs.sse")


def encode_event(data: str, event: str | None = None, id: int | str | None = None) -> bytes:
    """One event: ``id:``, ``event:`` and one ``data:`` line per line of ``data``
    (split on CRLF, CR or LF, as the spec's parser does), then a blank line.
    Newlines in ``id`` and ``event`` are removed: they would end the field."""
    lines = []
    if id is not None:
        lines.append("id: " + _NEWLINES.sub("", str(id)))
    if event is not None:
        lines.append("event: " + _NEWLINES.sub("", event))
    lines.extend("data: " + line for line in _NEWLINES.split(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_comment(text: str) -> bytes:
    """A comment line (``: text``), ignored by clients; keeps idle streams alive."""
    return "".join(f": {line}\n" for line in _NEWLINES.split(text)).encode("utf-8") + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """The ``retry:`` field: the client's reconnection delay."""
    return f"retry: {int(milliseconds)}\n\n".encode("ascii")


def frame(payload: bytes, framing: str) -> bytes:
    """``payload`` as written on the wire for ``framing`` (RFC 9112 section 7.1)."""
    if framing == CHUNKED:
        return b"%x\r\n%b\r\n" % (len(payload), payload)
    return payload


class SSESubscriber:
    """One open event stream. ``framing`` tells the fan-out which bytes it takes;
    ``ended`` is True once the stream is over (``end`` or the client gone)."""

    __slots__ = ("conn", "transport", "framing", "ended")

    def __init__(self, conn: HTTPConnection, chunked: bool) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.framing = CHUNKED if chunked else RAW
        self.ended = False

    def send(self, payload: bytes) -> None:
        """Write one SSE payload (an event, comment or retry field)."""
        if not self.ended:
            self.conn.write(frame(payload, self.framing))

    def end(self) -> None:
        """End the stream (final chunk) and close the connection; the stream's
        read of the client (``_read_until_gone``) ends at once, even if the client
        stopped reading and the close waits on its socket. Idempotent."""
        if self.ended:
            return
        self.ended = True
        self.conn.end_stream()
        self.conn.abort_if_open(graceful=True)
        self.conn.end_reads()

    def evict(self) -> None:
        """Fell too far behind: end the stream; the client reconnects."""
        self.end()


class SSEStream:
    """Takeover for an event stream. ``on_open(subscriber)`` runs right after the
    head is sent (it writes the first events and subscribes); ``on_close`` runs once
    the client has gone or the stream has ended."""

    def __init__(
        self,
        on_open: Callable[[SSESubscriber], Awaitable[None]],
        on_close: Callable[[SSESubscriber], None],
    ) -> None:
        self.on_open: Callable[[SSESubscriber], Awaitable[None]] | None = on_open
        self.on_close = on_close

    async def serve(self, conn: HTTPConnection) -> None:
        subscriber = SSESubscriber(conn, conn.start_stream(200, SSE_HEADERS))
        try:
            on_open, self.on_open = self.on_open, None  # free what it holds for good
            assert on_open is not None, "an SSEStream serves one connection"
            await on_open(subscriber)
            del on_open
            if not subscriber.ended:
                await _read_until_gone(conn)
        finally:
            self.on_close(subscriber)
            subscriber.end()  # the last chunk, for a client that only half-closed
            log.debug("event stream to %s closed", conn.client)


async def _read_until_gone(conn: HTTPConnection) -> None:
    """Read until the client goes away (EOF or reset, noticed with no event sent)
    or the stream is ended (``SSESubscriber.end`` ends the read); a client sending
    more than 64 KiB during a stream (it has nothing to send) counts as gone. The
    connection's own task does this: no task or event per stream besides it."""
    received = 0
    while received <= _MAX_INBOUND:
        try:
            data = await conn.reader.read(_MAX_INBOUND)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        if not data:
            return
        received += len(data)
