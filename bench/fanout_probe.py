"""Server-side timestamps of rawjobs' fan-out, as a preload patch (bench/launch.py
``--preload bench.fanout_probe``, or ``$BENCH_RAWJOBS_PRELOAD``); rawjobs itself is not
edited. ``$BENCH_FANOUT_PROBE`` names the file written. ``bench/run.py --fanout-probe``
starts every rawjobs server with it and reports the split in the paced case.

Every broadcast a channel (a ``Fanout``) is asked for writes one line to that file
once its last subscriber was written to: ``channel`` (id of the Fanout), ``n``
(subscribers written), ``asked`` (``time.time()`` when ``broadcast`` was called),
``first`` and ``last`` (before the first write and after the last one, same clock as
the load client's receive times), ``cpu_first``/``cpu_last`` (the event loop
thread's CPU time then, ``time.thread_time()``), ``wait_first``/``wait_last`` (its
time spent runnable but waiting for a CPU, from /proc/self/schedstat) and ``slices``
(calls to ``_write``, i.e. slices), times in seconds.
With it, a paced run splits its spread into the server's writing (first write of any
channel to the last write of any channel) and what came after it (the kernel and the
load client reading), and the server's writing into time on a CPU and time waiting
for one. Its cost: two readings of the clocks per slice of 256 writes (~20 µs) and
one line per broadcast and channel.
"""

from __future__ import annotations

import json
import os
import time

from rawjobs.web import fanout

PATH = os.environ.get("BENCH_FANOUT_PROBE", "")
_fd = os.open(PATH, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if PATH else None
_original_write = fanout.Fanout._write
_original_init = fanout._Broadcast.__init__


def _init(self: fanout._Broadcast, encode: fanout.Encode) -> None:
    _original_init(self, encode)
    self.probe = {"asked": time.time(), "slices": 0}


def _clocks() -> tuple[float, float, float]:
    """Wall time, this thread's CPU time and its time spent waiting for a CPU
    (run queue, /proc/self/schedstat), all in seconds."""
    with open("/proc/self/schedstat", "rb") as f:
        waited = int(f.read().split()[1]) / 1e9
    return time.time(), time.thread_time(), waited


def _write(self: fanout.Fanout, op: fanout._Broadcast, count: int,
           writer: fanout.SocketWriter | None = None) -> int:
    probe = op.probe
    started = _clocks()
    written = _original_write(self, op, count, writer)
    ended = _clocks()
    if not probe["slices"]:
        probe["first"], probe["cpu_first"], probe["wait_first"] = started
    probe["last"], probe["cpu_last"], probe["wait_last"] = ended
    probe["slices"] += 1
    if op.done >= len(op.targets) and op.targets:
        probe.update(channel=id(self), n=len(op.targets))
        os.write(_fd, (json.dumps(probe) + "\n").encode())
    return written


if _fd is not None:  # a subclass with a __dict__: _Broadcast has __slots__
    fanout._Broadcast = type("_Broadcast", (fanout._Broadcast,), {"__init__": _init})
    fanout.Fanout._write = _write
