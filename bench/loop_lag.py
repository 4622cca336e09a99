"""Event-loop lag while CPU-bound jobs run (issue 4: three ``prime`` jobs at their
maximum must keep the lag under 20 ms).

Runs a whole rawjobs App in this process (in-memory store), keeps three ``prime``
jobs at limit 100000 running for ``--seconds``, and measures the loop's lag with a
ticker that asks to sleep 5 ms and records how late it wakes up.

    python bench/loop_lag.py [--seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from rawjobs.app import App, Settings

TICK = 0.005


async def measure_lag(stop: asyncio.Event) -> list[float]:
    lags = []
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append(max(0.0, time.perf_counter() - before - TICK))
    return lags


async def keep_primes_running(app: App, stop: asyncio.Event) -> int:
    """Keep three prime jobs at limit 100000 running; returns how many finished."""
    finished = 0
    while not stop.is_set():
        if app.queue.stats()["running"] + app.queue.stats()["pending"] < 3:
            await app.queue.create("prime", {"limit": 100000})
        else:
            await asyncio.sleep(0.01)
        finished = app.queue.stats()["completed"]
    return finished


async def main(seconds: float) -> dict:
    app = App(Settings(db=":memory:", port=0, concurrency=3))
    await app.start()
    try:
        stop = asyncio.Event()
        lag_task = asyncio.create_task(measure_lag(stop))
        load_task = asyncio.create_task(keep_primes_running(app, stop))
        await asyncio.sleep(seconds)
        stop.set()
        lags, finished = await lag_task, await load_task
    finally:
        await app.stop()
    lags_ms = sorted(lag * 1000 for lag in lags)
    return {
        "prime_jobs_completed": finished,
        "samples": len(lags_ms),
        "lag_ms_p50": round(statistics.median(lags_ms), 2),
        "lag_ms_p99": round(lags_ms[int(len(lags_ms) * 0.99) - 1], 2),
        "lag_ms_max": round(lags_ms[-1], 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", help="write the result to this file")
    args = parser.parse_args()
    result = asyncio.run(main(args.seconds))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
