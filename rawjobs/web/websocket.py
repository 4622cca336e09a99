"""WebSocket server side (RFC 6455) on wsproto, after an h11 upgrade.

The handshake is checked here (RFC 6455 section 4.2.1) and refused with a plain HTTP
response that leaves the connection usable. Once accepted, the h11 connection's
trailing bytes go to wsproto, which owns the connection's state from then on:
incoming frames, ping/pong, close. Data frames the server sends are built by
``text_frame`` (unmasked, so one copy serves every subscriber, DESIGN.md "Fan-out").
permessage-deflate is never negotiated (SERVER-NOTES.md section 2).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from .http import Request, Response, error_response

if TYPE_CHECKING:
    from .server import HTTPConnection

log = logging.getLogger("rawjobs.websocket")

FRAMING = "ws"
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
_READ_SIZE = 64 * 1024
# Close reasons we send: fixed text, never an exception's (issue 5, point 7).
_REASONS = {PROTOCOL_ERROR: "Protocol error", INVALID_DATA: "Invalid UTF-8",
            INTERNAL_ERROR: "Internal error"}


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame carrying ``payload`` (UTF-8), RFC 6455 5.2."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def ping_frame(payload: bytes) -> bytes:
    """An unmasked ping control frame (payload at most 125 bytes), RFC 6455 5.5.2."""
    return struct.pack("!BB", 0x89, len(payload)) + payload


class WebSocketHandler(Protocol):
    """The application side of a WebSocket endpoint."""

    async def on_connect(self, ws: WebSocket) -> None: ...

    async def on_message(self, ws: WebSocket, text: str) -> None: ...

    def on_disconnect(self, ws: WebSocket) -> None: ...


@dataclass
class WebSocketConfig:
    """``max_message``: bytes of one message, counted across fragments (1009 past
    it); ``ping_interval``: seconds between server pings; ``ping_timeout``: seconds
    of silence after a ping before the peer is closed (1011); ``close_timeout``:
    seconds to wait for the peer's Close before dropping TCP; ``allowed_origins``:
    origins accepted besides this server's own (``scheme://host[:port]``)."""

    max_message: int = 64 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 10.0
    allowed_origins: tuple[str, ...] = ()


