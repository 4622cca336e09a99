"""Load client: many SSE and/or WebSocket subscribers on raw asyncio Protocols.

A subscriber is a Protocol with a few counters (a few KiB per connection with its
transport and socket), so the client is not what is measured. It answers WebSocket
pings (the application-level ``{"type": "ping"}`` needs no answer), parses frames
minimally (WebSocket frame headers; SSE events by their blank line), and for every
message carrying an emit time (``emit=<unix time>``, see bench/benchjob.py) records
the pair (emit time, receive time). Connections are closed with a reset
(SO_LINGER 0) so no TIME_WAIT piles up; at most ``--in-flight`` connects (200) are
in flight; the soft fd limit is raised to the hard one.

The receive path does as little as it can: once a subscriber is connected (its
first message arrived), ``data_received`` takes one clock reading and appends
(subscriber, time, bytes) to a log, nothing more. The log is parsed later
(``settle``: before every ``count``, ``dump`` and ``reset``, when a connection is
lost, and once a second in standalone mode), exactly as it would have been on
arrival: a message's receive time is that of the ``data_received`` call whose bytes
completed it. Parsing on arrival cost ~3.5 µs of Python per message, the log
append ~0.3 µs; on a 2-core machine that CPU was taken from the server under test.

Standalone::

    python bench/loadclient.py --port 5001 --ws 1000 --duration 30
    python bench/loadclient.py --port 5001 --sse 1000 --sse-path /api/jobs/1/progress

prints one JSON report (connect times, messages, latency p50/p99/max in ms).

``--control`` (used by bench/run.py): commands on stdin, one a line, each answered
by one JSON line on stdout: ``connect [ws|sse]`` (every subscriber not connected yet,
or those of one kind), ``count``, ``reset``, ``dump PATH [ws|sse]`` (writes the
(emit, receive) pairs as float64, of every subscriber or of one kind), ``close``
(then exits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time
from array import array
from collections import Counter

_time = time.time
MARKER = b"emit="
STAMP = 17  # len("1764446400.123456")
LINGER_RESET = struct.pack("ii", 1, 0)
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Totals:
    """Counters of one client process. ``pairs``: per kind of subscriber, emit,
    receive, emit, receive...; ``log``: what arrived and is not parsed yet,
    (subscriber, receive time, bytes)."""

    def __init__(self) -> None:
        self.pairs = {"ws": array("d"), "sse": array("d")}
        self.lost = Counter()
        self.log: list[tuple[Subscriber, float, bytes]] = []
        self.settling = False

    def settle(self) -> None:
        """Parse everything logged, in arrival order, with its receive times. The
        list stays the same object: subscribers hold its ``append``."""
        if self.settling:
            return
        self.settling = True
        try:
            for sub, now, data in self.log:
                sub.parse(data, now)
            self.log.clear()
        finally:
            self.settling = False

    def reset(self) -> None:
        self.settle()
        for pairs in self.pairs.values():
            del pairs[:]
        self.lost = Counter()


class Subscriber(asyncio.Protocol):
    """One connection: sends the request, checks the status line, then hands the
    body to ``feed``. ``ready`` is resolved by the first message."""

    kind = ""
    expect = 0

    def __init__(self, totals: Totals, request: bytes, ready: asyncio.Future) -> None:
        self.totals = totals
        self.request = request
        self.ready: asyncio.Future | None = ready
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head = True
        self.closing = False
        self.messages = 0
        self.marked = 0
        self.log = None  # totals.log.append once connected: parse later

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.log is not None:  # connected: stamp, keep the bytes, parse later
            self.log((self, _time(), data))
        else:
            self.parse(data, _time())

    def parse(self, data: bytes, now: float) -> None:
        """``data``, which arrived at ``now``: the response head, then messages."""
        if self.head:
            data = self._read_head(data)
            if not data:
                return
        self.feed(data, now)

    def _read_head(self, data: bytes) -> bytes:
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return b""
        self.head, self.buf = False, b""
        if buf[9:12] != str(self.expect).encode():
            self._fail(f"status {buf[9:12].decode(errors='replace')}")
            return b""
        return buf[end + 4:]

    def got_message(self) -> None:
        if self.ready is not None:
            if not self.ready.done():
                self.ready.set_result(None)
            self.ready = None
            self.log = self.totals.log.append  # from now on, parse later

    def record(self, buf: bytes, start: int, end: int, now: float) -> None:
        """Record the emit time of a message in ``buf[start:end]``, if it has one."""
        i = buf.find(MARKER, start, end)
        if i >= 0:
            self.marked += 1
            pairs = self.totals.pairs[self.kind]
            pairs.append(float(buf[i + 5:i + 5 + STAMP]))
            pairs.append(now)

    def _fail(self, why: str) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.totals.settle()  # what arrived before the end, first
        if not self.closing:
            self.totals.lost[self.kind] += 1
            self._fail("connection lost")
        self.closing = True

    def close(self) -> None:
        """Close with a reset (SO_LINGER 0 was set on connect)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def feed(self, data: bytes, now: float) -> None:
        raise NotImplementedError


