"""All benchmarks in sequence, then one table: metric, measured, target, ratio, pass/fail.

Benchmarks report, they do not gate: the exit code is 0 whatever the figures. Each one starts its
own embedded broker and processes on loopback and stops them before the next begins.

    PYTHONPATH=. python bench/run.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import delivery, ingest, latency  # noqa: E402
from bench.processes import BENCH, ENV  # noqa: E402

INGEST_TARGET = 0.8
# The export must not grow with the topic; "grows by at most 10 % for 10x the records" is the bar.
EXPORT_GROWTH_TARGET = 1.10


def ingest_row() -> tuple:
    result = ingest.run()
    print(f"ingest: proxy {result['proxy_per_s']:,.0f}/s vs bare loop {result['bare_per_s']:,.0f}/s "
          f"({result['records']:,} records of ~{result['avg_bytes']:.0f} B)")
    ratio = result["ratio"] / INGEST_TARGET
    return ("ingest (proxy path / bare consumer loop)",
            f"{result['ratio']:.2f} x ({result['proxy_per_s']:,.0f}/s)", f">= {INGEST_TARGET:.2f} x", ratio, ratio >= 1)


def delivery_row() -> tuple:
    result = delivery.run()
    delivery.report(result)
    return ("delivery, msgs/s summed over clients",
            f"{result['delivered_per_s']:,.0f} ({result['ratio_ceiling']:.2f} x ceiling "
            f"{result['ceiling_per_s']:,.0f})", f">= {delivery.TARGET:,}", result["ratio"], result["ratio"] >= 1)


def latency_row() -> tuple:
    result = latency.run()
    latency.report(result)
    figures = result["latency"]
    measured = (f"p99 {figures['p99']:.1f} ms (p50 {figures['p50']:.1f}, max {figures['max']:.0f})"
                if figures["count"] else "nothing timed")
    if result["closed"]:
        measured += f", {result['closed']} sessions closed"
    return (f"latency Kafka->client, {result['rate']:,.0f}/s to {result['clients']} clients", measured,
            f"p99 <= {latency.TARGET_P99_MS:.0f} ms", result["ratio"], result["ratio"] <= 1 and not result["closed"])


def export_memory_row() -> tuple | None:
    script = os.path.join(BENCH, "export_memory.py")
    if not os.path.exists(script):
        print("export memory: bench/export_memory.py does not exist yet; skipped")
        return None
    completed = subprocess.run([sys.executable, script], env=ENV, capture_output=True, text=True, timeout=300)
    print(completed.stdout, end="")
    peaks = dict(re.findall(r"^\s*(small|large):.*peak\s+([\d.]+) MiB", completed.stdout, re.MULTILINE))
    if completed.returncode != 0 or set(peaks) != {"small", "large"}:
        raise RuntimeError(f"export_memory.py exited with {completed.returncode}: {completed.stderr[-500:]}")
    growth = float(peaks["large"]) / float(peaks["small"])
    ratio = growth / EXPORT_GROWTH_TARGET
    return ("export peak RSS, 10x records / 1x", f"{growth:.2f} x ({peaks['small']} -> {peaks['large']} MiB)",
            f"<= {EXPORT_GROWTH_TARGET:.2f} x", ratio, ratio <= 1)


def main() -> int:
    rows = []
    for name, bench in (("ingest", ingest_row), ("delivery", delivery_row), ("latency", latency_row),
                        ("export memory", export_memory_row)):
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            row = bench()
        except Exception:  # one failing benchmark must not hide the others' figures
            traceback.print_exc()
            row = (name, "error (see above)", "", None, False)
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
        if row is not None:
            rows.append(row)

    header = ("metric", "measured", "target", "ratio", "result")
    table = [header] + [(metric, measured, target, "" if ratio is None else f"{ratio:.2f}",
                         "PASS" if passed else "FAIL") for metric, measured, target, ratio, passed in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("\n" + "  ".join(cell.ljust(width) for cell, width in zip(header, widths)))
    print("  ".join("-" * width for width in widths))
    for row in table[1:]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print("\nratio = measured / target (ingest, delivery: >= 1 passes; latency, export memory: <= 1 passes). "
          f"All processes shared this machine's {os.cpu_count()} cores.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
