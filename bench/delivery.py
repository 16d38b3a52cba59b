"""Delivery throughput: live messages per second the proxy gets to N websocket clients, summed.

Target: >= 1,000,000 messages/s across clients. A paced producer writes realistic records into the
embedded broker, the proxy runs as a real process, and N clients in one separate process count the
live messages they receive. The producer's rate goes up in steps (multiples of target / N records
per second); a step is sustained when every session stays open and the clients get what was
produced (>= 95 %). The figure is the delivery rate of the highest sustained step.

A producer at full speed (--steps 0) is not a useful load: the proxy reads faster than any client
can take the fan-out of it, and closes every session as too slow.

The same clients then read from a bare Tornado server that streams pre-encoded frames of the size
the proxy sent (bench/broadcast_ceiling.py): what Tornado, loopback and the clients can move on
this machine, the ceiling of any Tornado fan-out.

Broker, producer, proxy and clients share the machine's cores (2 on the development machine), so
the figures are a floor for a proxy with a machine of its own.

    PYTHONPATH=. python bench/delivery.py [--clients 50] [--step-seconds 3] [--steps 0.5,1,1.5,2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.processes import (  # noqa: E402
    BENCH, ENV, CpuMeter, LoadClients, ProducerProcess, ProxyProcess, format_cpu)
from proxy.demo.broker import TansuBroker, free_port, terminate  # noqa: E402

TARGET = 1_000_000
TOPIC = "bench-live"
STEPS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
SETTLE_SECONDS = 1.5
SUSTAINED = 0.95
# Tansu's in-memory log costs CPU per fetch in proportion to the record batches it holds: small
# batches (a short linger) make the broker eat a core within seconds on a 2-core machine.
# Throughput does not care about linger, so batch generously.
LINGER_MS = 20.0


def window(load: LoadClients, seconds: float, meter: CpuMeter, proxy: ProxyProcess | None = None) -> dict:
    """What the clients got in the next `seconds`, with CPU per process and the proxy's counters."""
    meter.start()
    before, counters = load.ask("COUNT"), proxy.metrics() if proxy else {}
    time.sleep(seconds)
    after, counters_after = load.ask("COUNT"), proxy.metrics() if proxy else {}
    elapsed = after["time"] - before["time"]
    per_client = [(b - a) / elapsed for a, b in zip(before["per_client"], after["per_client"])]
    return {
        "seconds": elapsed, "delivered_per_s": (after["messages"] - before["messages"]) / elapsed,
        "frames": after["frames"] - before["frames"], "messages": after["messages"] - before["messages"],
        "bytes_per_s": (after["bytes"] - before["bytes"]) / elapsed, "closed": after["closed"],
        "per_client_min": min(per_client), "per_client_max": max(per_client), "cpu": meter.stop(),
        **{name: (counters_after.get(metric, 0.0) - counters.get(metric, 0.0)) / elapsed
           for name, metric in (("consumed_per_s", "proxy_messages_consumed_total"),
                                ("queued_per_s", "proxy_messages_delivered_total"))},
        "dropped": counters_after.get("proxy_slow_sessions_dropped_total", 0.0),
    }


def through_proxy(clients: int, steps: tuple[float, ...], step_seconds: float, partitions: int,
                  proxy_env: dict[str, str]) -> list[dict]:
    """Producer → broker → proxy process → clients, one window per producer rate, until one fails."""
    per_client = TARGET / clients
    results = []
    with TansuBroker() as broker:
        broker.create_topics([TOPIC], partitions=partitions)
        proxy = ProxyProcess(broker.bootstrap_servers, [TOPIC], env=proxy_env)
        load = producer = None
        try:
            proxy.start()
            load = LoadClients(proxy.port, clients).start()
            producer = ProducerProcess(broker.bootstrap_servers, TOPIC, steps[0] * per_client, linger_ms=LINGER_MS).start()
            meter = CpuMeter({"proxy": proxy.pid, "clients": load.pid, "producer": producer.pid,
                              "broker": broker.process.pid})
            for step in steps:
                rate = step * per_client
                producer.set_rate(rate)
                time.sleep(SETTLE_SECONDS)
                result = window(load, step_seconds, meter, proxy)
                # At full speed (rate 0) nothing was promised, so nothing can be called sustained.
                kept_up = rate > 0 and result["delivered_per_s"] >= SUSTAINED * rate * clients
                result.update(step=step, rate=rate, sustained=kept_up and not result["closed"])
                results.append(result)
                if not result["sustained"]:
                    break
            producer.result()
        finally:
            for process in (producer, load, proxy):
                if process is not None:
                    process.stop()
    return results


