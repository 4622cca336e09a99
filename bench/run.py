"""Run the benchmark suite: rawjobs against the uvicorn + Starlette peer, side by side.

    python bench/run.py --quick          # under 3 minutes
    python bench/run.py                  # the full suite, under 15 minutes
    python bench/run.py --loop uvloop    # also rawjobs on uvloop and the
                                         # uvloop + httptools + websockets peer
    python bench/run.py --only burst-1000,wrk --repeats 1

Every run starts a fresh server; each case is repeated (variants interleaved) and the
medians reported. Before each run the suite waits (up to --quiet-wait seconds) for
the machine to be idle, and flags a run as disturbed when processes other than the
server, the load clients and this one used more than 15 % of a core during it.
Writes bench/results/{quick,full}.json, .md and .png (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import report  # noqa: E402
from harness import (  # noqa: E402
    CLIENT_LOOP,
    FANOUT_PROBE,
    PROFILE,
    WORK,
    Variant,
    wait_for_quiet,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Step:
    """One case: ``run(variant, **kwargs)`` per variant, or ``run(**kwargs)`` once
    when ``variants`` is empty (the floor, the in-process queue)."""

    id: str
    run: Callable[..., dict | None]
    kwargs: dict
    variants: list[Variant] = field(default_factory=list)
    repeats: int | None = None


def plan(quick: bool, variants: list[Variant]) -> list[Step]:
    rawjobs_only = [v for v in variants if v.kind == "rawjobs"]
    burst_subs = [1000] if quick else [1000, 5000]
    jobs = 50 if quick else 100
    seconds = 3 if quick else 10
    queue_seconds = 2 if quick else 5
    steps = [Step(f"floor-{n}", cases.floor, {"subscribers": n, "rounds": 200_000 // n})
             for n in (burst_subs if quick else [1000, 5000, 10000])]
    steps += [Step(f"burst-{n}", cases.burst, {"subscribers": n, "jobs": jobs, "events": 1,
                                               "concurrency": 10}, variants,
                   repeats=1 if n > 1000 else None)
              for n in burst_subs]
    if not quick:
        steps.append(Step("stats-10000", cases.burst, {"subscribers": 10000, "jobs": 10,
                                                       "events": 1, "concurrency": 10},
                          variants, repeats=1))
    for writer in ("socket", "threads", "asyncio"):
        steps.append(Step("floor-paced" if writer == "socket" else f"floor-paced-{writer}",
                          cases.floor_paced,
                          {"clients": 1, "per_client": 2000, "events": 5 if quick else 10,
                           "interval": 0.1, "writer": writer}))
    steps.append(Step("paced", cases.paced, {"ws": 1000, "sse": 1000,
                                             "events": 5 if quick else 10, "interval": 0.1},
                      variants))
    if not quick:
        steps.append(Step("hold", cases.paced, {"ws": 9000, "sse": 9000, "events": 3,
                                                "interval": 0.2}, variants, repeats=1))
    steps.append(Step("wrk", cases.stats_wrk, {"seconds": seconds}, variants))
    steps.append(Step("queue-memory", cases.queue_http, {"seconds": queue_seconds}, variants))
    steps.append(Step("queue-ceiling", cases.queue_ceiling, {"seconds": queue_seconds},
                      rawjobs_only))
    steps.append(Step("queue-sqlite", cases.queue_http,
                      {"seconds": queue_seconds, "db": "sqlite"}, rawjobs_only))
    steps.append(Step("queue-inprocess", cases.queue_inprocess,
                      {"memory_jobs": 5000 if quick else 20000,
                       "sqlite_jobs": 2000 if quick else 10000}))
    return steps


def run_step(step: Step, repeats: int, quiet_wait: float) -> dict:
    """Every repeat of ``step``, variants interleaved; medians per variant."""
    names = [v.name for v in step.variants] or ["-"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(step.repeats or repeats):
        for variant in step.variants or [None]:
            waited = wait_for_quiet(quiet_wait)
            started = time.perf_counter()
            result = _run_once(step, variant)
            if result is not None:
                result.update(quiet_wait_s=waited, run_s=time.perf_counter() - started)
                runs[variant.name if variant else "-"].append(result)
                _progress(step.id, variant, result)
    return {name: summarise(rs) for name, rs in runs.items() if rs}


def _run_once(step: Step, variant: Variant | None) -> dict | None:
    kwargs = dict(step.kwargs)
    if kwargs.get("db") == "sqlite":
        kwargs["db"] = str(WORK / f"queue-{time.monotonic_ns()}.db")
    try:
        return step.run(variant, **kwargs) if variant else step.run(**kwargs)
    except Exception as exc:  # one failed run must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"[:1000]}


def summarise(runs: list[dict]) -> dict:
    """Medians of the numeric figures; flags: how many runs were disturbed, failed."""
    median: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, bool) for v in values):
            median[key] = all(values) if key != "disturbed" else any(values)
        elif all(isinstance(v, (int, float)) and v is not None for v in values):
            median[key] = statistics.median(values)
    return {"median": median, "runs": runs,
            "disturbed_runs": sum(bool(r.get("disturbed")) for r in runs),
            "failed_runs": sum("error" in r for r in runs)}


def _progress(case: str, variant: Variant | None, result: dict) -> None:
    keys = ("error", "cpu_us_per_message", "us_per_message", "spread_p50_ms",
            "stats_p99_ms", "req_per_s", "completed_per_s", "no_job_to_stats",
            "jobs_to_stats", "job_us", "budget_us", "delivered_ratio", "disturbed")
    shown = {k: round(result[k], 2) if isinstance(result[k], float) else result[k]
             for k in keys if k in result}
    print(f"  {case:16} {variant.name if variant else '-':15} {shown}", flush=True)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("h11", "wsproto", "uvicorn", "starlette", "uvloop", "httptools",
                    "websockets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import os

    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "rawjobs_commit": _commit(),
            "load_client_loop": CLIENT_LOOP,
            "python": platform.python_version(), "packages": versions,
            "fd_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def _commit() -> str:
    """The repository's HEAD, with "+dirty" when rawjobs/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "rawjobs"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short suite (< 3 minutes)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per case and variant (default: 2 with --quick, else 3)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="uvloop: also measure rawjobs on uvloop and the uvloop peer")
    p.add_argument("--only", default="", help="comma-separated case ids to run")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="seconds to wait for an idle machine before each run "
                        "(default: 2 with --quick, else 5)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="record every server with py-spy (raw stacks) into DIR; "
                        "summarise with bench/profile_summary.py (figures are then "
                        "not clean: py-spy takes CPU)")
    p.add_argument("--fanout-probe", action="store_true",
                   help="start rawjobs with bench/fanout_probe.py: paced then also reports "
                        "the server's own writing time per event (server_write_*) and "
                        "what came after its last write (after_last_write_*)")
    return p.parse_args()


