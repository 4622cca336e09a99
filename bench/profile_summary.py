"""Summarise a py-spy raw profile (``py-spy record --format raw``, collapsed stacks):
the functions with the most samples, inclusive ("total": on the stack) and
exclusive ("self": the leaf), as percentages of all samples.

    python bench/profile_summary.py PROFILE.txt [--top 25] [--filter rawjobs]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r" \((.*?):\d+\)$")


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: one entry per function."""
    match = _LINE.search(frame)
    if not match:
        return frame
    return f"{frame[:match.start()]} ({match.group(1).rsplit('/', 1)[-1]})"


def summarise(path: str) -> tuple[int, Counter, Counter]:
    total, inclusive, exclusive = 0, Counter(), Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            frames = [frame_name(fr) for fr in stack.split(";")]
            total += samples
            exclusive[frames[-1]] += samples
            for name in set(frames):
                inclusive[name] += samples
    return total, inclusive, exclusive


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--filter", default="", help="only functions whose entry contains this")
    args = p.parse_args()
    total, inclusive, exclusive = summarise(args.profile)
    print(f"{total} samples")
    for title, counter in (("total (inclusive)", inclusive), ("self (exclusive)", exclusive)):
        print(f"\n{title}:")
        shown = [(n, c) for n, c in counter.most_common() if args.filter in n][: args.top]
        for name, count in shown:
            print(f"  {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
