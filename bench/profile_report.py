"""Top frames of a py-spy profile in collapsed-stack form (`py-spy record --format raw`), as tables.

`BENCH_PROFILE=<folder> .venv/bin/python bench/run.py` writes one such file per measured window;
this prints, per file, the share of samples per thread and the frames with the most samples of
their own (self) and in all (total, the frame and what it called), with or without line numbers.

    .venv/bin/python bench/profile_report.py /tmp/profiles/fanout-100c-5000-4p.txt [--top 25] [--lines]

py-spy counts time a thread spends inside C as active (it cannot tell a blocking call from work),
so a wait in librdkafka's consume() shows up as that frame's self time, not as idle.
"""

from __future__ import annotations

import argparse
import collections
import re

LINE_NUMBER = re.compile(r":\d+\)$")


def summarize(path: str, keep_lines: bool) -> tuple[int, collections.Counter, collections.Counter, collections.Counter]:
    """(samples, per thread, self per frame, total per frame) of one collapsed-stack file."""
    samples = 0
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, count_text = line.rsplit(" ", 1)
            count = int(count_text)
            thread, *frames = stack.split(";")
            samples += count
            threads[re.sub(r"\s*\(\d+\)", "", thread).strip()] += count
            if not keep_lines:
                frames = [LINE_NUMBER.sub(")", frame) for frame in frames]
            if frames:
                own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    return samples, threads, own, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lines", action="store_true", help="one entry per source line, not per function")
    args = parser.parse_args()
    for path in args.paths:
        samples, threads, own, total = summarize(path, args.lines)
        print(f"== {path}: {samples} samples")
        if not samples:
            continue
        for thread, count in threads.most_common():
            print(f"  thread {thread}: {count / samples:.1%}")
        print(f"  {'self':>6}  frame")
        for frame, count in own.most_common(args.top):
            print(f"  {count / samples:6.1%}  {frame}")
        print(f"  {'total':>6}  {'self':>6}  frame")
        for frame, count in total.most_common(args.top):
            print(f"  {count / samples:6.1%}  {own[frame] / samples:6.1%}  {frame}")


if __name__ == "__main__":
    main()
