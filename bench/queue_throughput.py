"""Queue throughput in process, without HTTP (issue 3): jobs added, claimed and finished
per second through JobQueue + Worker, with a job type that does nothing, for the
memory store and the SQLite store (a temporary file).

The core is wired as rawjobs/app.py wires it (EventHub with the store's seq
reservation when durable, JobQueue, Worker with a ProcessPool), with a Registry that
holds one async no-op job type. Each store is measured in two runs on a fresh store:

- ``add`` then ``drain``: N jobs added with the worker stopped, by ``--producers``
  tasks, each adding its share one job after another and giving the loop a turn
  after each add, as keep-alive clients posting to the server do: the add-only
  rate; then the worker starts (``--concurrency`` slots) and runs them all: claims
  and finishes per second.
- ``mixed``: the worker runs while the N jobs are added the same way: jobs per second
  from the first add to the last completion (and the add, claim and finish rates
  over that same wall time).

``--gc server`` runs with the garbage-collector settings the server process uses
(``rawjobs.app.tune_gc``); the default keeps Python's.

Each run also reports the CPU time per job (``time.process_time``, every thread of
the process, so the SQLite thread too), in microseconds: steadier than wall-clock
rates on a machine shared with other work.

    python bench/queue_throughput.py                     # 20,000 memory / 10,000 SQLite
    python bench/queue_throughput.py --memory-jobs 5000 --sqlite-jobs 2000 --json out.json
    python bench/queue_throughput.py --runs mixed --repeat 5     # the figure of issue 6

Figures depend on the machine and its load; compare runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rawjobs.core.events import Event, EventHub
from rawjobs.core.jobs import JobContext, Registry, make_job_type
from rawjobs.core.procpool import ProcessPool
from rawjobs.core.queue import JobQueue
from rawjobs.core.store.base import Store
from rawjobs.core.store.memory import MemoryStore
from rawjobs.core.store.sqlite import SQLiteStore
from rawjobs.core.worker import Worker


async def noop(ctx: JobContext) -> dict[str, Any]:
    """The job type under test: does nothing."""
    return {}


def make_registry() -> Registry:
    registry = Registry()
    registry.add(make_job_type("noop", noop, description="Does nothing"))
    return registry


class Counter:
    """Counts ``job_started`` and ``job_completed`` events; ``done`` is set at ``n``
    completions; the times of the first and last of each are kept."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.started = 0
        self.finished = 0
        self.failed = 0
        self.first_start: float | None = None
        self.last_start: float | None = None
        self.last_finish: float | None = None
        self.done = asyncio.Event()

    def __call__(self, event: Event) -> None:
        if event.type == "job_started":
            self.started += 1
            now = time.perf_counter()
            if self.first_start is None:
                self.first_start = now
            self.last_start = now
        elif event.type in ("job_completed", "job_failed", "job_cancelled"):
            self.finished += 1
            self.failed += event.type != "job_completed"
            self.last_finish = time.perf_counter()
            if self.finished >= self.n:
                self.done.set()


class Core:
    """Store, hub, queue, worker and pool, as App builds them."""

    def __init__(self, store: Store, concurrency: int, n: int) -> None:
        self.store = store
        self.hub = EventHub(store.reserve_seq if store.durable else None)
        self.queue = JobQueue(store, make_registry(), self.hub,
                              keep_finished=n + 1, max_pending=n + 1)
        self.pool = ProcessPool()
        self.worker = Worker(self.queue, self.queue.registry, self.hub, self.pool,
                             concurrency=concurrency)
        self.counter = Counter(n)
        self.hub.subscribe(self.counter)

    async def start(self) -> None:
        await self.queue.start()

    async def stop(self) -> None:
        await self.worker.stop(0)
        await self.queue.release_running()
        self.pool.close()
        await self.queue.close()


async def add_all(queue: JobQueue, n: int, producers: int) -> list[int]:
    """Add ``n`` jobs from ``producers`` tasks, each adding its share one job after
    another and giving the loop a turn after each add, as keep-alive clients posting
    to the server do (each connection's task adds one job per request). Returns the
    new jobs' ids."""
    ids: list[int] = []

    async def produce(count: int) -> None:
        for _ in range(count):
            job, _ = await queue.create("noop", {})
            ids.append(job.id)
            await asyncio.sleep(0)

    share, extra = divmod(n, producers)
    await asyncio.gather(*(produce(share + (i < extra)) for i in range(producers)))
    return ids


@dataclass
class Result:
    store: str
    run: str
    jobs: int
    wall_s: float
    added_per_s: float | None
    claimed_per_s: float | None
    finished_per_s: float | None
    jobs_per_s: float | None
    cpu_us_per_job: float | None = None


def rate(n: int, seconds: float | None) -> float | None:
    return round(n / seconds) if seconds else None


def cpu_per_job(n: int, cpu_s: float) -> float:
    """Microseconds of CPU (all threads) per job."""
    return round(cpu_s / n * 1e6, 1)