class WSSubscriber(Subscriber):
    """A /ws/queue client: counts text frames, answers pings with a (masked) pong."""

    kind = "ws"
    expect = 101

    def feed(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        i, n = 0, len(buf)
        while n - i >= 2:
            op, size, h = buf[i] & 0x0F, buf[i + 1] & 0x7F, 2
            if size == 126:
                if n - i < 4:
                    break
                size, h = int.from_bytes(buf[i + 2:i + 4], "big"), 4
            elif size == 127:
                if n - i < 10:
                    break
                size, h = int.from_bytes(buf[i + 2:i + 10], "big"), 10
            end = i + h + size
            if end > n:
                break
            if op <= 2:
                self.messages += 1
                self.record(buf, i + h, end, now)
                if self.ready is not None:
                    self.got_message()
            else:
                self._control(op, buf[i + h:end])
            i = end
        self.buf = buf[i:]

    def _control(self, op: int, payload: bytes) -> None:
        if self.closing:
            return
        if op == 0x9:  # ping: pong with the same payload, masked with a zero key
            self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        elif op == 0x8:  # close from the server
            self.transport.write(bytes((0x88, 0x80 | len(payload[:2])))
                                 + b"\0\0\0\0" + payload[:2])
            self.totals.lost["ws-close"] += 1
            self.closing = True
            self.close()


class SSESubscriber(Subscriber):
    """An SSE client: an event ends with a blank line; chunk-size lines between
    events are skipped by looking only for ``\\ndata:`` and the emit marker."""

    kind = "sse"
    expect = 200

    def feed(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        last = buf.rfind(b"\n\n")
        if last < 0:
            self.buf = buf
            return
        count = buf.count(b"\ndata:", 0, last)
        if count:
            self.messages += count
            start = 0
            while True:
                end = buf.find(b"\n\n", start, last + 2)
                if end < 0:
                    break
                self.record(buf, start, end, now)
                start = end + 2
            if self.ready is not None:
                self.got_message()
        self.buf = buf[last + 2:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.totals.settle()  # what arrived before the end, first
        if not self.closing:  # the server ends a stream after its terminal event
            self.totals.lost["sse-ended"] += 1
        self.closing = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost"))


class LoadClient:
    """``ws`` WebSocket and ``sse`` SSE subscribers to ``host:port``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.totals = Totals()
        self.subs: list[Subscriber] = []
        self.connect_times: list[float] = []
        self.errors: Counter = Counter()
        self.opened = {"ws": 0, "sse": 0}

    def _request(self, kind: str) -> bytes:
        a = self.args
        host = f"Host: {a.host}:{a.port}\r\n"
        if kind == "ws":
            return (f"GET {a.ws_path} HTTP/1.1\r\n{host}Upgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        return (f"GET {a.sse_path} HTTP/1.1\r\n{host}"
                "Accept: text/event-stream\r\n\r\n").encode()

    async def connect(self, kind: str = "") -> dict:
        """Open every subscriber not opened yet, or those of ``kind`` ("ws", "sse"),
        at most ``in_flight`` at once; each counts as connected when its first
        message (queue_state / status) has arrived. Figures are of this call."""
        started = time.perf_counter()
        gate = asyncio.Semaphore(self.args.in_flight)
        kinds = []
        for cls, wanted in ((WSSubscriber, self.args.ws), (SSESubscriber, self.args.sse)):
            if kind in ("", cls.kind):
                kinds += [cls] * (wanted - self.opened[cls.kind])
                self.opened[cls.kind] = wanted
        subs, errors = len(self.subs), sum(self.errors.values())
        self.connect_times = []
        await asyncio.gather(*(self._open(cls, gate) for cls in kinds))
        return {"connected": len(self.subs) - subs,
                "failed": sum(self.errors.values()) - errors,
                "errors": dict(self.errors), "wall_s": time.perf_counter() - started,
                "connect_ms": summary([t * 1000 for t in self.connect_times])}

    async def _open(self, cls: type[Subscriber], gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        request = self._request(cls.kind)
        async with gate:
            started = time.perf_counter()
            ready = loop.create_future()
            try:
                async with asyncio.timeout(self.args.connect_timeout):
                    _, sub = await loop.create_connection(
                        lambda: cls(self.totals, request, ready), self.args.host, self.args.port)
                    await ready
            except (OSError, TimeoutError) as exc:
                self.errors[type(exc).__name__ + (f" {exc.errno}" if getattr(exc, "errno", None)
                                                  else "")] += 1
                return
            self.connect_times.append(time.perf_counter() - started)
            self.subs.append(sub)

    def count(self) -> dict:
        self.totals.settle()
        by_kind: dict[str, list[int]] = {}
        for sub in self.subs:
            by_kind.setdefault(sub.kind, []).append(sub.marked)
        return {"messages": sum(s.messages for s in self.subs),
                "marked": sum(s.marked for s in self.subs),
                "pairs": sum(len(p) for p in self.totals.pairs.values()) // 2,
                "lost": dict(self.totals.lost),
                "marked_min": {k: min(v) for k, v in by_kind.items()},
                "marked_max": {k: max(v) for k, v in by_kind.items()}}

    def reset(self) -> dict:
        self.totals.reset()
        for sub in self.subs:
            sub.messages = sub.marked = 0
        return {"reset": True}

    def dump(self, path: str, kind: str = "") -> dict:
        """Write the (emit, receive) pairs, of ``kind`` or all, as float64."""
        self.totals.settle()
        dumped = 0
        with open(path, "wb") as f:
            for name, pairs in self.totals.pairs.items():
                if kind in ("", name):
                    pairs.tofile(f)
                    dumped += len(pairs) // 2
        return {"dumped": dumped, "path": path}

    def close(self) -> dict:
        for sub in self.subs:
            sub.close()
        closed, self.subs = len(self.subs), []
        return {"closed": closed}


def summary(values: list[float]) -> dict:
    """p50/p99/max of ``values`` (empty: zeros)."""
    if not values:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    values = sorted(values)
    n = len(values)
    return {"n": n, "p50": values[n // 2], "p99": values[min(n - 1, int(n * 0.99))],
            "max": values[-1]}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def control_loop(client: LoadClient) -> None:
    """Serve commands from stdin until ``close`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := (await reader.readline()).decode().split():
        command, rest = line[0], line[1:]
        if command == "connect":
            answer = await client.connect(*rest[:1])
        elif command == "dump":
            answer = client.dump(*rest[:2])
        elif command in ("count", "reset", "close"):
            answer = getattr(client, command)()
        else:
            answer = {"error": f"unknown command {command}"}
        print(json.dumps(answer), flush=True)
        if command == "close":
            return
    client.close()


async def standalone(client: LoadClient) -> None:
    report = {"connect": await client.connect()}
    deadline = time.monotonic() + client.args.duration
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(1.0, left))
        client.totals.settle()  # answers WebSocket pings too
    report.update(client.count())
    pairs = [v for p in client.totals.pairs.values() for v in p]
    report["latency_ms"] = summary([(pairs[i + 1] - pairs[i]) * 1000
                                    for i in range(0, len(pairs), 2)])
    client.close()
    print(json.dumps(report, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SSE/WebSocket load client (see module doc)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ws", type=int, default=0, help="WebSocket subscribers")
    p.add_argument("--sse", type=int, default=0, help="SSE subscribers")
    p.add_argument("--ws-path", default="/ws/queue")
    p.add_argument("--sse-path", default="/api/jobs/1/progress")
    p.add_argument("--in-flight", type=int, default=200, help="connects in flight at most")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--duration", type=float, default=10.0,
                   help="standalone: seconds to listen after connecting")
    p.add_argument("--control", action="store_true", help="take commands on stdin")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    client = LoadClient(args)
    run = control_loop(client) if args.control else standalone(client)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run)
    else:
        asyncio.run(run)


if __name__ == "__main__":
    main()
