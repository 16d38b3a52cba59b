"""Peak memory of a CSV export of N and of 10·N records: it must not grow with the topic.

Starts an embedded Tansu broker, writes two buyOffer-like topics (N and 10·N records, all owned by
the exporting merchant so every record becomes a CSV row), then exports each in a fresh Python
process and prints the peak RSS (ru_maxrss) of both and the difference.

The export's buffers are bounded (librdkafka's queue, the merge's read-ahead per partition), so
peak memory rises with the topic only until they are full: from roughly 50,000 records of this
size on. Below that the small export does not fill them and the difference overstates growth.

    PYTHONPATH=. python bench/export_memory.py [--records N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MERCHANT = "YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew="
BASE_TIME_MS = 1_521_194_400_000


def peak_rss_kib() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def fill_topic(bootstrap: str, topic: str, count: int, partitions: int) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(count):
        sale = {"offer_id": i, "uid": 11, "product_id": 1 + i % 10, "quality": 1 + i % 4, "price": 10 + i % 400 / 4,
                "amount": 1, "merchant_id": MERCHANT, "left_in_stock": i % 30,
                "consumer_id": "M+vLAIwHTf3zXqLi1rd/S9AjcOJFGHS2LwQN6p6V7nI=", "http_code": 200,
                "timestamp": "2018-03-16T10:01:01.673Z"}
        while True:
            try:
                producer.produce(topic, json.dumps(sale).encode(), partition=i % partitions,
                                 timestamp=BASE_TIME_MS + i)
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise SystemExit(f"could not write {topic}")


def export_in_this_process(bootstrap: str, topic: str) -> None:
    """Child: one export of `topic`; prints its figures as JSON."""
    from proxy.config import TopicExportConfig
    from proxy.export.data_folder import DataFolder
    from proxy.export.service import ExportService
    from proxy.config import default_topic_rules
    from proxy.policy import VisibilityPolicy

    rules: dict[str, TopicExportConfig] = {topic: default_topic_rules()["buyOffer"]}
    with tempfile.TemporaryDirectory() as data_dir:
        service = ExportService({"bootstrap.servers": bootstrap}, VisibilityPolicy(rules),
                                DataFolder(data_dir, 3600, 1024 ** 4))
        before = peak_rss_kib()
        started = time.monotonic()
        result = asyncio.run(service.export_to_file(topic, MERCHANT))
        seconds = time.monotonic() - started
    print(json.dumps({"rows": result.rows, "bytes": result.bytes, "seconds": round(seconds, 2),
                      "rss_before_kib": before, "peak_rss_kib": peak_rss_kib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50000, help="N: records of the small topic (default 50000)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("BOOTSTRAP", "TOPIC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        export_in_this_process(*args.child)
        return

    from proxy.demo.broker import TansuBroker

    sizes = {"small": args.records, "large": 10 * args.records}
    with TansuBroker() as broker:
        broker.create_topics([f"bench-{name}" for name in sizes], partitions=args.partitions)
        for name, count in sizes.items():
            fill_topic(broker.bootstrap_servers, f"bench-{name}", count, args.partitions)
        figures = {}
        for name in sizes:
            child = subprocess.run([sys.executable, __file__, "--child", broker.bootstrap_servers, f"bench-{name}"],
                                   capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=REPO))
            figures[name] = json.loads(child.stdout.strip().splitlines()[-1])
    for name, count in sizes.items():
        figure = figures[name]
        print(f"{name:>5}: {count:>8} records -> {figure['rows']:>8} rows, {figure['bytes'] / 1e6:7.1f} MB CSV "
              f"in {figure['seconds']:5.1f} s ({figure['rows'] / max(figure['seconds'], 1e-9):,.0f} rows/s); "
              f"RSS before export {figure['rss_before_kib'] / 1024:6.1f} MiB, peak {figure['peak_rss_kib'] / 1024:6.1f} MiB")
    difference = (figures["large"]["peak_rss_kib"] - figures["small"]["peak_rss_kib"]) / 1024
    print(f"peak RSS difference (10x records): {difference:+.1f} MiB")


if __name__ == "__main__":
    main()
