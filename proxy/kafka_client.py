"""The one place that knows confluent-kafka's quirks; the rest of the proxy sees plain values."""

from __future__ import annotations

import logging
import re
import time
import typing

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

log = logging.getLogger("proxy.kafka")


class RepeatedLogFilter(logging.Filter):
    """Lets a librdkafka message through once per interval: while a broker is down it repeats
    the same connect failure many times a second."""

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self._last_seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        if now - self._last_seen.get(key, -self.interval) < self.interval:
            return False
        if len(self._last_seen) > 1000:
            self._last_seen.clear()
        self._last_seen[key] = now
        return True


log.addFilter(RepeatedLogFilter())

# librdkafka refuses a consumer without group.id even when partitions are assigned by hand.
# The proxy never joins the group nor commits, so any fixed name will do.
UNUSED_GROUP_ID = "kafka-reverse-proxy-unused"

# Defaults for a consumer that feeds live screens. A caller's properties override them.
LIVE_CONSUMER_DEFAULTS = {
    # Apache Kafka answers as soon as data is there, but some brokers (Tansu) always wait the
    # full time: keep it short so a message reaches the screens within tens of milliseconds.
    "fetch.wait.max.ms": "10",
    "auto.offset.reset": "earliest",
    "socket.keepalive.enable": "true",
    "reconnect.backoff.max.ms": "5000",
}

class KafkaUnavailable(Exception):
    """The Kafka cluster could not be reached or answered with an error."""


def make_consumer(properties: typing.Mapping[str, str], *, defaults: typing.Mapping[str, str] = LIVE_CONSUMER_DEFAULTS,
                  error_cb: typing.Callable[[KafkaError], None] | None = None) -> Consumer:
    """A consumer for manual assignment: no group membership, no commits, partition EOF events."""
    conf: dict[str, typing.Any] = dict(defaults)
    conf.update(properties)
    conf.update({
        "group.id": conf.get("group.id", UNUSED_GROUP_ID),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
    })
    if error_cb is not None:
        conf["error_cb"] = error_cb
    try:
        return Consumer(conf, logger=log)
    except KafkaException as exc:
        # librdkafka quotes the offending value, which may be a secret: blank every value out.
        raise ValueError(f"invalid Kafka client settings: {scrub(exc.args[0].str(), properties)}") from None


def consume_available(consumer: Consumer, max_messages: int, wait: float) -> list[typing.Any]:
    """What is queued (up to max_messages), waiting at most `wait` seconds only when nothing is.

    consume(n, timeout) returns only once it has n messages or the timeout passed, which adds the
    whole timeout to every batch at low rates. The wait ends at the first record of a fetch; the
    rest of that fetch came with it, so take it too instead of handing on one record alone.
    """
    messages = consumer.consume(max_messages, 0)
    if not messages:
        messages = consumer.consume(1, wait)
        if messages:
            messages += consumer.consume(max_messages - 1, 0)
    return messages


def list_partitions(client: typing.Any, timeout: float) -> dict[str, list[int]]:
    """Topic name → partition ids, without creating topics; raises KafkaUnavailable."""
    try:
        metadata = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(describe(exc.args[0])) from None
    return {
        name: sorted(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None or topic.error.code() == KafkaError.NO_ERROR
    }


def watermarks(consumer: Consumer, topic: str, partition: int, timeout: float) -> tuple[int, int]:
    """(low, high) offsets of a partition, asked from the broker.

    Some brokers (Tansu) report a high mark that is too small; callers must only use it to start
    early, never to decide where the end is (use partition EOF events for that).
    """
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(describe(exc.args[0])) from None
    return low, high


def cached_high_watermark(consumer: Consumer, topic: str, partition: int) -> int | None:
    """The high mark carried by the latest fetch response (no broker round trip), if known."""
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
    except KafkaException:
        return None
    return high if high >= 0 else None


def describe(error: typing.Any) -> str:
    """A short message for a KafkaError that never includes client settings."""
    if isinstance(error, KafkaError):
        return f"{error.name()}: {error.str()}"
    return str(error)


def scrub(text: str, properties: typing.Mapping[str, str]) -> str:
    """text with every property value (but the bootstrap list) replaced by ***."""
    for key, value in properties.items():
        if key != "bootstrap.servers" and len(str(value)) >= 3:
            text = text.replace(str(value), "***")
    return text
