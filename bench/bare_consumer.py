"""The ceiling of any Python Kafka reader: a bare confluent-kafka consumer + ujson.loads.

Reads every partition of a topic from the beginning to its end (partition EOF events, which are
right on Tansu and Apache Kafka alike), decodes every value and does nothing else. The backlog
drain and the export scan are measured against it, on the same broker and data in the same run.

    python bench/bare_consumer.py --bootstrap HOST:PORT --topic T --partitions N

Prints {"records", "seconds", "cpu_seconds"} (seconds from the first record to the end).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import ujson
from confluent_kafka import Consumer, KafkaError, TopicPartition

BATCH = 1000


def read_to_end(bootstrap: str, topic: str, partitions: int, fetch_wait_ms: int = 10, timeout: float = 120.0) -> dict:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-bare", "enable.auto.commit": False,
                         "enable.partition.eof": True, "fetch.wait.max.ms": fetch_wait_ms})
    consumer.assign([TopicPartition(topic, partition, 0) for partition in range(partitions)])
    at_end: set[int] = set()
    records = 0
    started, cpu_started = None, 0.0
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < partitions and time.monotonic() < deadline:
            for message in consumer.consume(BATCH, 0.1):
                error = message.error()
                if error is None:
                    if started is None:
                        started, cpu_started = time.perf_counter(), cpu_seconds()
                    ujson.loads(message.value())
                    records += 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
        seconds = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close()
    return {"records": records, "seconds": seconds, "cpu_seconds": cpu_seconds() - cpu_started if records else 0.0,
            "complete": len(at_end) == partitions}


def cpu_seconds() -> float:
    """CPU time of this process (every thread: librdkafka's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--fetch-wait-ms", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(read_to_end(args.bootstrap, args.topic, args.partitions, args.fetch_wait_ms)), flush=True)


if __name__ == "__main__":
    main()
