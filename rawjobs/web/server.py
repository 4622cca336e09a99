"""The HTTP/1.1 server: ``asyncio.start_server``, one h11 connection per socket.

Keep-alive and pipelining (requests answered in order), HEAD, ``Date`` and ``Server``
headers, limits (head size, body size, head and idle timeouts, connection count) and
clean shutdown. A handler returns a ``Response``, or a ``Takeover`` that owns the
connection from then on (SSE, WebSocket). RFC 9112 is the wire format followed;
SERVER-NOTES.md section 1 is the checklist for driving h11.

h11 parses every request. Complete responses are written by hand (status line,
headers, body in one write: through h11 they cost more than the rest of a small
request), and the next request cycle starts with a fresh h11 state machine holding the
bytes the client sent beyond the last request (``encode_head`` also writes the answers
to refused requests). Stream heads (SSE), the WebSocket 101 and ``100 Continue`` still
go through h11. Each connection has one read
deadline, moved lazily (see ``_arm``), instead of a timer per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from .http import Request, Response, Takeover, error_response

log = logging.getLogger("rawjobs.http")

Handler = Callable[[Request], Awaitable["Response | Takeover"]]
SERVER_NAME = "rawjobs"
_WRITE_HIGH_WATER = 64 * 1024
_READ_SIZE = 64 * 1024
_MAX_LINGERING_REFUSALS = 64
# "HTTP/1.1 200 OK\r\n" for every status we may send (RFC 9112 section 4).
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in http.HTTPStatus}
# What a header value must not hold (RFC 9110 section 5.5): no response splitting.
_BAD_FIELD = re.compile(r"[\r\n\x00]")
# h11's own end-of-head pattern (h11/_receivebuffer.py), so that our view of where a
# head ends agrees with the parser's.
_BLANK_LINE = re.compile(rb"\n\r?\n")
# Empty lines (CRLF, or a lone LF) a server skips before a request line (RFC 9112
# section 2.2); a bare CR is not one.
_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
_CONTENT_LENGTH_LINE = re.compile(rb"^content-length[ \t]*:([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
# What a client is told when h11 rejects its request: fixed sentences, never the
# exception text (issue 5, point 7).
_FAULT_MESSAGES = {
    400: "Bad request",
    408: "Request took too long to arrive",
    413: "Request body too large",
    431: "Request header fields too large",
    501: "Transfer-Encoding not supported",
    505: "HTTP version not supported",
}


@dataclass
class Limits:
    """Server limits. Sizes in bytes, times in seconds (issue 5 gives the defaults).

    ``max_head``: request line plus headers (431 past it); ``max_body``: request body
    (413); ``head_timeout``: from a request's first byte to its complete head, and
    between body reads (408), also the idle time allowed before a connection's first
    request; ``keepalive_timeout``: idle time between requests (then closed quietly);
    ``write_timeout``: how long a write may wait for the client to read, and how long
    a closing connection may take to flush before it is aborted;
    ``max_connections``: open connections (503 past it)."""

    max_head: int = 16 * 1024
    max_body: int = 1024 * 1024
    head_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    write_timeout: float = 10.0
    max_connections: int = 10_000


class _DateCache:
    """The ``Date`` header value (RFC 9110 section 6.6.1), formatted once a second;
    ``lines`` is the ``Date`` and ``Server`` header lines of a hand-written head."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""
        self.lines = ""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode("ascii")
            self.lines = f"date: {self._value.decode()}\r\nserver: {SERVER_NAME}\r\n"
        return self._value

    def head_lines(self) -> str:
        self.get()
        return self.lines


_date = _DateCache()


def standard_headers() -> list[tuple[bytes, bytes]]:
    return [(b"date", _date.get()), (b"server", SERVER_NAME.encode())]