def _origin_allowed(origin: str, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether ``origin`` is one of ``allowed`` or names the request's own host.
    Schemes and host names compare in any case (RFC 6454 section 4, RFC 3986
    section 3.2.2)."""
    origin = origin.rstrip("/").lower()
    if origin in {o.rstrip("/").lower() for o in allowed}:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:  # e.g. "http://[::1"
        return False
    return parts.scheme in ("http", "https") and host is not None and (
        parts.netloc == host.lower())


def handshake_problem(request: Request, config: WebSocketConfig) -> Response | None:
    """Why this upgrade request cannot be accepted, as the response to send, or None.

    400 for a malformed handshake (method, HTTP version, Upgrade/Connection headers,
    key), 426 with ``Sec-WebSocket-Version: 13`` for another version, 403 for a
    disallowed Origin (RFC 6455 section 4.2.1)."""
    if request.method != "GET":
        return error_response(400, "WebSocket handshake must be a GET request")
    if request.http_version == "1.0":
        return error_response(400, "WebSocket handshake needs HTTP/1.1")
    if "websocket" not in [v.lower() for v in request.header_values("upgrade")]:
        return error_response(400, "Missing 'Upgrade: websocket' header")
    if "upgrade" not in [v.lower() for v in request.header_values("connection")]:
        return error_response(400, "Missing 'Connection: Upgrade' header")
    if request.header("sec-websocket-version") != "13":
        return error_response(426, "Unsupported WebSocket version",
                              headers=[("Sec-WebSocket-Version", "13")])
    key = request.header("sec-websocket-key")
    try:
        valid_key = key is not None and len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return error_response(400, "Missing or invalid Sec-WebSocket-Key")
    origin = request.header("origin")
    if origin is not None and not _origin_allowed(origin, request.host(),
                                                  config.allowed_origins):
        return error_response(403, "Origin not allowed")
    return None


class WebSockets:
    """The open WebSockets of a server, their configuration and their keepalive
    (RFC 6455 section 5.5.2): one timer pings every connection each
    ``ping_interval`` seconds and closes with 1011 a peer from which nothing at all
    (pong or otherwise) has arrived for ``ping_timeout`` seconds after a ping."""

    def __init__(self, config: WebSocketConfig | None = None) -> None:
        self.config = config or WebSocketConfig()
        self.open: set[WebSocket] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._ping = ping_frame(b"rawjobs")

    def accept(self, request: Request, handler: WebSocketHandler) -> Response | WebSocket:
        """A refusal response, or the takeover that completes the upgrade."""
        problem = handshake_problem(request, self.config)
        if problem is not None:
            return problem
        return WebSocket(self, request, handler)

    def _register(self, ws: WebSocket) -> None:
        self.open.add(ws)
        if self._ticker is None and self.config.ping_interval > 0:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.config.ping_interval, self._tick)

    def _unregister(self, ws: WebSocket) -> None:
        self.open.discard(ws)

    def _tick(self) -> None:
        now = time.monotonic()
        for ws in list(self.open):
            if ws.wsproto.state is not ConnectionState.OPEN:
                continue
            pinged = ws.unanswered_ping
            if pinged is None or ws.last_seen >= pinged:  # heard from since: ping anew
                ws.unanswered_ping = now
            elif now - pinged >= self.config.ping_timeout - 0.001:
                wait = min(self.config.close_timeout, self.config.ping_timeout)
                ws.close(INTERNAL_ERROR, "Keepalive ping timeout", wait=wait)
                continue
            ws.write(self._ping)
        if self.open:
            loop = asyncio.get_running_loop()
            self._ticker = loop.call_later(self.config.ping_interval, self._tick)
        else:
            self._ticker = None

    def close_all(self, code: int = GOING_AWAY, reason: str = "Server shutting down") -> None:
        for ws in list(self.open):
            ws.close(code, reason)


class WebSocket:
    """One accepted WebSocket connection (a ``Takeover``). ``transport`` and
    ``framing`` make it a fan-out subscriber; ``send_text`` and ``close`` are for the
    application; ``evict`` closes with 1013 (too far behind)."""

    framing = FRAMING
    __slots__ = ("sockets", "key", "path", "handler", "conn", "transport", "wsproto",
                 "last_seen", "unanswered_ping", "_message", "_message_size", "_closer")

    def __init__(self, sockets: WebSockets, request: Request, handler: WebSocketHandler) -> None:
        self.sockets = sockets
        # Only what the connection needs from its request, not the request itself.
        self.key = request.header("sec-websocket-key") or ""
        self.path = request.path
        self.handler = handler
        self.conn: HTTPConnection | None = None
        self.transport: asyncio.WriteTransport = None  # type: ignore[assignment]
        self.wsproto = Connection(ConnectionType.SERVER)
        self.last_seen = time.monotonic()
        self.unanswered_ping: float | None = None
        self._message: list[str] = []
        self._message_size = 0
        self._closer: asyncio.TimerHandle | None = None

    # -- takeover -----------------------------------------------------------------

    async def serve(self, conn: HTTPConnection) -> None:
        self.conn = conn
        self.transport = conn.transport
        accept = generate_accept_token(self.key.encode("ascii"))
        conn.write(conn.h11.send(h11.InformationalResponse(
            status_code=101, reason=b"Switching Protocols",
            headers=[(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                     (b"sec-websocket-accept", accept)])))
        self.wsproto = Connection(ConnectionType.SERVER, trailing_data=conn.h11.trailing_data[0])
        self.sockets._register(self)
        try:
            try:
                await self.handler.on_connect(self)
            except Exception:
                self._internal_error("on_connect")
            await self._read_loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.sockets._unregister(self)
            self.handler.on_disconnect(self)
            if self._closer is not None:
                self._closer.cancel()
            conn.abort_if_open(graceful=True)

    async def _read_loop(self) -> None:
        """Feed wsproto until the close handshake is done or the TCP connection is
        gone. After each message, wait (``write_timeout`` at most, then TimeoutError)
        while our write buffer is over the high-water mark: a client that sends
        requests but does not read the replies stops being read, however many
        requests one read brought."""
        assert self.conn is not None
        while True:
            for event in self.wsproto.events():
                if isinstance(event, TextMessage):
                    await self._on_text(event)
                    await self.conn.flush()
                elif isinstance(event, CloseConnection):
                    self._on_close(event)
                    return
                elif isinstance(event, Ping):
                    if self.wsproto.state is ConnectionState.OPEN:
                        self.write(self.wsproto.send(event.response()))
                elif isinstance(event, BytesMessage):
                    self.close(UNSUPPORTED_DATA, "Binary messages are not supported")
            if self.wsproto.state is ConnectionState.CLOSED or self.transport.is_closing():
                return
            await self.conn.flush()
            data = await self.conn.reader.read(_READ_SIZE)
            self.last_seen = time.monotonic()
            self.wsproto.receive_data(data or None)

    async def _on_text(self, event: TextMessage) -> None:
        if self.wsproto.state is not ConnectionState.OPEN:
            return
        self._message_size += len(event.data.encode("utf-8"))
        if self._message_size > self.sockets.config.max_message:
            self.close(MESSAGE_TOO_BIG, "Message too big")
            return
        self._message.append(event.data)
        if event.message_finished:
            text = "".join(self._message)
            self._message, self._message_size = [], 0
            try:
                await self.handler.on_message(self, text)
            except Exception:
                self._internal_error("on_message")

    def _internal_error(self, where: str) -> None:
        """A handler bug: the log gets the traceback, the client a 1011 close."""
        log.exception("WebSocket handler %s failed (%s)", where, self.path)
        self.close(INTERNAL_ERROR, _REASONS[INTERNAL_ERROR])

    def _on_close(self, event: CloseConnection) -> None:
        """A Close from the peer (answered, RFC 6455 section 5.5.1), the end of our
        close handshake, or a fault wsproto found in the peer's frames (state still
        OPEN: we send the Close wsproto chose, 1002 or 1007, and drop the TCP
        connection, RFC 6455 section 7.1.7)."""
        if self.wsproto.state is ConnectionState.REMOTE_CLOSING:
            self.write(self.wsproto.send(event.response()))
        elif self.wsproto.state is ConnectionState.OPEN:
            self.handler.on_disconnect(self)
            code = event.code if event.code in _REASONS else PROTOCOL_ERROR
            self.write(self.wsproto.send(CloseConnection(code=code, reason=_REASONS[code])))
            self.wsproto.receive_data(None)  # the peer's frames cannot be parsed any more

    # -- sending ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.write(data)

    def send_text(self, text: str) -> None:
        """Send one text message (no-op once closing)."""
        if self.wsproto.state is ConnectionState.OPEN:
            self.write(text_frame(text.encode("utf-8")))

    def close(self, code: int = NORMAL, reason: str = "", wait: float | None = None) -> None:
        """Start the close handshake (RFC 6455 section 7.1.2; idempotent): send
        Close with ``code`` (never 1005/1006/1015) and ``reason``, then drop the TCP
        connection when the peer answers or after ``wait`` seconds (default
        ``close_timeout``)."""
        if self.wsproto.state is not ConnectionState.OPEN:
            return
        self.handler.on_disconnect(self)
        with contextlib.suppress(Exception):
            self.write(self.wsproto.send(CloseConnection(code=code, reason=reason)))
        loop = asyncio.get_running_loop()
        delay = self.sockets.config.close_timeout if wait is None else wait
        self._closer = loop.call_later(delay, self._drop)

    def evict(self) -> None:
        """Fell too far behind (the fan-out's buffer cap): close with 1013; a client
        that does not read our Close within ``write_timeout`` is dropped."""
        wait = self.conn.limits.write_timeout if self.conn is not None else None
        self.close(TRY_AGAIN_LATER, "Too far behind; reconnect", wait=wait)

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.abort()

