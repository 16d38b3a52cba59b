"""Ingest throughput: the proxy's consumer path against a bare confluent-kafka + ujson loop.

Both read the same topic from the same embedded broker in the same run; the ratio is what
counts (target: proxy >= 0.8 x bare loop).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import ujson
from confluent_kafka import Consumer, TopicPartition

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.config import Config, kafka_settings  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402
from proxy.demo.simulator import MarketSimulator  # noqa: E402
from proxy.kafka import KafkaReader  # noqa: E402
from proxy.live.decode import RecordDecoder  # noqa: E402
from proxy.live.fanout import LiveHub  # noqa: E402
from proxy.live.ingest import KafkaIngest  # noqa: E402


def fill_topic(bootstrap: str, topic: str, count: int) -> int:
    """count realistic Price Wars records (all topics' shapes) into one topic; returns bytes."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.num.messages": 10000})
    events = MarketSimulator(bootstrap, seed=1).events()
    size = 0
    for _ in range(count):
        _, value = next(events)
        raw = ujson.dumps(value).encode()
        size += len(raw)
        while True:
            try:
                producer.produce(topic, raw)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)
    return size


def bare_loop(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    """Seconds a plain consume + ujson.loads loop needs for count records."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen = 0
    started = time.perf_counter()
    while seen < count:
        for message in consumer.consume(1000, 0.1):
            if message.error() is None:
                ujson.loads(message.value())
                seen += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def proxy_path(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    """Seconds the proxy's live ingest path (consumer thread → IOLoop → history) needs."""
    config = Config(kafka_url=bootstrap, topics=[topic])

    async def main() -> float:
        loop = asyncio.get_running_loop()
        hub = LiveHub([topic], 100)

        decoder = RecordDecoder(config.topics, config.live.drop_failed_requests)
        ingest = KafkaIngest(kafka_settings(config), config.topics, config.history_size,
                             config.topic_refresh_interval, decoder, hub.load_history, hub.publish,
                             loop.call_soon_threadsafe, wants_every_message=lambda: hub.session_count() > 0)
        consumer = KafkaReader(ingest.kafka.properties)
        assignment = {(topic, p): 0 for p in range(partitions)}
        consumer.assign(assignment)
        ingest._remember(assignment)
        ingest.health.history_loaded = True
        started = time.perf_counter()
        thread = threading.Thread(target=ingest._follow, args=(consumer,), daemon=True)
        thread.start()
        # Records consumed (failed requests are read, then filtered out: they count too).
        while sum(ingest.stats.consumed_by_topic().values()) < count:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        ingest._stop.set()
        thread.join()
        consumer.close()
        return elapsed

    return asyncio.run(main())


def run(count: int = 100_000, partitions: int = 1) -> dict:
    with TansuBroker() as broker:
        topic = "bench-ingest"
        broker.create_topics([topic], partitions=partitions)
        size = fill_topic(broker.bootstrap_servers, topic, count)
        # Warm the broker's and the client's caches once, then measure alternately.
        bare_loop(broker.bootstrap_servers, topic, partitions, count)
        bare, proxy = [], []
        for _ in range(2):
            bare.append(bare_loop(broker.bootstrap_servers, topic, partitions, count))
            proxy.append(proxy_path(broker.bootstrap_servers, topic, partitions, count))
    bare_rate, proxy_rate = count / min(bare), count / min(proxy)
    return {"records": count, "avg_bytes": size / count, "bare_per_s": bare_rate,
            "proxy_per_s": proxy_rate, "ratio": proxy_rate / bare_rate}


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
    print(f"ingest: {result['records']} records of ~{result['avg_bytes']:.0f} B: bare loop "
          f"{result['bare_per_s']:,.0f}/s, proxy {result['proxy_per_s']:,.0f}/s, "
          f"ratio {result['ratio']:.2f} (target >= 0.80)")
