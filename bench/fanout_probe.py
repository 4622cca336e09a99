"""Server-side timestamps of rawjobs' fan-out, as a preload patch (bench/launch.py
``--preload bench.fanout_probe``, or ``$BENCH_RAWJOBS_PRELOAD``); rawjobs itself is not
edited. ``$BENCH_FANOUT_PROBE`` names the file written. ``bench/run.py --fanout-probe``
starts every rawjobs server with it and reports the split in the paced case.

Every broadcast a channel (a ``Fanout``) is asked for writes one line to that file
once its last subscriber was written to: ``channel`` (id of the Fanout), ``n``
(subscribers written), ``asked`` (``time.time()`` when ``broadcast`` was called),
``first`` and ``last`` (before the first write and after the last one, same clock as
the load client's receive times) and ``slices`` (calls to ``_write``, i.e. slices).
With it, a paced run splits its spread into the server's writing (first write of any
channel to the last write of any channel) and what came after it (the kernel and the
load client reading). Its cost: two clock readings per slice of 256 writes and one
line per broadcast and channel.
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
    self.probe = [time.time(), 0.0, 0.0, 0]  # asked, first, last, slices


def _write(self: fanout.Fanout, op: fanout._Broadcast, count: int) -> int:
    probe = op.probe
    started = time.time()
    written = _original_write(self, op, count)
    if not probe[1]:
        probe[1] = started
    probe[2] = time.time()
    probe[3] += 1
    if op.done >= len(op.targets) and _fd is not None and op.targets:
        os.write(_fd, (json.dumps({"channel": id(self), "n": len(op.targets),
                                   "asked": probe[0], "first": probe[1], "last": probe[2],
                                   "slices": probe[3]}) + "\n").encode())
    return written


if _fd is not None:  # a subclass with a __dict__: _Broadcast has __slots__
    fanout._Broadcast = type("_Broadcast", (fanout._Broadcast,), {"__init__": _init})
    fanout.Fanout._write = _write
