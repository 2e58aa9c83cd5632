#!/usr/bin/env python3
"""Summarize a py-spy profile in collapsed-stack ("raw") format: the functions with the most
samples on top of the stack (self) and anywhere in it (inclusive).

    .venv/bin/python scripts/bench/profile_top.py PROFILE.txt [--top 25]

Profiles come from any benchmark run with BENCH_PROFILE_DIR=DIR (see README.md).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

# py-spy frames look like "function (path/to/file.py:123)"; the line number is dropped so that
# every line of a function adds up.
FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", "/yardmaster/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    self_count: Counter[str] = Counter()
    incl_count: Counter[str] = Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [short(fr) for fr in stack.split(";")]
            total += n
            self_count[frames[-1]] += n
            for fr in set(frames):
                incl_count[fr] += n
    print(f"{total} samples")
    for title, counter in (("self", self_count), ("inclusive", incl_count)):
        print(f"\n{title}:")
        for frame, n in counter.most_common(args.top):
            print(f"{n / max(total, 1) * 100:6.1f}%  {frame}")


if __name__ == "__main__":
    main()
