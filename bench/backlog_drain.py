"""Backlog drain: how fast the proxy gets a 200,000-record backlog to one websocket client.

The proxy runs with the shipped config (13 topics) against a fresh embedded broker whose topics
have --partitions partitions. One websocket client (its own process, reading at full speed)
connects; the proxy is then frozen with SIGSTOP while the producer writes the backlog of ~270 B
buyOffer records into `buyOffer`, and resumed with SIGCONT. Measured: from SIGCONT until the client
has every record, against a bare confluent-kafka consumer + ujson.loads reading the same backlog
from the same broker in the same run (bench/bare_consumer.py, before and after; the faster run
counts). Target: >= 0.8 x the bare consumer, and a client that reads at full speed is never closed.

    PYTHONPATH=. python bench/backlog_drain.py [--records 200000] [--partitions 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.processes import (  # noqa: E402
    BENCH, ENV, TANSU_FETCH_WAIT_MS, CpuMeter, LoadClients, MachineCpu, ProducerProcess, Profiler, ProxyProcess,
    cpu_summary, format_cpu, memory_kib)
from proxy.config import default_topics  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402

TARGET_RATIO = 0.8
TOPIC = "buyOffer"
DRAIN_TIMEOUT = 120.0


def bare_consumer(bootstrap: str, topic: str, partitions: int) -> dict:
    """bench/bare_consumer.py over the topic, in a child process: {"records", "seconds", "cpu_seconds"}."""
    completed = subprocess.run([sys.executable, os.path.join(BENCH, "bare_consumer.py"), "--bootstrap", bootstrap,
                                "--topic", topic, "--partitions", str(partitions),
                                "--fetch-wait-ms", str(TANSU_FETCH_WAIT_MS)],
                               env=ENV, capture_output=True, text=True, timeout=180, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, grouped: the main thread (the proxy's IOLoop),
    librdkafka's threads (named rdk:*), and the other Python threads (the consumer thread)."""
    groups = {"ioloop": 0.0, "python_threads": 0.0, "librdkafka": 0.0}
    ticks = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                stat = handle.read()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        group = "ioloop" if int(tid) == pid else "librdkafka" if name.startswith("rdk:") else "python_threads"
        groups[group] += seconds
    return groups


