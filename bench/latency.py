"""Latency from Kafka to screen: record timestamp to receipt, at 10,000 records/s to 100 clients.

Target: p99 <= 50 ms. A paced producer writes realistic records (Kafka stamps each one when
produce() is called), the proxy runs as a real process, and 100 websocket clients in one separate
process read everything; the first --sample clients compare the timestamp in every message with
the time it arrived (the rest only count, to keep the clients' CPU low). The rate is reached in
steps during the warm-up, then measured for --duration seconds.

10,000 records/s to 100 clients is 1,000,000 deliveries/s: broker, producer, proxy and clients
share the machine's cores (2 on the development machine), so queueing for CPU is part of the
figure.

    PYTHONPATH=. python bench/latency.py [--clients 100] [--rate 10000] [--duration 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.processes import CpuMeter, LoadClients, ProducerProcess, ProxyProcess, format_cpu  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402

TARGET_P99_MS = 50.0
TOPIC = "bench-latency"
WARMUP_STEPS = (0.25, 0.5, 0.75, 1.0)
# Kafka stamps a record when produce() is called, so the producer's linger is part of the figure.
# Shorter lingers make more, smaller batches, which cost Tansu CPU per fetch (see bench/delivery.py).
LINGER_MS = 5.0


def run(clients: int = 100, rate: float = 10_000, warmup: float = 4.0, duration: float = 12.0, sample: int = 10,
        proxy_env: dict[str, str] | None = None) -> dict:
    """Percentiles of record-timestamp-to-receipt latency; "ratio" is p99 / 50 ms (<= 1 passes)."""
    with TansuBroker() as broker:
        broker.create_topics([TOPIC], partitions=1)
        proxy = ProxyProcess(broker.bootstrap_servers, [TOPIC], env=proxy_env)
        load = producer = None
        try:
            proxy.start()
            load = LoadClients(proxy.port, clients, sample=sample).start()
            producer = ProducerProcess(broker.bootstrap_servers, TOPIC, rate * WARMUP_STEPS[0], linger_ms=LINGER_MS).start()
            for step in WARMUP_STEPS:
                producer.set_rate(rate * step)
                time.sleep(warmup / len(WARMUP_STEPS))
            meter = CpuMeter({"proxy": proxy.pid, "clients": load.pid, "producer": producer.pid,
                              "broker": broker.process.pid})
            meter.start()
            before = load.ask("COUNT")
            load.ask("TIME ON")
            time.sleep(duration)
            latency = load.ask("TIME OFF")
            after = load.ask("COUNT")
            cpu = meter.stop()
            dropped = proxy.metrics().get("proxy_slow_sessions_dropped_total", 0.0)
            producer.result()
        finally:
            for process in (producer, load, proxy):
                if process is not None:
                    process.stop()
    seconds = after["time"] - before["time"]
    per_client = [(b - a) / seconds for a, b in zip(before["per_client"], after["per_client"])]
    p99 = latency.get("p99", float("inf"))
    return {"clients": clients, "rate": rate, "seconds": seconds, "latency": latency, "cpu": cpu,
            "delivered_per_s": (after["messages"] - before["messages"]) / seconds,
            "per_client_min": min(per_client), "closed": after["closed"], "dropped": dropped,
            "p99_ms": p99, "target_ms": TARGET_P99_MS, "ratio": p99 / TARGET_P99_MS}


def report(result: dict) -> None:
    latency = result["latency"]
    print(f"latency: {result['rate']:,.0f} records/s to {result['clients']} websocket clients, "
          f"{result['seconds']:.1f} s after a {len(WARMUP_STEPS)}-step warm-up")
    if latency["count"]:
        print(f"  record timestamp -> client: p50 {latency['p50']:.1f} ms, p90 {latency['p90']:.1f} ms, "
              f"p99 {latency['p99']:.1f} ms, p99.9 {latency['p999']:.1f} ms, max {latency['max']:.1f} ms "
              f"({latency['count']:,} messages timed)")
    else:
        print("  no message was timed (the timing clients got nothing)")
    print(f"  delivered {result['delivered_per_s']:,.0f} msgs/s (slowest client {result['per_client_min']:,.0f}/s); "
          f"sessions dropped as slow: {result['dropped']:.0f}, closed: {result['closed']}")
    print(f"  CPU: {format_cpu(result['cpu'])}")
    print(f"  ratio: p99 / {TARGET_P99_MS:.0f} ms = {result['ratio']:.2f} "
          f"({'meets' if result['ratio'] <= 1 and not result['closed'] else 'misses'} the target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10_000, help="records per second")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds to reach the rate")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured")
    parser.add_argument("--sample", type=int, default=10, help="clients that time every message")
    parser.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the proxy process (repeatable)")
    args = parser.parse_args()
    report(run(args.clients, args.rate, args.warmup, args.duration, args.sample,
               dict(setting.split("=", 1) for setting in args.proxy_env)))


if __name__ == "__main__":
    main()