def ceiling(clients: int, seconds: float, per_frame: int) -> dict:
    """The same clients against a bare Tornado server streaming frames of per_frame messages."""
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(BENCH, "broadcast_ceiling.py"), "--port", str(port),
                               "--per-frame", str(per_frame)], env=ENV, stdout=subprocess.PIPE, text=True)
    load = None
    try:
        if not server.stdout.readline().startswith("READY"):
            raise RuntimeError(f"ceiling server did not start (exit code {server.poll()})")
        load = LoadClients(port, clients).start()
        time.sleep(SETTLE_SECONDS)
        return window(load, seconds, CpuMeter({"server": server.pid, "clients": load.pid}))
    finally:
        if load is not None:
            load.stop()
        terminate(server, 10.0)


def run(clients: int = 50, steps: tuple[float, ...] = STEPS, step_seconds: float = 3.0, partitions: int = 1,
        proxy_env: dict[str, str] | None = None) -> dict:
    """Delivery through the proxy (steps) and the ceiling; "ratio" is the best sustained rate / target."""
    steps_run = through_proxy(clients, steps, step_seconds, partitions, proxy_env or {})
    sustained = [step for step in steps_run if step["sustained"]]
    best = sustained[-1] if sustained else None
    shown = best or steps_run[0]
    per_frame = max(1, round(shown["messages"] / shown["frames"])) if shown["frames"] else 100
    bare = ceiling(clients, max(step_seconds, 3.0), per_frame)
    delivered = best["delivered_per_s"] if best else 0.0
    return {"clients": clients, "steps": steps_run, "best": best, "delivered_per_s": delivered,
            "per_frame": per_frame, "ceiling_per_s": bare["delivered_per_s"], "bare": bare, "target": TARGET,
            "ratio": delivered / TARGET, "ratio_ceiling": delivered / bare["delivered_per_s"]}


def report(result: dict) -> None:
    clients = result["clients"]
    print(f"delivery: {clients} websocket clients; producer rate in steps of target/{clients} = "
          f"{TARGET / clients:,.0f} records/s")
    print(f"  {'step':>5} {'records/s':>10} {'delivered/s':>12} {'per client min':>14} {'consumed/s':>10} "
          f"{'MB/s':>6} {'msgs/frame':>10} {'closed':>6}  CPU proxy/clients/producer/broker")
    for step in result["steps"]:
        cpu = step["cpu"]
        per_frame = step["messages"] / step["frames"] if step["frames"] else 0
        rate = f"{step['rate']:,.0f}" if step["rate"] else "max"
        print(f"  {step['step']:>5} {rate:>10} {step['delivered_per_s']:>12,.0f} "
              f"{step['per_client_min']:>14,.0f} {step['consumed_per_s']:>10,.0f} {step['bytes_per_s'] / 1e6:>6.0f} "
              f"{per_frame:>10.0f} {step['closed']:>6}  "
              f"{cpu['proxy']:.0%}/{cpu['clients']:.0%}/{cpu['producer']:.0%}/{cpu['broker']:.0%}"
              f"{'' if step['sustained'] else '  <- not sustained'}")
    dropped = result["steps"][-1]["dropped"]
    bare = result["bare"]
    print(f"  sessions dropped as slow: {dropped:.0f}")
    print(f"  ceiling (bare Tornado, pre-encoded frames of {result['per_frame']} msgs): "
          f"{result['ceiling_per_s']:,.0f} msgs/s ({bare['bytes_per_s'] / 1e6:.0f} MB/s); CPU: {format_cpu(bare['cpu'])}")
    print(f"  sustained: {result['delivered_per_s']:,.0f} msgs/s ({result['delivered_per_s'] / clients:,.0f}/client) "
          f"= {result['ratio']:.2f} x target ({TARGET:,}/s), {result['ratio_ceiling']:.2f} x ceiling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--steps", default=",".join(map(str, STEPS)),
                        help="producer rates as multiples of target/clients, comma-separated (0: full speed)")
    parser.add_argument("--step-seconds", type=float, default=3.0, help="measurement window of each step")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the proxy process (repeatable), e.g. MALLOC_TRIM_THRESHOLD_=...")
    args = parser.parse_args()
    steps = tuple(float(step) for step in args.steps.split(","))
    proxy_env = dict(setting.split("=", 1) for setting in args.proxy_env)
    report(run(args.clients, steps, args.step_seconds, args.partitions, proxy_env))


if __name__ == "__main__":
    main()