def run(records: int = 200_000, partitions: int = 4) -> dict:
    """Drain rate through the proxy vs the bare consumer; "ratio" is proxy / bare (>= 0.8 passes)."""
    with TansuBroker() as broker:
        broker.create_topics(default_topics(), partitions=partitions)
        proxy = ProxyProcess(broker.bootstrap_servers)
        client = None
        try:
            proxy.start()
            client = LoadClients(proxy.port, 1, histories=len(default_topics())).start()
            before_metrics = proxy.metrics()
            proxy.suspend()
            producer = ProducerProcess(broker.bootstrap_servers, TOPIC, rate=0, shape="buyOffer", count=records,
                                       duration=DRAIN_TIMEOUT).start()
            producer_started = time.monotonic()
            produced = producer.result(DRAIN_TIMEOUT, stop=False)
            producer_cpu = produced.get("cpu_seconds")
            produce_seconds = time.monotonic() - producer_started
            if produced["produced"] != records or produced["failed"]:
                raise RuntimeError(f"producer wrote {produced['produced']} of {records} ({produced['failed']} failed)")
            bare = [bare_consumer(broker.bootstrap_servers, TOPIC, partitions)]
            before = client.ask("COUNT")
            meter = CpuMeter({"proxy": proxy.pid, "client": client.pid, "broker": broker.process.pid}).start()
            machine = MachineCpu().start()
            threads_before = thread_cpu(proxy.pid)
            with Profiler(proxy.pid, f"backlog-drain-{partitions}p"):
                resumed = time.monotonic()
                proxy.resume()
                after = client.ask(f"UNTIL {before['messages'] + records} {DRAIN_TIMEOUT}", timeout=DRAIN_TIMEOUT + 10)
                cpu_seconds = meter.seconds()
                machine_cores = machine.stop()
                threads_after = thread_cpu(proxy.pid)
            drain_wall = after["time"] - resumed
            after_metrics = proxy.metrics()
            memory = memory_kib(proxy.pid)
            bare.append(bare_consumer(broker.bootstrap_servers, TOPIC, partitions))
        finally:
            if client is not None:
                client.stop()
            proxy.stop()
    received = after["messages"] - before["messages"]
    best_bare = min(bare, key=lambda figure: figure["seconds"])
    bare_rate = best_bare["records"] / best_bare["seconds"]
    proxy_rate = received / drain_wall
    consumed = after_metrics.get("proxy_messages_consumed_total", 0) - before_metrics.get(
        "proxy_messages_consumed_total", 0)
    return {
        "records": records, "partitions": partitions, "received": received, "seconds": drain_wall,
        "proxy_per_s": proxy_rate, "bare_per_s": bare_rate, "bare_runs": bare, "ratio": proxy_rate / bare_rate,
        "target": TARGET_RATIO, "closed": after["closed"], "close_codes": after["close_codes"],
        "dropped": after_metrics.get("proxy_slow_sessions_dropped_total", 0),
        # Time the consumer thread waited because the client's queue was over its limit.
        "ingest_waited_seconds": after_metrics.get("proxy_ingest_backpressure_seconds_total", 0) - before_metrics.get(
            "proxy_ingest_backpressure_seconds_total", 0),
        "cpu": cpu_summary({name: used / drain_wall for name, used in cpu_seconds.items()}, machine_cores),
        # Not during the drain: the producer ran while the proxy was stopped, the bare consumer alone.
        "cpu_producer_while_producing": (producer_cpu or 0) / max(produce_seconds, 1e-9),
        "cpu_bare_consumer": best_bare["cpu_seconds"] / best_bare["seconds"],
        "proxy_us_per_ingested": 1e6 * cpu_seconds["proxy"] / max(consumed, 1),
        "proxy_us_per_delivered": 1e6 * cpu_seconds["proxy"] / max(received, 1),
        "proxy_us_per_record_by_thread": {name: 1e6 * (threads_after[name] - used) / max(consumed, 1)
                                          for name, used in threads_before.items()},
        "bare_us_per_record": 1e6 * best_bare["cpu_seconds"] / max(best_bare["records"], 1),
        "produce_seconds": produce_seconds, "proxy_rss_mib": memory["rss"] / 1024,
        "proxy_peak_rss_mib": memory["peak"] / 1024,
        "passed": proxy_rate / bare_rate >= TARGET_RATIO and not after["closed"] and received >= records,
    }


def report(result: dict) -> None:
    bare_rates = [f"{run['records'] / run['seconds']:,.0f}/s" for run in result["bare_runs"]]
    print(f"backlog drain: {result['records']:,} buyOffer records, {result['partitions']} partition(s) per topic, "
          f"13-topic config, 1 websocket client")
    print(f"  proxy: {result['received']:,} delivered in {result['seconds']:.2f} s = {result['proxy_per_s']:,.0f}/s; "
          f"bare consumer + ujson.loads: {result['bare_per_s']:,.0f}/s "
          f"(runs: {', '.join(bare_rates)})")
    print(f"  client closed: {result['closed']} {result['close_codes'] or ''}; sessions dropped as slow: "
          f"{result['dropped']:.0f}; ingest waited for the client {result['ingest_waited_seconds']:.2f} s; "
          f"proxy RSS {result['proxy_rss_mib']:.0f} MiB (peak {result['proxy_peak_rss_mib']:.0f})")
    print(f"  proxy CPU {result['proxy_us_per_ingested']:.1f} us per ingested record, "
          f"{result['proxy_us_per_delivered']:.1f} us per delivered message "
          f"(bare consumer {result['bare_us_per_record']:.1f} us per record)")
    print("  proxy CPU per ingested record by thread: " + ", ".join(
        f"{name} {us:.1f} us" for name, us in result["proxy_us_per_record_by_thread"].items()))
    print(f"  CPU during the drain: {format_cpu(result['cpu'])}; producer while producing "
          f"{result['cpu_producer_while_producing']:.0%}, bare consumer {result['cpu_bare_consumer']:.0%}")
    print(f"  ratio: {result['ratio']:.2f} x bare (target >= {TARGET_RATIO}) -> "
          f"{'meets' if result['passed'] else 'misses'} the target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    report(run(args.records, args.partitions))


if __name__ == "__main__":
    main()