def write(results: dict, out: Path, chart: bool) -> str:
    """Write {mode}.json and .md (and .png when ``chart``); returns the Markdown."""
    results["targets"] = report.targets(results)
    out.mkdir(parents=True, exist_ok=True)
    base = out / results["mode"]
    base.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    markdown = report.markdown(results)
    base.with_suffix(".md").write_text(markdown)
    if chart:
        report.chart(results, base.with_suffix(".png"))
    return markdown


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on kill
    args = parse_args()
    variants = [Variant("rawjobs"), Variant("peer")]
    if args.loop == "uvloop":
        variants += [Variant("rawjobs", "uvloop"), Variant("peer", "uvloop")]
    mode = "quick" if args.quick else "full"
    only = set(filter(None, args.only.split(",")))
    PROFILE["dir"] = args.profile
    FANOUT_PROBE["on"] = args.fanout_probe
    quiet = args.quiet_wait if args.quiet_wait is not None else (2.0 if args.quick else 5.0)
    started = time.time()
    results = {"mode": mode, "started": started, "machine": machine(),
               "variants": [v.name for v in variants], "cases": {}}
    for step in plan(args.quick, variants):
        if only and step.id not in only:
            continue
        print(f"{step.id} ...", flush=True)
        repeats = args.repeats or (2 if args.quick else 3)
        results["cases"][step.id] = {"params": dict(step.kwargs),
                                     "variants": run_step(step, repeats, quiet)}
        results["duration_s"] = time.time() - started
        write(results, args.out, chart=False)  # a stopped run keeps what it measured
    print(write(results, args.out, chart=True))
    print(f"wrote {args.out / mode}.json, .md, .png in {results['duration_s']:.0f} s")


if __name__ == "__main__":
    main()
