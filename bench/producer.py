"""A benchmark producer: realistic Price Wars records, paced or at full speed.

The records come from the market simulator (every topic's shape, field order and size), rendered
once before the clock starts and then cycled, so the producer spends its CPU on producing. Records
the proxy would drop (failed requests) are left out: every record produced is one the clients get.
Kafka stamps each record when produce() is called (CreateTime), which is where the latency
benchmarks start their clock.

Two ways to route them:
  --topic T [--shape buyOffer]   every record into T (only records of that shape: buyOffer ~270 B)
  --topics addOffer,buyOffer,... each record into the topic the simulator writes it to, keeping
                                 only records of the listed topics (a whole market's live traffic)

    python bench/producer.py --bootstrap HOST:PORT --topic T [--rate 10000] [--duration 20] [--count N]

--owners ID,ID,... gives the records these merchant ids in turn (record i: the (i mod n)-th), so
that each of n merchants' sessions in token mode gets every n-th record of an owner topic.

"RATE <records/s>" on stdin changes the rate (0: as fast as possible); "STOP" or the end of stdin
stops it. Prints {"produced", "by_topic", "failed", "seconds", "bytes", "cpu_seconds"} once every record is acked.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import threading
import time
import typing

import ujson
from confluent_kafka import Producer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.demo.simulator import Merchant, MarketSimulator  # noqa: E402

TICK = 0.001  # the paced producer sends what is due every millisecond
DISTINCT_VALUES = 5000


def realistic_values(count: int, seed: int = 1, shape: str | None = None,
                     merchant_token: str | None = None) -> list[bytes]:
    """count simulator records the proxy forwards (no failed requests), JSON-encoded.

    shape: only records the simulator writes to that topic (buyOffer: ~270 B each); None: every
    topic's shape mixed as the market makes them (~500 B on average, marketSituation ~1.2 kB).
    """
    return [value for _, value in routed_values(count, seed, None if shape is None else [shape], merchant_token)]


def routed_values(count: int, seed: int = 1, topics: typing.Collection[str] | None = None,
                  merchant_token: str | None = None) -> list[tuple[str, bytes]]:
    """count (simulator topic, JSON record) pairs of the given topics (None: all), no failed requests.

    merchant_token: one of the market's three merchants has this token (an export sees its rows).
    """
    merchants = None
    if merchant_token:
        merchants = [Merchant(merchant_token, name="bench"), Merchant.generate("other-1"), Merchant.generate("other-2")]
    events = MarketSimulator("unused:9092", merchants=merchants, seed=seed).events()
    values: list[tuple[str, bytes]] = []
    for _ in range(1000 * count):  # bounded: a topic list the simulator never writes gives nothing
        if len(values) >= count:
            break
        topic, record = next(events)
        if (topics is None or topic in topics) and record.get("http_code", 200) == 200:
            values.append((topic, ujson.dumps(record, escape_forward_slashes=False).encode()))
    if not values:
        raise ValueError(f"the simulator writes none of {sorted(topics or [])}")
    return values


def with_owners(values: list[tuple[str, bytes]], owners: list[str]) -> list[tuple[str, bytes]]:
    """The records with their merchant_id set to the owners in turn (a cycle: len(values) % n == 0)."""
    if len(values) % len(owners):
        raise ValueError(f"{len(values)} distinct records do not cycle through {len(owners)} owners evenly")
    return [(topic, ujson.dumps(dict(ujson.loads(value), merchant_id=owners[number % len(owners)]),
                                escape_forward_slashes=False).encode())
            for number, (topic, value) in enumerate(values)]


class Pace:
    """The producer's rate, changed from stdin ("RATE <records/s>", "STOP") by another thread."""

    def __init__(self, rate: float):
        self.rate = rate
        self.stopped = threading.Event()
        self.changed = threading.Event()

    def follow(self, stream: typing.TextIO) -> None:
        for line in stream:
            word, _, value = line.strip().partition(" ")
            if word == "RATE":
                self.rate = float(value)
                self.changed.set()
            elif word == "STOP":
                break
        self.stopped.set()


def produce(bootstrap: str, values: list[tuple[str, bytes]], pace: Pace, duration: float, linger_ms: float,
            count: int | None = None) -> dict:
    """Cycle values into Kafka at pace.rate until duration, count or STOP; wait for every ack."""
    failures: list[str] = []

    def on_delivery(error: typing.Any, _message: typing.Any) -> None:
        if error is not None:
            failures.append(str(error))

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                         "delivery.report.only.error": True, "on_delivery": on_delivery})
    produced = 0
    size = 0
    by_topic: collections.Counter[str] = collections.Counter()
    limit = count if count is not None else float("inf")
    cpu_started = cpu_seconds()
    started = time.monotonic()
    deadline = started + duration
    # Records due = base + rate * (now - since): a rate change restarts the count from there.
    since, base = started, 0
    while not pace.stopped.is_set() and produced < limit:
        now = time.monotonic()
        if now >= deadline:
            break
        if pace.changed.is_set():
            pace.changed.clear()
            since, base = now, produced
        rate = pace.rate
        due = int(base + (now - since) * rate) - produced if rate else 1000
        for _ in range(int(min(due, limit - produced))):
            topic, value = values[produced % len(values)]
            try:
                producer.produce(topic, value)
            except BufferError:
                producer.poll(0.01)
                break
            produced += 1
            size += len(value)
            by_topic[topic] += 1
        producer.poll(0)
        if rate:
            time.sleep(TICK)
    seconds = time.monotonic() - started
    unsent = producer.flush(60)
    return {"produced": produced, "by_topic": dict(by_topic), "failed": len(failures) + unsent,
            "errors": failures[:3], "seconds": seconds, "bytes": size, "cpu_seconds": cpu_seconds() - cpu_started}


def cpu_seconds() -> float:
    """CPU time of this process (every thread: librdkafka's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    route = parser.add_mutually_exclusive_group(required=True)
    route.add_argument("--topic", help="write every record into this topic")
    route.add_argument("--topics", help="comma-separated: each record into its own simulator topic, these only")
    parser.add_argument("--shape", default=None,
                        help="with --topic: only records shaped like this simulator topic (e.g. buyOffer)")
    parser.add_argument("--rate", type=float, default=0.0, help="records per second (0: as fast as possible)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=None, help="stop after this many records")
    parser.add_argument("--linger-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--merchant-token", default=None, help="one of the simulated merchants has this token")
    parser.add_argument("--owners", default="", help="comma-separated merchant ids the records get in turn")
    parser.add_argument("--topic-suffix", default="",
                        help="with --topics: write to <topic><suffix> (the tests' unique names)")
    args = parser.parse_args()
    if args.topic:
        values = [(args.topic, value)
                  for value in realistic_values(DISTINCT_VALUES, args.seed, args.shape, args.merchant_token)]
    else:
        values = [(topic + args.topic_suffix, value) for topic, value in
                  routed_values(DISTINCT_VALUES, args.seed, args.topics.split(","), args.merchant_token)]
    if args.owners:
        values = with_owners(values, args.owners.split(","))
    pace = Pace(args.rate)
    threading.Thread(target=pace.follow, args=(sys.stdin,), daemon=True).start()
    print("READY", flush=True)
    print(json.dumps(produce(args.bootstrap, values, pace, args.duration, args.linger_ms, args.count)), flush=True)


if __name__ == "__main__":
    main()
