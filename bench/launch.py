"""Start rawjobs, optionally on uvloop (rawjobs itself has no --loop option):

    python bench/launch.py [--loop asyncio|uvloop] -- <rawjobs options>

Run from the repository root so that ``--jobs bench.jobs`` imports.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from rawjobs.__main__ import main as rawjobs_main

    return rawjobs_main(rest)


if __name__ == "__main__":
    sys.exit(main())
