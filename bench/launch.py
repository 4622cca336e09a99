"""Start rawjobs (``--loop`` is handed to rawjobs' own ``--loop``):

    python bench/launch.py [--loop asyncio|uvloop] [--preload MODULE] -- <rawjobs options>

Run from the repository root so that ``--jobs bench.jobs`` and ``--preload
bench.MODULE`` import (the working directory is put on ``sys.path``, as rawjobs does
for ``--jobs``). ``--preload`` (repeatable; or $BENCH_RAWJOBS_PRELOAD,
comma-separated) imports a module first: a way to measure a proposed change to
rawjobs as a patch, without editing it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE")
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    preload = args.preload + os.environ.get("BENCH_RAWJOBS_PRELOAD", "").split(",")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in filter(None, preload):
        importlib.import_module(module)
    from rawjobs.__main__ import main as rawjobs_main

    return rawjobs_main(["--loop", args.loop, *rest])


if __name__ == "__main__":
    sys.exit(main())
