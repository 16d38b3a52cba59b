"""Idle cost: CPU of the proxy and the embedded broker with no clients and no traffic.

The proxy follows the 13 shipped topics (--partitions each: 52 partitions at 4) and fetches
continuously; how often depends on fetch.wait.max.ms. Tansu answers every fetch only when that
wait has passed and pays CPU per partition per fetch (/work/shared/test-broker.md, items 7 and 11);
Apache Kafka parks an idle fetch until data comes or the wait ends, so the broker-side figures here
are the embedded broker's, not a real cluster's. Each setting runs on a fresh broker; "default" is
whatever the proxy ships (no kafka: override in the config).

    PYTHONPATH=. python bench/idle.py [--waits 10,100,500,default] [--partitions 4] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.processes import CpuMeter, MachineCpu, ProxyProcess, cpu_summary, format_cpu  # noqa: E402
from proxy.config import default_topics  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402

SETTLE_SECONDS = 1.5
BROKER_ALONE_SECONDS = 1.0


def run_setting(fetch_wait_ms: int | None, partitions: int = 4, seconds: float = 4.0) -> dict:
    """Idle CPU shares of broker alone, then of proxy and broker, for one fetch.wait.max.ms (None: default)."""
    with TansuBroker() as broker:
        broker.create_topics(default_topics(), partitions=partitions)
        alone = CpuMeter({"broker": broker.process.pid}).start()
        time.sleep(BROKER_ALONE_SECONDS)
        broker_alone = alone.stop()["broker"]
        proxy = ProxyProcess(broker.bootstrap_servers, fetch_wait_ms=fetch_wait_ms)
        try:
            proxy.start()
            time.sleep(SETTLE_SECONDS)
            meter, machine = CpuMeter({"proxy": proxy.pid, "broker": broker.process.pid}).start(), MachineCpu().start()
            time.sleep(seconds)
            cpu = cpu_summary(meter.stop(), machine.stop())
        finally:
            proxy.stop()
    return {"fetch_wait_ms": fetch_wait_ms if fetch_wait_ms is not None else "default", "partitions": partitions,
            "cpu": cpu, "broker_alone": broker_alone}


def run(waits: tuple[int | None, ...] = (10, 100, 500, None), partitions: int = 4, seconds: float = 4.0) -> dict:
    return {"partitions": partitions, "settings": [run_setting(wait, partitions, seconds) for wait in waits]}


def report(result: dict) -> None:
    print(f"idle: no clients, no traffic; 13 topics x {result['partitions']} partition(s) = "
          f"{13 * result['partitions']} partitions followed")
    for setting in result["settings"]:
        print(f"  fetch.wait.max.ms={setting['fetch_wait_ms']}: {format_cpu(setting['cpu'])}; "
              f"broker with nobody fetching {setting['broker_alone']:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", default="10,100,500,default", help="fetch.wait.max.ms values; default: the proxy's")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    waits = tuple(None if wait == "default" else int(wait) for wait in args.waits.split(","))
    report(run(waits, args.partitions, args.seconds))


if __name__ == "__main__":
    main()
