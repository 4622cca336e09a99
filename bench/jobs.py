"""The ``bench`` job type for rawjobs: ``python -m rawjobs --jobs bench.jobs`` from the
repository root (or with bench/'s parent on PYTHONPATH). See bench/benchjob.py."""

from __future__ import annotations

from typing import Any

from rawjobs import JobContext, Param, job_type

try:
    from bench import benchjob
except ImportError:  # bench/ itself on sys.path
    import benchjob  # type: ignore[no-redef]


@job_type(
    benchjob.NAME,
    description=benchjob.DESCRIPTION,
    params=[
        Param("events", int, default=5, min=0, max=100_000,
              description="Progress events to emit"),
        Param("interval", float, default=0.0, min=0, max=60,
              description="Seconds between events (0: burst)"),
        Param("gate", str, default="", max_length=200,
              description="Wait until this file exists before emitting"),
    ],
)
async def bench(ctx: JobContext) -> dict[str, Any]:
    return await benchjob.run(ctx.params, ctx.progress, ctx.sleep)
