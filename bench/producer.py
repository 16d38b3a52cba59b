"""A benchmark producer: realistic Price Wars records into one topic, paced or at full speed.

The records come from the market simulator (every topic's shape, ~500 B of JSON), rendered once
before the clock starts and then cycled, so the producer spends its CPU on producing. Records the
proxy would drop (failed requests) are left out: every record produced is one the clients get.
Kafka stamps each record when produce() is called (CreateTime), which is where the latency
benchmark starts its clock.

    python bench/producer.py --bootstrap HOST:PORT --topic T [--rate 10000] [--duration 20]

"RATE <records/s>" on stdin changes the rate (0: as fast as possible); "STOP" or the end of stdin
stops it. Prints {"produced": N, "seconds": S} when done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import typing

import ujson
from confluent_kafka import Producer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.demo.simulator import MarketSimulator  # noqa: E402

TICK = 0.001  # the paced producer sends what is due every millisecond


def realistic_values(count: int, seed: int = 1) -> list[bytes]:
    """count simulator records the proxy forwards (no failed requests), JSON-encoded."""
    events = MarketSimulator("unused:9092", seed=seed).events()
    values: list[bytes] = []
    while len(values) < count:
        _, record = next(events)
        if record.get("http_code", 200) == 200:
            values.append(ujson.dumps(record, escape_forward_slashes=False).encode())
    return values


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


def produce(bootstrap: str, topic: str, pace: Pace, duration: float, linger_ms: float) -> dict:
    values = realistic_values(5000)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                         "delivery.report.only.error": True})
    produced = 0
    started = time.monotonic()
    deadline = started + duration
    # Records due = base + rate * (now - since): a rate change restarts the count from there.
    since, base = started, 0
    while not pace.stopped.is_set():
        now = time.monotonic()
        if now >= deadline:
            break
        if pace.changed.is_set():
            pace.changed.clear()
            since, base = now, produced
        rate = pace.rate
        due = int(base + (now - since) * rate) - produced if rate else 1000
        for _ in range(due):
            try:
                producer.produce(topic, values[produced % len(values)])
            except BufferError:
                producer.poll(0.01)
                break
            produced += 1
        producer.poll(0)
        if rate:
            time.sleep(TICK)
    seconds = time.monotonic() - started
    producer.flush(5)
    return {"produced": produced, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="records per second (0: as fast as possible)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--linger-ms", type=float, default=2.0)
    args = parser.parse_args()
    pace = Pace(args.rate)
    threading.Thread(target=pace.follow, args=(sys.stdin,), daemon=True).start()
    print(json.dumps(produce(args.bootstrap, args.topic, pace, args.duration, args.linger_ms)), flush=True)


if __name__ == "__main__":
    main()