class ProtocolFault(Exception):
    """A request we answer with ``status`` and then close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HTTPServer:
    """Serves ``handler`` on ``asyncio.start_server``. ``connections`` holds the open
    connections; ``shutdown`` stops accepting and closes the idle ones."""

    def __init__(self, handler: Handler, limits: Limits | None = None) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.connections: set[HTTPConnection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._lingering = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port`` (port 0 picks a free one); returns the server."""
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=_READ_SIZE, backlog=4096
        )
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closing or len(self.connections) >= self.limits.max_connections:
            await self._refuse(reader, writer)
            return
        conn = HTTPConnection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            # Only the event loop's final cancel reaches here (shutdown ends every
            # connection first). The task ends quietly: on Python 3.11 asyncio's
            # streams log a traceback for a connection task that ends cancelled.
            conn.abort()
        finally:
            self.connections.discard(conn)

    def stop_accepting(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight
        finish (up to ``timeout`` seconds), then abort whatever is left and give
        their tasks up to a second to end."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        deadline = time.monotonic() + 1.0  # their tasks see the abort and end
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer 503 without reading the request, then close. The answer must not be
        lost to a reset (closing with unread request bytes sends RST, RFC 9112
        section 9.6), so up to ``_MAX_LINGERING_REFUSALS`` refused sockets at a time
        half-close and drop what the client sends for at most a second first."""
        reason = "Server is shutting down" if self.closing else "Server is at its connection limit"
        writer.write(_refusal(503, reason))
        if self._lingering >= _MAX_LINGERING_REFUSALS:
            writer.close()
            return
        self._lingering += 1
        try:
            with contextlib.suppress(Exception):
                writer.write_eof()
                async with asyncio.timeout(1.0):
                    while await reader.read(_READ_SIZE):
                        pass
        finally:
            self._lingering -= 1
            writer.close()


def _has_host(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request has a Host field, which HTTP/1.1 requires (RFC 9112 section
    3.2). h11 checks it on 1.1 requests only; a later 1.x minor version is served
    as 1.1 (RFC 9110 section 2.5), so it needs one too."""
    return any(name == b"host" for name, _ in headers)


def _valid_target(request: Request) -> bool:
    """Whether the request-target has one of its four forms (RFC 9112 section 3.2):
    origin-form (an absolute-form one is already reduced to it), asterisk-form for
    OPTIONS, authority-form for CONNECT. No form holds a fragment. An invalid one
    gets 400 (RFC 9112 section 3)."""
    if "#" in request.target:
        return False
    if request.path[:1] == "/":
        return True
    return request.method == "CONNECT" or (request.method == "OPTIONS"
                                           and request.target == "*")


def _skip_empty_lines(data: bytes) -> bytes:
    """``data`` without the empty lines a server ignores before a request line (RFC
    9112 section 2.2); the regex runs only when ``data`` starts with one."""
    if data[:1] in (b"\r", b"\n"):
        return data[_EMPTY_LINES.match(data).end():]
    return data


def _refusal(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` error response (no request was read)."""
    response = error_response(status, message)
    return encode_head(response, keep_alive=False) + response.body


def encode_head(response: Response, keep_alive: bool, chunked: bool = True) -> bytes:
    """The head of a complete response, written by hand (RFC 9112 sections 4-6):
    status line, ``Date``, ``Server``, the response's headers, its framing (its
    length; for the head of a stream answered to HEAD, ``chunked`` when the stream
    would be, i.e. on HTTP/1.1 with the connection kept), ``Connection: close``
    unless ``keep_alive``. Raises ValueError for a header holding CR, LF or NUL
    (response splitting, RFC 9110 section 5.5) or one that is not Latin-1."""
    status = response.status
    parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n", _date.head_lines()]
    if response.content_type:
        parts.append(f"content-type: {response.content_type}\r\n")
    for name, value in response.headers:
        if _BAD_FIELD.search(name) or _BAD_FIELD.search(value):
            raise ValueError(f"response header {name!r} holds CR, LF or NUL")
        parts.append(f"{name}: {value}\r\n")
    if status not in (204, 304):
        if response.known_length:
            parts.append(f"content-length: {len(response.body)}\r\n")
        elif keep_alive and chunked:
            parts.append("transfer-encoding: chunked\r\n")
    if not keep_alive:
        parts.append("connection: close\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


class HTTPConnection:
    """One client connection: reads requests with h11, dispatches them, writes the
    responses. Takeovers use ``start_stream``, ``write`` and ``transport``."""

    __slots__ = ("server", "limits", "reader", "writer", "transport", "h11", "client",
                 "idle", "_close_when_idle", "_requests", "_head", "_task", "_deadline",
                 "_timer", "_timer_when", "_expired")

    def __init__(self, server: HTTPServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        self.client = writer.get_extra_info("peername")
        self.idle = True
        self._close_when_idle = False
        self._requests = 0
        self._head = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._expired = False

    # -- the request loop --------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            await self._serve_requests()
        except ProtocolFault as fault:
            await self._answer_fault(fault.status, fault.message)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:  # a write or drain the client did not let finish
            log.debug("write to %s timed out; closing", self.client)
        except Exception:
            log.exception("connection from %s failed", self.client)
        finally:
            await self.close()

    async def _serve_requests(self) -> None:
        while True:
            request = await self._read_request()
            if request is None:
                return
            self.idle = False
            result = await self._dispatch(request)
            if not isinstance(result, Response):
                del request  # a stream can last hours: keep only what it needs
                self._stop_timer()
                await result.serve(self)
                return
            keep_alive = self._keep_alive(request)
            await self.send_response(result, request.method == "HEAD", keep_alive)
            if not keep_alive:
                return
            self._next_cycle()
            self.idle = True

    async def _dispatch(self, request: Request) -> Response | Takeover:
        try:
            return await self.server.handler(request)
        except Exception:
            log.exception("handler failed: %s %s", request.method, request.path)
            return error_response(500, "Internal server error")

    def _keep_alive(self, request: Request) -> bool:
        """Whether the connection serves another request after this response: the
        whole request was read, the client keeps the connection (HTTP/1.1 without
        ``Connection: close``, RFC 9112 section 9.3), and we are not closing. A
        declined upgrade or a CONNECT (``MIGHT_SWITCH_PROTOCOL``) is answered like
        any request; h11 then leaves the close decision to us, made on the request."""
        if self._close_when_idle or self.server.closing:
            return False
        state = self.h11.their_state
        if state is h11.MIGHT_SWITCH_PROTOCOL:
            return request.http_version != "1.0" and "close" not in (
                token.lower() for token in request.header_values("connection"))
        return state is h11.DONE

    def _next_cycle(self) -> None:
        """Start the next request cycle after a hand-written response: a fresh h11
        state machine fed with what the client sent beyond this request (pipelined
        bytes, and its end of stream if it half-closed)."""
        pending, closed = self.h11.trailing_data
        pending = _skip_empty_lines(pending)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        if pending:
            self.h11.receive_data(pending)
        if closed:
            self.h11.receive_data(b"")

    async def _read_request(self) -> Request | None:
        """The next complete request, body included; None when the client is done
        or idle too long. Raises ProtocolFault for a request we must refuse."""
        idle_limit = self.limits.keepalive_timeout if self._requests else self.limits.head_timeout
        self._head = bytearray(self.h11.trailing_data[0])
        try:
            event = await self._next_event(idle_limit, first=True)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise ProtocolFault(400, "Malformed request")
            if not event.http_version.startswith(b"1."):  # HTTP/2's preface, 0.9, 3.0
                raise ProtocolFault(505, _FAULT_MESSAGES[505])  # RFC 9110 section 15.6.6
            if event.http_version > b"1.1" and not _has_host(event.headers):
                raise ProtocolFault(400, "Bad request")  # served as 1.1: Host is a must
            self._check_raw_head()
        finally:
            self._head = bytearray()
        self._requests += 1
        request = Request.from_target(
            event.method.decode("ascii"), event.target.decode("latin-1"),
            list(event.headers), event.http_version.decode("ascii"), self.client,
        )
        if not _valid_target(request):
            raise ProtocolFault(400, "Bad request")
        self._check_framing(request)
        request.body = await self._read_body(request)
        return request

    def _check_raw_head(self) -> None:
        """Checks the parsed request cannot show, made on the head's bytes.

        h11 folds repeated identical ``Content-Length`` fields (and a list value such
        as ``5, 5``) into one, so the ``Request`` it returns cannot tell them from a
        single field; RFC 9112 section 6.3 lets us reject them, and issue 5 says we
        do (400). h11 also checks its size limit only on a head still incomplete, so a
        larger head arriving whole in one read would pass. ``_head`` holds the bytes
        of this head as they arrived: what h11 had not yet parsed when the request
        cycle began (``trailing_data``: pipelined bytes), then every chunk fed to
        h11 until it produced the ``Request``. The head is that buffer up to the
        first blank line, found with h11's own pattern, so both agree on its end.
        Raises ProtocolFault 431 or 400."""
        end = _BLANK_LINE.search(self._head)
        head = self._head if end is None else self._head[: end.end()]
        if len(head) > self.limits.max_head:
            raise ProtocolFault(431, _FAULT_MESSAGES[431])
        values = _CONTENT_LENGTH_LINE.findall(head)
        if len(values) > 1 or any(b"," in v for v in values):
            raise ProtocolFault(400, "Duplicate Content-Length")

    def _check_framing(self, request: Request) -> None:
        names = [k for k, _ in request.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise ProtocolFault(400, "Both Content-Length and Transfer-Encoding given")
        length = request.header("content-length")
        if length is not None and int(length) > self.limits.max_body:
            raise ProtocolFault(413, f"Request body over {self.limits.max_body} bytes")

    async def _read_body(self, request: Request) -> bytes:
        if self.h11.they_are_waiting_for_100_continue:
            self.write(self.h11.send(h11.InformationalResponse(
                status_code=100, headers=standard_headers(), reason=b"Continue")))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(self.limits.head_timeout)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body:
                    raise ProtocolFault(413, f"Request body over {self.limits.max_body} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise ProtocolFault(400, "Incomplete request body")

    async def _next_event(self, timeout: float, first: bool = False) -> h11.Event | None:
        """The next h11 event. ``first``: waiting for a new request, where running out
        of ``timeout`` with nothing received closes quietly (None), and a started head
        has ``head_timeout`` from its first byte to complete (408); a head begun in
        bytes pipelined behind the last request, from the start of its cycle."""
        deadline = time.monotonic() + timeout
        got_bytes = False
        if first and self._head:  # a head begun with the last request (pipelined)
            got_bytes = True
            deadline = time.monotonic() + self.limits.head_timeout
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise ProtocolFault(status, _FAULT_MESSAGES.get(status, "Bad request")) from None
            if event is not h11.NEED_DATA:
                return event
            if self._close_when_idle and first and not got_bytes:
                return None
            data = await self._read_until(deadline)
            if data is None:
                if first and not got_bytes:
                    return None
                raise ProtocolFault(408, "Request took too long to arrive")
            if first and data and not self._head:
                data = _skip_empty_lines(data)
                if not data:  # nothing but empty lines so far
                    continue
            if first and data:
                if not got_bytes:
                    got_bytes = True
                    deadline = time.monotonic() + self.limits.head_timeout
                self._head += data
            self.h11.receive_data(data)

    # -- the read deadline ---------------------------------------------------------

    async def _read_until(self, deadline: float) -> bytes | None:
        """Read what the client sends (b"" at its end of stream), or None if nothing
        came before ``deadline`` (``time.monotonic()`` seconds)."""
        if time.monotonic() >= deadline:
            return None
        self._arm(deadline)
        try:
            return await self.reader.read(_READ_SIZE)
        except asyncio.CancelledError:
            if not self._expired:
                raise
            self._expired = False
            self._task.uncancel()  # type: ignore[union-attr]
            return None
        finally:
            self._deadline = None

    def _arm(self, deadline: float) -> None:
        """Set the read deadline. One timer per connection, moved lazily: a timer due
        before the deadline finds it later and waits again (``_on_timer``), so a busy
        keep-alive connection costs about one timer per timeout period, not one per
        read; a timer due after it is moved earlier."""
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = deadline
            self._timer = asyncio.get_running_loop().call_later(
                deadline - time.monotonic(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # not reading now: the next read arms a new timer
        if deadline > time.monotonic():
            self._arm(deadline)
            return
        self._deadline = None
        self._expired = True
        if self._task is not None:
            self._task.cancel()  # lands in the pending read: see _read_until

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- writing -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and not self.transport.is_closing():
            self.transport.write(data)

    async def flush(self) -> None:
        """Wait (up to ``write_timeout``) while the write buffer is over 64 KiB."""
        if self.transport.get_write_buffer_size() <= _WRITE_HIGH_WATER:
            return
        async with asyncio.timeout(self.limits.write_timeout):
            await self.writer.drain()

    async def send_response(self, response: Response, head_only: bool = False,
                            keep_alive: bool = True) -> None:
        """Write a complete response in one write (RFC 9112 section 6), head and
        body: ``Content-Length`` from the body unless the status forbids a body (204,
        304); no body bytes for HEAD; ``Connection: close`` unless ``keep_alive``.
        Written by hand, not through h11 (which costs more than the rest of a small
        request); the request cycle then restarts with a fresh h11 state machine
        (``_next_cycle``). A header that cannot be sent (CR, LF or NUL in it, or
        not Latin-1) turns the response into a 500, logged."""
        chunked = self.h11.their_http_version != b"1.0"
        try:
            data = encode_head(response, keep_alive, chunked)
        except ValueError:
            log.exception("response to %s has a header that cannot be sent", self.client)
            response = error_response(500, "Internal server error")
            data = encode_head(response, keep_alive, chunked)
        no_body = head_only or response.status in (204, 304)
        if response.body and not no_body:
            data += response.body
        self.write(data)
        await self.flush()

    def start_stream(self, status: int, headers: list[tuple[str, str]]) -> bool:
        """Send the head of a streamed response of unknown length (RFC 9112 section
        6.3: chunked for HTTP/1.1, close-delimited for HTTP/1.0), with ``Connection:
        close``: the connection ends with the stream, so a pipelined request is not
        read (RFC 9112 section 9.6). Returns True when the body is chunked, i.e. each
        write must be framed as a chunk."""
        raw = standard_headers() + [(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in headers] + [(b"connection", b"close")]
        self.write(self.h11.send(h11.Response(
            status_code=status, headers=raw,
            reason=http.HTTPStatus(status).phrase.encode("ascii"))))
        return self.h11.their_http_version != b"1.0"

    def end_stream(self) -> None:
        """Finish a streamed response (the last chunk for chunked framing)."""
        if self.h11.our_state is h11.SEND_BODY:
            self.write(self.h11.send(h11.EndOfMessage()))

    # -- closing -------------------------------------------------------------------

    async def _answer_fault(self, status: int, message: str) -> None:
        """Answer a refused request with ``Connection: close`` and close gracefully,
        reading (and dropping) what the client still sends for a moment so the answer
        is not lost to a reset (SERVER-NOTES.md section 1, "Bad requests")."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing sent yet
            self.write(_refusal(status, message))
        await self.linger()

    async def close(self) -> None:
        """Close gracefully, giving the client at most ``write_timeout`` seconds to
        take what is still buffered; then abort, so no closing write waits forever."""
        self._stop_timer()
        self.abort_if_open(graceful=True)
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await self.writer.wait_closed()
        except TimeoutError:
            self.transport.abort()
        except Exception:  # the connection was lost with an error: already closed
            pass

    async def linger(self, seconds: float = 1.0) -> None:
        """Half-close our side, drain what the client still sends, then close."""
        if self.transport.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            if self.transport.can_write_eof():
                self.transport.write_eof()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(seconds):
                while await self.reader.read(_READ_SIZE):
                    pass

    def end_reads(self) -> None:
        """Make a pending or later read of this connection return b"" (end of
        stream), as if the client had closed: a takeover waiting on its client ends.
        Call after closing the transport, so no more data arrives."""
        self.reader.feed_eof()

    def close_when_idle(self) -> None:
        """Shutdown: close now if waiting for a request, else after this response."""
        self._close_when_idle = True
        if self.idle:
            self.abort_if_open(graceful=True)

    def abort_if_open(self, graceful: bool = True) -> None:
        if not self.transport.is_closing():
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    def abort(self) -> None:
        self.abort_if_open(graceful=False)
