"""Live fan-out: N websocket clients while buyOffer records arrive at a steady rate.

Each step runs on a fresh embedded broker (the 13 shipped topics, --partitions each: Tansu slows
down with the batches a partition holds) with the proxy on the shipped config. The clients are
split over several load processes (bench/sockjs_load.py) and connect before the producer starts,
so every one of them must get every record: loss is counted exactly once the producer has stopped
(what has not arrived TAIL_SECONDS later is lost).
The first clients of each process time every message (Kafka record timestamp to receipt).

With --merchants M the proxy runs in token mode and client i authenticates as merchant i mod M;
the records (buyOffer-shaped whatever --topic) carry the M merchants' ids in turn. On a public
topic (marketSituation) every session still gets every record, as in open mode; on an owner topic
(buyOffer) a session gets only its merchant's records, every M-th. Either way the proxy filters
and encodes a record once per merchant, not once per session: run.py's "merchants" rows show what
that costs next to the open row with as many sessions.

Targets (issue 10): 100 clients at 1k/s: p99 <= 50 ms and proxy <= 35 % of a core; at 5k/s:
p99 <= 100 ms, no loss, no session closed, proxy peak RSS <= 300 MB; at 10k/s: no session
closed, peak RSS <= 300 MB (degrade by coalescing); 10 clients: p99 <= 50 ms up to 10k/s.

    PYTHONPATH=. python bench/fanout.py [--clients 100] [--rates 1000,5000,10000] [--partitions 4]
                                        [--merchants 20 --topic marketSituation|buyOffer]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.processes import (  # noqa: E402
    CpuMeter, LoadClients, MachineCpu, ProducerProcess, Profiler, ProxyProcess, cpu_summary, format_cpu,
    group_cpu, memory_kib)
from proxy.config import default_topic_rules, default_topics  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402
from proxy.demo.simulator import Merchant  # noqa: E402

TOPIC = "buyOffer"
# Token mode (run.py's "merchants"): 100 sessions of 20 merchants, 5 each, on a public topic and an owner topic.
MERCHANTS = 20
MERCHANT_TOPICS = ("marketSituation", "buyOffer")
WARMUP_STEPS = (0.25, 0.5, 0.75, 1.0)
SAMPLED_PER_PROCESS = 5
LOAD_PROCESSES = 2
# After the producer stops, what is still on its way must arrive within this time: a record that
# has not is counted as lost (at the rates where a backlog builds, that is the backlog).
TAIL_SECONDS = 10
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Targets:
    """What a step must show; None: not a target at this step (reported only)."""

    p99_ms: float | None = None
    proxy_cpu: float | None = None  # share of one core
    peak_rss_mb: float | None = None
    no_loss: bool = False
    none_closed: bool = True


def targets_for(clients: int, rate: float) -> Targets:
    if clients >= 100:
        if rate <= 1000:
            return Targets(p99_ms=50, proxy_cpu=0.35, no_loss=True)
        if rate <= 5000:
            return Targets(p99_ms=100, peak_rss_mb=300, no_loss=True)
        return Targets(peak_rss_mb=300)
    return Targets(p99_ms=50, no_loss=True)


def run_step(clients: int, rate: float, partitions: int = 4, warmup: float = 1.5, duration: float = 5.0,
             processes: int = LOAD_PROCESSES, merchants: int = 0, topic: str = TOPIC) -> dict:
    """One (clients, rate) step on a fresh broker and proxy; figures and the targets it meets.

    merchants: 0 for open access; else token mode, client i a session of merchant i % merchants and
    the records owned by the merchants in turn (see the module's docstring).
    """
    topics = default_topics()
    tokens = [Merchant.generate().token for _ in range(merchants)]
    owned = bool(merchants) and default_topic_rules()[topic].policy != "public"

    def records_for(client: int, produced: int) -> int:
        """How many of the first `produced` records client number `client` may see."""
        return len(range(client % merchants, produced, merchants)) if owned else produced

    with TansuBroker() as broker:
        broker.create_topics(topics, partitions=partitions)
        config = {"live": {"access": "token", "admin_tokens": [Merchant.generate().token]}} if merchants else None
        proxy = ProxyProcess(broker.bootstrap_servers, config=config)
        loads: list[LoadClients] = []
        producer = None
        try:
            proxy.start()
            split = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
            firsts = [sum(split[:i]) for i, count in enumerate(split) if count]  # each process's first client
            loads = [LoadClients(proxy.port, count, sample=min(SAMPLED_PER_PROCESS, count), histories=len(topics),
                                 tokens=[tokens[(first + i) % merchants] for i in range(count)] if merchants else None)
                     .start() for first, count in zip(firsts, filter(None, split))]
            producer = ProducerProcess(broker.bootstrap_servers, topic, rate * WARMUP_STEPS[0], shape="buyOffer",
                                       duration=warmup + duration + 60,
                                       owners=[Merchant(token).merchant_id for token in tokens]).start()
            for step in WARMUP_STEPS:
                producer.set_rate(rate * step)
                time.sleep(warmup / len(WARMUP_STEPS))
            pids = {"proxy": proxy.pid, "broker": broker.process.pid, "producer": producer.pid}
            pids |= {f"clients{number}": load.pid for number, load in enumerate(loads)}
            meter, machine = CpuMeter(pids).start(), MachineCpu().start()
            metrics_before = proxy.metrics()
            before = [load.ask("COUNT") for load in loads]
            for load in loads:
                load.ask("TIME ON")
            with Profiler(proxy.pid, f"fanout-{clients}c-{rate:.0f}-{partitions}p"):
                time.sleep(duration)
            latencies = [load.ask("TIME OFF") for load in loads]
            after = [load.ask("COUNT") for load in loads]
            metrics_after = proxy.metrics()
            cpu_seconds = meter.seconds()
            cpu = cpu_summary(group_cpu(meter.stop(), "clients"), machine.stop())
            produced = producer.result()
            # Everything produced must reach every client: wait for the tail, with a deadline.
            expected_by_load = [sum(records_for(first + i, produced["produced"]) for i in range(load.clients))
                                for first, load in zip(firsts, loads)]
            for load, expected in zip(loads, expected_by_load):  # all wait at once: a client short costs it once
                load.send(f"UNTIL {expected} {TAIL_SECONDS}")
            final = [json.loads(load.line(TAIL_SECONDS + 10)) for load in loads]
            memory = memory_kib(proxy.pid)
        finally:
            for process in (producer, *loads, proxy):
                if process is not None:
                    process.stop()
    seconds = after[0]["time"] - before[0]["time"]
    delivered = sum(a["messages"] - b["messages"] for a, b in zip(after, before))
    consumed = metrics_after.get("proxy_messages_consumed_total", 0) - metrics_before.get(
        "proxy_messages_consumed_total", 0)
    frames = sum(a["frames"] - b["frames"] for a, b in zip(after, before))
    expected = sum(expected_by_load)
    received = sum(f["messages"] for f in final)
    per_client = [count for f in final for count in f["per_client"]]
    latency = merge_percentiles(latencies)
    closed = sum(f["closed"] for f in final)
    result = {
        "clients": clients, "rate": rate, "partitions": partitions, "merchants": merchants, "topic": topic,
        "seconds": seconds,
        "produced": produced["produced"], "producer_failed": produced["failed"],
        "delivered_per_s": delivered / seconds, "consumed_per_s": consumed / seconds,
        "messages_per_frame": delivered / frames if frames else 0.0,
        "loss": 1 - received / expected if expected else 0.0, "slowest_client_share":
            min(count / max(records_for(client, produced["produced"]), 1) for client, count in enumerate(per_client))
            if produced["produced"] and per_client else 0.0,
        "closed": closed, "close_codes": sorted({c for f in final for c in f["close_codes"]}),
        "dropped": metrics_after.get("proxy_slow_sessions_dropped_total", 0.0),
        "latency_ms": latency, "cpu": cpu,
        "proxy_us_per_ingested": 1e6 * cpu_seconds["proxy"] / max(consumed, 1),
        "proxy_us_per_delivered": 1e6 * cpu_seconds["proxy"] / max(delivered, 1),
        "proxy_peak_rss_mb": memory["peak"] * 1024 / 1e6, "proxy_problems": len(proxy.problems),
    }
    result["checks"] = check(result, targets_for(clients, rate))
    result["passed"] = all(result["checks"].values())
    return result


def merge_percentiles(parts: list[dict]) -> dict:
    """Percentiles over several load processes: each process's own, the worst of them (conservative)."""
    counted = [part for part in parts if part.get("count")]
    if not counted:
        return {"count": 0}
    merged = {"count": sum(part["count"] for part in counted)}
    for key in ("p50", "p90", "p99", "p999", "max"):
        merged[key] = max(part[key] for part in counted)
    # When the load clients read it (their own scheduling included), beside the kernel's arrival.
    reads = [part["read"]["p99"] for part in counted if part.get("read", {}).get("count")]
    if reads:
        merged["read_p99"] = max(reads)
    return merged


def check(result: dict, targets: Targets) -> dict[str, bool]:
    checks = {}
    if targets.p99_ms is not None:
        checks[f"p99 <= {targets.p99_ms:.0f} ms"] = result["latency_ms"].get("p99", float("inf")) <= targets.p99_ms
    if targets.proxy_cpu is not None:
        checks[f"proxy CPU <= {targets.proxy_cpu:.0%}"] = result["cpu"]["proxy"] <= targets.proxy_cpu
    if targets.peak_rss_mb is not None:
        checks[f"peak RSS <= {targets.peak_rss_mb:.0f} MB"] = result["proxy_peak_rss_mb"] <= targets.peak_rss_mb
    if targets.no_loss:
        checks["no loss"] = result["loss"] == 0
    if targets.none_closed:
        checks["no session closed"] = result["closed"] == 0
    return checks


def describe(result: dict) -> str:
    latency = result["latency_ms"]
    timing = (f"p50 {latency['p50']:.0f} / p99 {latency['p99']:.0f} / max {latency['max']:.0f} ms"
              if latency.get("count") else "nothing timed")
    closed = f"closed {result['closed']} {result['close_codes']}" if result["closed"] else "closed 0"
    return (f"{timing}; lost {result['loss']:.1%} (not there {TAIL_SECONDS} s after the end), {closed}, "
            f"RSS peak {result['proxy_peak_rss_mb']:.0f} MB, {result['messages_per_frame']:.0f} msgs/frame")


def report(result: dict) -> None:
    merchants = f" of {result['merchants']} merchants (token mode)" if result["merchants"] else ""
    print(f"fan-out: {result['clients']} websocket clients{merchants}, {result['rate']:,.0f} buyOffer-shaped "
          f"records/s into {result['topic']}, {result['partitions']} partition(s) per topic, "
          f"{result['seconds']:.1f} s measured")
    print(f"  {describe(result)}")
    print(f"  delivered {result['delivered_per_s']:,.0f} msgs/s, ingested {result['consumed_per_s']:,.0f}/s; "
          f"slowest client got {result['slowest_client_share']:.1%} of what it may see "
          f"({result['produced']:,} produced); "
          f"dropped as slow: {result['dropped']:.0f}; proxy log warnings/errors: {result['proxy_problems']}")
    print(f"  proxy CPU {result['proxy_us_per_ingested']:.0f} us per ingested record, "
          f"{result['proxy_us_per_delivered']:.2f} us per delivered message")
    print(f"  CPU: {format_cpu(result['cpu'])}")
    print("  " + ", ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in result["checks"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rates", default="1000,5000,10000", help="records per second, comma-separated")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=LOAD_PROCESSES, help="load-client processes")
    parser.add_argument("--merchants", type=int, default=0, help="token mode: sessions of this many merchants")
    parser.add_argument("--topic", default=TOPIC, help="where the (buyOffer-shaped) records go")
    args = parser.parse_args()
    for rate in (float(rate) for rate in args.rates.split(",")):
        report(run_step(args.clients, rate, args.partitions, args.warmup, args.duration, args.processes,
                        args.merchants, args.topic))


if __name__ == "__main__":
    main()
