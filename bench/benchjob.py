"""The bench job, shared by rawjobs (bench/jobs.py) and the peer (bench/peer/app.py),
so both servers run exactly the same job.

Params: ``events`` progress events (0..100000), ``interval`` seconds between them
(0: a burst, yielding to the event loop once between events), ``gate``: a file path;
the job waits (polling every 20 ms) until that file exists before emitting, so
subscribers can connect to a running job first.

Each progress message is ``"emit=<time.time() with 6 decimals> step <i>"``: the load
client reads the emit time out of the frame to compute the latency.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

NAME = "bench"
DESCRIPTION = "Benchmark job: progress events in a burst or paced, with their emit time"
MARKER = "emit="
GATE_POLL = 0.02

Progress = Callable[[int, str], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


def emit_message(step: int) -> str:
    """The progress message of ``step``, stamped with the current time."""
    return f"{MARKER}{time.time():.6f} step {step}"


async def run(params: dict[str, Any], progress: Progress, sleep: Sleep) -> dict[str, Any]:
    """Wait for the gate, then emit ``events`` progress events ``interval`` apart."""
    gate = params.get("gate") or ""
    while gate and not os.path.exists(gate):
        await sleep(GATE_POLL)
    events, interval = params["events"], params["interval"]
    for step in range(events):
        await progress(step * 100 // events, emit_message(step))
        await sleep(interval)
    return {"events": events}
