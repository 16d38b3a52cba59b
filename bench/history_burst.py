"""History burst: 200 websocket clients connect at the same moment and each gets 13 histories.

The 13 shipped topics are filled with a simulated market's traffic (every topic's shape, 100
messages of history each where the simulator writes the topic; `updates` and `salesPerMinutes`
stay empty as in production), then the proxy starts and loads them. The clients sit in several
load processes that connect on one "GO": each client's figure is from the start of its TCP
connect to the end of the frame that carries its 13th history message.

Target (issue 10): 200 clients at once, p99 <= 100 ms.

    PYTHONPATH=. python bench/history_burst.py [--clients 200] [--processes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.processes import (  # noqa: E402
    CpuMeter, LoadClients, MachineCpu, ProducerProcess, Profiler, ProxyProcess, cpu_summary, format_cpu, group_cpu,
    memory_kib)
from proxy.config import default_topics  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402

TARGET_P99_MS = 100.0
# Enough simulated market for 100 messages in each statistics topic (the rarest, ~1.7 % each).
FILL_RECORDS = 8000


def run(clients: int = 200, processes: int = 4, partitions: int = 4) -> dict:
    topics = default_topics()
    with TansuBroker() as broker:
        broker.create_topics(topics, partitions=partitions)
        producer = ProducerProcess(broker.bootstrap_servers, None, rate=0, topics=topics, count=FILL_RECORDS).start()
        filled = producer.result(120, stop=False)
        proxy = ProxyProcess(broker.bootstrap_servers)
        loads: list[LoadClients] = []
        try:
            proxy.start()
            history_bytes = history_size(proxy.port)
            split = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
            loads = [LoadClients(proxy.port, count, histories=len(topics), wait_for_go=True).start()
                     for count in split if count]
            pids = {"proxy": proxy.pid, "broker": broker.process.pid}
            pids |= {f"clients{number}": load.pid for number, load in enumerate(loads)}
            meter, machine = CpuMeter(pids).start(), MachineCpu().start()
            started = time.monotonic()
            with Profiler(proxy.pid, f"history-burst-{clients}c"):
                for load in loads:
                    load.send("GO")
                answers = [load.line(90) for load in loads]
            wall = time.monotonic() - started
            cpu_seconds = meter.seconds()
            cpu = cpu_summary(group_cpu(meter.stop(), "clients"), machine.stop())
            memory = memory_kib(proxy.pid)
        finally:
            for process in (*loads, proxy):
                process.stop()
    figures = [json.loads(answer) for answer in answers]
    latencies = sorted(ms for figure in figures for ms in figure["history_ms"])
    complete = len(latencies)

    def at(quantile: float) -> float:
        return latencies[min(complete - 1, int(quantile * complete))] if complete else float("inf")

    p99 = at(0.99)
    return {
        "clients": clients, "processes": len(loads), "complete": complete, "history_bytes": history_bytes,
        "records_filled": filled["produced"], "p50_ms": at(0.5), "p99_ms": p99,
        "max_ms": latencies[-1] if complete else None,
        "wall_s": wall, "cpu": cpu, "proxy_cpu_ms_per_client": 1e3 * cpu_seconds["proxy"] / max(complete, 1),
        "proxy_peak_rss_mb": memory["peak"] * 1024 / 1e6, "target_ms": TARGET_P99_MS, "ratio": p99 / TARGET_P99_MS,
        "passed": complete == clients and p99 <= TARGET_P99_MS,
    }


def history_size(port: int) -> int:
    """Bytes of the 13 history messages one client gets (one SockJS session, read to completion)."""
    load = LoadClients(port, 1, histories=len(default_topics()), wait_for_go=True).start()
    try:
        load.send("GO")
        load.line(30)
        return load.ask("COUNT")["bytes"]
    finally:
        load.stop()


def report(result: dict) -> None:
    print(f"history burst: {result['clients']} websocket clients in {result['processes']} processes connect at once; "
          f"13 histories, {result['history_bytes'] / 1000:.0f} kB per client")
    print(f"  connect -> complete history: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
          f"max {result['max_ms'] or 0:.0f} ms; {result['complete']} of {result['clients']} complete; "
          f"all done in {result['wall_s']:.2f} s")
    print(f"  proxy CPU {result['proxy_cpu_ms_per_client']:.1f} ms per client; peak RSS "
          f"{result['proxy_peak_rss_mb']:.0f} MB")
    print(f"  CPU: {format_cpu(result['cpu'])}")
    print(f"  ratio: p99 / {TARGET_P99_MS:.0f} ms = {result['ratio']:.2f} "
          f"({'meets' if result['passed'] else 'misses'} the target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    report(run(args.clients, args.processes, args.partitions))


if __name__ == "__main__":
    main()
