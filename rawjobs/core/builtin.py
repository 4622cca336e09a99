"""The four built-in job types of the PAGI demo (PROTOCOL.md, "Job types"),
registered through the same public API as a user's own."""

from __future__ import annotations

import math
from typing import Any

from .jobs import JobContext, Param, Registry, job_type
from .procpool import SyncJobContext


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


async def countdown(ctx: JobContext) -> dict[str, Any]:
    """Count down ``seconds``, one progress event a second."""
    seconds = ctx.params["seconds"]
    for remaining in range(seconds, 0, -1):
        percent = (seconds - remaining) * 100 // seconds
        await ctx.progress(percent, f"{_plural(remaining, 'second')} remaining...")
        await ctx.sleep(1)
    return {"message": "Countdown complete!", "duration": seconds}


def prime(ctx: SyncJobContext) -> dict[str, Any]:
    """Find the primes up to ``limit`` by trial division (CPU-bound: runs in the
    process pool), reporting every 5 percent of the numbers checked."""
    limit = ctx.params["limit"]
    primes: list[int] = []
    step = max(1, limit // 20)
    next_report = step
    for n in range(2, limit + 1):
        root = math.isqrt(n)
        for p in primes:
            if p > root:
                primes.append(n)
                break
            if n % p == 0:
                break
        else:
            primes.append(n)
        if n >= next_report:
            ctx.progress(n * 100 // limit, f"Checked {n} numbers, found {len(primes)} primes...")
            next_report += step
    return {
        "message": f"Found {len(primes)} prime numbers up to {limit}",
        "prime_count": len(primes),
        "largest": primes[-1] if primes else None,
        "sample": primes[:10],
    }


async def fibonacci(ctx: JobContext) -> dict[str, Any]:
    """Compute ``count`` Fibonacci numbers, one step each 0.1 s."""
    count = ctx.params["count"]
    sequence: list[int] = []
    a, b = 0, 1
    for i in range(count):
        sequence.append(a)
        await ctx.progress((i + 1) * 100 // count, f"Calculated F({i}) = {a}")
        a, b = b, a + b
        await ctx.sleep(0.1)
    return {
        "message": f"Calculated {count} Fibonacci numbers",
        "count": count,
        "sequence": sequence,
        "last": sequence[-1],
    }


async def echo(ctx: JobContext) -> dict[str, Any]:
    """Return ``message`` after ``delay`` seconds, one progress event a second."""
    message, delay = ctx.params["message"], ctx.params["delay"]
    for remaining in range(delay, 0, -1):
        percent = (delay - remaining) * 100 // delay
        await ctx.progress(percent, f"Echoing in {_plural(remaining, 'second')}...")
        await ctx.sleep(1)
    return {"message": message, "echoed": message, "delay": delay}


def register_builtins(registry: Registry) -> None:
    """Add countdown, prime, fibonacci and echo to ``registry``, in that order."""
    job_type(
        "countdown", description="Count down from N seconds, reporting every second",
        params=[Param("seconds", int, default=10, min=1, max=60,
                      description="Seconds to count down")],
        registry=registry,
    )(countdown)
    job_type(
        "prime", description="Find all prime numbers up to a limit (CPU-bound)",
        params=[Param("limit", int, default=1000, min=10, max=100000,
                      description="Upper limit to search for primes")],
        executor="process", registry=registry,
    )(prime)
    job_type(
        "fibonacci", description="Calculate Fibonacci numbers, one step each 0.1 s",
        params=[Param("count", int, default=20, min=5, max=50,
                      description="How many Fibonacci numbers to calculate")],
        registry=registry,
    )(fibonacci)
    job_type(
        "echo", description="Echo a message back after a delay",
        params=[
            Param("message", str, default="Hello, World!", min_length=1, max_length=200,
                  description="The message to echo"),
            Param("delay", int, default=3, min=1, max=30, description="Delay in seconds"),
        ],
        registry=registry,
    )(echo)