async def run_add_then_drain(name: str, store: Store, n: int, producers: int,
                             concurrency: int, timeout: float) -> list[Result]:
    core = Core(store, concurrency, n)
    await core.start()
    try:
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        ids = await add_all(core.queue, n, producers)
        t_added = time.perf_counter()
        cpu_added = time.process_time()
        assert len(set(ids)) == n, "duplicate ids"
        core.worker.start()
        t_drain = time.perf_counter()
        await asyncio.wait_for(core.counter.done.wait(), timeout)
        cpu_drained = time.process_time()
        c = core.counter
        assert c.failed == 0, f"{c.failed} jobs did not complete"
        claim_s = (c.last_start or t_drain) - t_drain
        finish_s = (c.last_finish or t_drain) - t_drain
        return [
            Result(name, "add", n, round(t_added - t0, 3), rate(n, t_added - t0),
                   None, None, None, cpu_per_job(n, cpu_added - cpu0)),
            Result(name, "drain", n, round(finish_s, 3), None, rate(c.started, claim_s),
                   rate(c.finished, finish_s), rate(n, finish_s),
                   cpu_per_job(n, cpu_drained - cpu_added)),
        ]
    finally:
        await core.stop()


async def run_mixed(name: str, store: Store, n: int, producers: int, concurrency: int,
                    timeout: float) -> Result:
    core = Core(store, concurrency, n)
    await core.start()
    try:
        core.worker.start()
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        ids = await add_all(core.queue, n, producers)
        t_added = time.perf_counter()
        assert len(set(ids)) == n, "duplicate ids"
        await asyncio.wait_for(core.counter.done.wait(), timeout)
        cpu = time.process_time() - cpu0
        c = core.counter
        assert c.failed == 0, f"{c.failed} jobs did not complete"
        wall = (c.last_finish or t0) - t0
        return Result(name, "mixed", n, round(wall, 3), rate(n, t_added - t0),
                      rate(c.started, (c.last_start or t0) - t0), rate(c.finished, wall),
                      rate(n, wall), cpu_per_job(n, cpu))
    finally:
        await core.stop()


def make(name: str, workdir: Path, tag: str) -> Store:
    if name == "memory":
        return MemoryStore()
    return SQLiteStore(str(workdir / f"bench-{tag}.db"))


async def measure(stores: list[tuple[str, int]], producers: int, concurrency: int,
                  timeout: float, runs: str = "both", repeat: int = 1) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="rawjobs-bench-") as tmp:
        workdir = Path(tmp)
        for name, n in stores:
            for i in range(repeat):
                if runs in ("both", "drain"):
                    results += await run_add_then_drain(
                        name, make(name, workdir, f"drain{i}"), n, producers, concurrency,
                        timeout)
                if runs in ("both", "mixed"):
                    results.append(await run_mixed(name, make(name, workdir, f"mixed{i}"), n,
                                                   producers, concurrency, timeout))
    return results


def table(results: list[Result]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    header = ["store", "run", "jobs", "wall s", "added/s", "claimed/s", "finished/s",
              "jobs/s", "cpu µs/job"]
    rows = [[r.store, r.run, cell(r.jobs), f"{r.wall_s:.2f}", cell(r.added_per_s),
             cell(r.claimed_per_s), cell(r.finished_per_s), cell(r.jobs_per_s),
             cell(r.cpu_us_per_job)]
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory-jobs", type=int, default=20_000,
                        help="jobs for the memory store (default %(default)s; 0 skips it)")
    parser.add_argument("--sqlite-jobs", type=int, default=10_000,
                        help="jobs for the SQLite store (default %(default)s; 0 skips it)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="worker slots (default %(default)s)")
    parser.add_argument("--producers", type=int, default=500,
                        help="producer tasks adding jobs, one add in flight each "
                             "(default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds allowed for one run to finish (default %(default)s)")
    parser.add_argument("--runs", choices=("both", "drain", "mixed"), default="both",
                        help="which runs: add then drain, mixed, or both (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each kind per store, each on a fresh store "
                             "(default %(default)s)")
    parser.add_argument("--gc", choices=("python", "server"), default="python",
                        help="garbage-collector settings: Python's defaults, or those "
                             "of the server process, rawjobs.app.tune_gc (default "
                             "%(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the results as JSON to FILE (or stdout)")
    args = parser.parse_args(argv)
    stores = [(name, n) for name, n in (("memory", args.memory_jobs),
                                        ("sqlite", args.sqlite_jobs)) if n > 0]
    if args.gc == "server":
        from rawjobs.app import tune_gc

        tune_gc()
    results = asyncio.run(measure(stores, args.producers, args.concurrency, args.timeout,
                                  args.runs, args.repeat))
    print(f"queue throughput, in process, no-op async job type, concurrency "
          f"{args.concurrency}, {args.producers} producers, {args.gc} GC settings "
          f"(Python {platform.python_version()}, {platform.machine()})")
    print(table(results))
    if args.json:
        doc = {"concurrency": args.concurrency, "producers": args.producers, "gc": args.gc,
               "python": platform.python_version(), "results": [asdict(r) for r in results]}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
