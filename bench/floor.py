"""The ``socket.send()`` floor: what writing one pre-encoded 250-byte WebSocket frame
to each of N loopback subscribers costs in CPU when nothing else happens. Nothing
in Python can fan out for less.

    python bench/floor.py --subscribers 1000

prints ``{"port": P}``; accepts N WebSocket handshakes (a 101 and one first frame
each, so the load client sees them as connected), prints ``{"connected": N}``; then
each ``go ROUNDS`` line on stdin runs the loop ``for frame in frames: for sock in
socks: sock.send(frame)`` over ROUNDS frames (blocking sockets: a full buffer waits
without using CPU) and prints ``{"messages", "cpu_s", "user_s", "system_s", "wall_s",
"us_per_message"}`` (CPU: this process's user + system time, from getrusage).
``go ROUNDS nodelay`` sets TCP_NODELAY on every socket first, as asyncio does on
its transports: each send is then its own TCP segment, where plain sockets let Nagle
merge the sends that follow an unacknowledged one. ``pace ROUNDS INTERVAL`` sends
ROUNDS frames stamped with their emit time, INTERVAL seconds apart (the spread floor
of the paced case), and prints ``{"messages", "sends"}``: per frame, its emit time,
the time after its last send, and the CPU time and run-queue wait of the loop.
``pace ROUNDS INTERVAL asyncio`` does the same through asyncio's own transports (the
sockets handed to a selector event loop, each frame written with ``transport.write``):
the spread floor of any server on asyncio's transports; it leaves the sockets to that
loop, so it must be the last command. ``pace ROUNDS INTERVAL threads`` sends from
this thread and one more at once, each taking 8 sockets at a time (as rawjobs'
``--fanout-threads 1`` does): the spread floor with two cores writing. ``quit``
ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import resource
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

FRAME_SIZE = 250
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(seq: int, stamp: str = "") -> bytes:
    """A 250-byte unmasked text frame (4-byte header + JSON padded to 246 bytes);
    ``stamp`` goes at the start of the message (the load client's emit marker)."""
    head = '{"type":"job_progress","data":{"job_id":1,"percent":50,"message":"' + stamp
    tail = f'"}},"seq":{seq}}}'
    pad = "x" * (FRAME_SIZE - 4 - len(head) - len(tail))
    payload = (head + pad + tail).encode()
    return bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload


def handshake(sock: socket.socket) -> None:
    """Read the upgrade request, answer 101 and a first message."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        request += chunk
    key = b""
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                 + frame(0))


def accept_all(listener: socket.socket, count: int) -> list[socket.socket]:
    socks = []
    while len(socks) < count:
        sock, _ = listener.accept()
        sock.settimeout(30)
        handshake(sock)
        sock.settimeout(None)
        socks.append(sock)
    return socks


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def send_loop(socks: list[socket.socket], rounds: int, nodelay: bool) -> dict:
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
    frames = [frame(seq) for seq in range(1, rounds + 1)]
    (user, system), wall = cpu_seconds(), time.perf_counter()
    for data in frames:
        for sock in socks:
            sent = sock.send(data)
            if sent < FRAME_SIZE:
                sock.sendall(data[sent:])
    wall = time.perf_counter() - wall
    user, system = (b - a for a, b in zip((user, system), cpu_seconds(), strict=True))
    messages = rounds * len(socks)
    return {"messages": messages, "cpu_s": user + system, "user_s": user, "system_s": system,
            "wall_s": wall, "us_per_message": (user + system) / messages * 1e6}


def pace(socks: list[socket.socket], rounds: int, interval: float,
         two_threads: bool = False) -> dict:
    """``rounds`` frames ``interval`` seconds apart, each stamped with its emit time
    (encoded once, then sent to every socket, TCP_NODELAY as asyncio has it): the
    first-to-last spread of the send loop plus the load client's reading.
    ``two_threads``: a second thread sends at the same time, both taking 8 sockets
    at a time from the same list until none are left."""
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_chunks(data: bytes, chunks: itertools.count) -> None:
        for chunk in chunks:
            part = socks[chunk * 8:(chunk + 1) * 8]
            if not part:
                return
            for sock in part:
                sock.sendall(data)

    with ThreadPoolExecutor(1) as pool:
        def send_all(data: bytes) -> None:
            chunks = itertools.count()
            other = pool.submit(send_chunks, data, chunks) if two_threads else None
            send_chunks(data, chunks)
            if other is not None:
                other.result()

        sends = []
        for seq in range(1, rounds + 1):
            sends.append(paced_send(seq, send_all))
            time.sleep(interval)
    return {"messages": rounds * len(socks), "sends": sends}


def pace_asyncio(socks: list[socket.socket], rounds: int, interval: float) -> dict:
    """As ``pace``, through asyncio: the sockets become asyncio transports (which set
    TCP_NODELAY) and each stamped frame is written with ``transport.write`` to every
    one, ``interval`` seconds apart, from a running event loop."""
    return asyncio.run(_pace_asyncio(socks, rounds, interval))


async def _pace_asyncio(socks: list[socket.socket], rounds: int, interval: float) -> dict:
    loop = asyncio.get_running_loop()
    transports = [(await loop.connect_accepted_socket(asyncio.Protocol, sock))[0]
                  for sock in socks]

    def write_all(data: bytes) -> None:
        for transport in transports:
            transport.write(data)

    sends = []
    for seq in range(1, rounds + 1):
        sends.append(paced_send(seq, write_all))
        await asyncio.sleep(interval)
    return {"messages": rounds * len(socks), "sends": sends}


def paced_send(seq: int, write: Callable[[bytes], None]) -> list[float]:
    """Frame ``seq`` stamped with its emit time, handed to ``write``: ``[emit time,
    time after the write, CPU seconds, seconds waiting for a CPU]``."""
    emit, cpu, waited = time.time(), time.thread_time(), run_queue_wait()
    write(frame(seq, f"emit={emit:.6f} "))
    return [emit, time.time(), time.thread_time() - cpu, run_queue_wait() - waited]


def run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (schedstat)."""
    with open("/proc/self/schedstat", "rb") as f:
        return int(f.read().split()[1]) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subscribers", type=int, required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.create_server(("127.0.0.1", args.port), backlog=4096)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    socks = accept_all(listener, args.subscribers)
    print(json.dumps({"connected": len(socks)}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "pace":
            rounds, interval, writer = int(words[1]), float(words[2]), words[3:]
            result = (pace_asyncio(socks, rounds, interval) if writer == ["asyncio"] else
                      pace(socks, rounds, interval, two_threads=writer == ["threads"]))
            print(json.dumps(result), flush=True)
        if words[0] == "go":
            nodelay = words[2:] == ["nodelay"]
            print(json.dumps(send_loop(socks, int(words[1]), nodelay)), flush=True)


if __name__ == "__main__":
    main()
