"""The one place that knows confluent-kafka: KafkaReader hands the rest of the proxy plain values.

Everything librdkafka-specific lives here: error codes, partition-EOF events, pause/resume/seek,
watermarks that some brokers get wrong, timeouts, and scrubbing settings out of its messages.
Callers get records (objects with topic(), partition(), offset(), value(), timestamp()),
partition-end events, and KafkaUnavailable.
"""

from __future__ import annotations

import logging
import re
import time
import typing
from collections.abc import Callable, Iterable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

log = logging.getLogger("proxy.kafka")

# Where to start reading a partition: its first record still in Kafka.
BEGINNING = OFFSET_BEGINNING

PartitionKey = tuple[str, int]


class RepeatedLogFilter(logging.Filter):
    """Lets a librdkafka message through once per interval (a broker that is down repeats the
    same connect failure many times a second), with every expanded secret blanked out."""

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self._last_seen: dict[str, float] = {}
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secrets:
            # librdkafka echoes property values in configuration warnings: scrub them all.
            scrubbed = _replace_secrets(message, self.secrets)
            if scrubbed != message:
                record.msg, record.args, message = scrubbed, None, scrubbed
        key = re.sub(r"\d+", "#", message)
        now = time.monotonic()
        if now - self._last_seen.get(key, -self.interval) < self.interval:
            return False
        if len(self._last_seen) > 1000:
            self._last_seen.clear()
        self._last_seen[key] = now
        return True


LOG_FILTER = RepeatedLogFilter()
log.addFilter(LOG_FILTER)

# librdkafka refuses a consumer without group.id even when partitions are assigned by hand.
# The proxy never joins the group nor commits, so any fixed name will do.
UNUSED_GROUP_ID = "kafka-reverse-proxy-unused"

# Defaults for the consumer that feeds live screens. The config's kafka section overrides them.
LIVE_CONSUMER_DEFAULTS = {
    # How long the broker may hold a fetch while a partition has no new data. Apache Kafka
    # answers as soon as data is there (fetch.min.bytes=1), so this bounds only idle waits:
    # librdkafka's 500 ms keeps an idle proxy cheap for the cluster. Brokers that always wait the
    # full time (Tansu, the embedded test broker) need a short wait in their config instead;
    # the demo, the tests and the benchmarks set it (see README, Performance).
    "fetch.wait.max.ms": "500",
    "auto.offset.reset": "earliest",
    "socket.keepalive.enable": "true",
    "reconnect.backoff.max.ms": "5000",
}

# Error codes that mean "the cluster is unreachable", as opposed to a problem with one record.
_UNREACHABLE = (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE)
_UNKNOWN_TOPIC = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION)


class KafkaUnavailable(Exception):
    """The Kafka cluster could not be reached or answered with an error."""


class ClientEvents(typing.Protocol):
    """What a KafkaReader tells its owner about the connection (called on the reading thread)."""

    def unreachable(self, reason: str, all_brokers_down: bool) -> None: ...

    def reached(self) -> None: ...


class Batch(typing.NamedTuple):
    """One read: records in partition order, and the partitions whose end was reached.

    ends maps each such partition to the number of records of the batch that came before its
    end event: records of that partition at or past that index were written after the end.
    """

    records: list[typing.Any]
    ends: dict[PartitionKey, int]


class KafkaReader:
    """A consumer with manual assignment: no group membership, no commits, partition-end events."""

    def __init__(self, properties: Mapping[str, str], *, defaults: Mapping[str, str] = LIVE_CONSUMER_DEFAULTS,
                 secrets: Iterable[str] = (), events: ClientEvents | None = None,
                 record_errors_fail: bool = False):
        """Bad settings raise ValueError (never echoing a value, which may be a secret).

        secrets: values that came from the environment (${VAR}); blanked out of every log line.

        record_errors_fail: an error event on a partition raises KafkaUnavailable (exports) instead
        of being logged and skipped (the live stream, which must keep going).
        """
        conf: dict[str, typing.Any] = dict(defaults)
        conf.update(properties)
        conf.update({
            "group.id": conf.get("group.id", UNUSED_GROUP_ID),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "error_cb": self._on_error,
        })
        self._events = events
        self._record_errors_fail = record_errors_fail
        self.fatal_error: str | None = None
        self.last_error: str | None = None
        LOG_FILTER.secrets.update(secret for secret in secrets if len(secret) >= 3)
        try:
            self._consumer = Consumer(conf, logger=log)
        except KafkaException as exc:
            raise ValueError(f"invalid Kafka client settings: {scrub(exc.args[0].str(), properties)}") from None

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> KafkaReader:
        return self

    def __exit__(self, *exc_info: typing.Any) -> None:
        self.close()

    # ---- metadata ----------------------------------------------------------------------------

    def list_partitions(self, timeout: float) -> dict[str, list[int]]:
        """Topic name → partition ids, without creating topics; raises KafkaUnavailable."""
        try:
            metadata = self._consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise KafkaUnavailable(describe(exc.args[0])) from None
        return {
            name: sorted(topic.partitions)
            for name, topic in metadata.topics.items()
            if topic.error is None or topic.error.code() == KafkaError.NO_ERROR
        }

    def watermarks(self, topic: str, partition: int, timeout: float) -> tuple[int, int]:
        """(low, high) offsets of a partition, asked from the broker.

        Some brokers (Tansu) report a high mark that is too small; use it only to start early,
        never to decide where the end is (partition-end events say that).
        """
        try:
            return self._consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
        except KafkaException as exc:
            raise KafkaUnavailable(describe(exc.args[0])) from None

    def cached_high_watermark(self, topic: str, partition: int) -> int | None:
        """The high mark carried by the latest fetch response (no broker round trip), if known."""
        try:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        except KafkaException:
            return None
        return high if high >= 0 else None

    # ---- assignment --------------------------------------------------------------------------

    def assign(self, starts: Mapping[PartitionKey, int]) -> None:
        """Read exactly these partitions, each from its start offset (or BEGINNING)."""
        self._consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])

    def add(self, starts: Mapping[PartitionKey, int]) -> None:
        """Read these partitions too, keeping the current ones where they are."""
        self._consumer.incremental_assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])

    def pause(self, keys: Iterable[PartitionKey]) -> None:
        self._consumer.pause([TopicPartition(t, p) for t, p in keys])

    def resume(self, keys: Iterable[PartitionKey]) -> None:
        self._consumer.resume([TopicPartition(t, p) for t, p in keys])

    def rewind(self, key: PartitionKey) -> None:
        """Read a partition again from its first record."""
        self._housekeeping(lambda: self._consumer.seek(TopicPartition(key[0], key[1], OFFSET_BEGINNING)))

    def positions(self, keys: Iterable[PartitionKey]) -> dict[PartitionKey, int]:
        """The next offset to read per partition; -1 while unknown (before the first record)."""
        positions = self._housekeeping(lambda: self._consumer.position([TopicPartition(t, p) for t, p in keys]))
        return {(tp.topic, tp.partition): tp.offset for tp in positions}

    # ---- reading -----------------------------------------------------------------------------

    def read(self, max_records: int, wait: float) -> Batch:
        """What is queued (up to max_records), waiting at most `wait` seconds only when nothing is.

        confluent-kafka's consume(n, timeout) returns only once it has n messages or the timeout
        passed, which adds the whole timeout to every batch at low rates. The wait ends at the
        first record of a fetch; the rest of that fetch came with it, so it is taken too.
        """
        consumer = self._consumer
        try:
            messages = consumer.consume(max_records, 0)
            if not messages:
                messages = consumer.consume(1, wait)
                if messages:
                    messages += consumer.consume(max_records - 1, 0)
        except KafkaException as exc:
            raise KafkaUnavailable(f"Kafka client failed: {describe(exc.args[0])}") from None
        if self.fatal_error is not None:
            raise KafkaUnavailable(f"Kafka client failed: {self.fatal_error}")
        records: list[typing.Any] = []
        ends: dict[PartitionKey, int] = {}
        append = records.append
        for message in messages:
            error = message.error()
            if error is None:
                append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                ends.setdefault((message.topic(), message.partition()), len(records))
            elif self._record_errors_fail:
                raise KafkaUnavailable(f"Kafka error on {message.topic()}[{message.partition()}]: {describe(error)}")
            elif error.code() in _UNKNOWN_TOPIC:
                log.debug("Kafka: %s", describe(error))
            else:
                log.warning("Kafka consumer error: %s", describe(error))
        if (records or ends) and self._events is not None:
            self._events.reached()
        return Batch(records, ends)

    # ---- internals ---------------------------------------------------------------------------

    def _housekeeping(self, call: Callable[[], typing.Any]) -> typing.Any:
        try:
            return call()
        except KafkaException as exc:
            raise KafkaUnavailable(describe(exc.args[0])) from None

    def _on_error(self, error: KafkaError) -> None:
        # Called from inside consume(), on the reading thread.
        description = describe(error)
        self.last_error = description
        if error.fatal():
            self.fatal_error = description
            log.error("Kafka client failed: %s", description)
        elif error.code() in _UNREACHABLE:
            if self._events is not None:
                self._events.unreachable(description, error.code() == KafkaError._ALL_BROKERS_DOWN)
        elif self._events is not None:
            log.warning("Kafka client error: %s", description)


def describe(error: typing.Any) -> str:
    """A short message for a KafkaError that never includes client settings."""
    if isinstance(error, KafkaError):
        return _replace_secrets(f"{error.name()}: {error.str()}", LOG_FILTER.secrets)
    return _replace_secrets(str(error), LOG_FILTER.secrets)


def scrub(text: str, properties: Mapping[str, str]) -> str:
    """text with every property value (but the bootstrap list) replaced by ***."""
    return _replace_secrets(text, {str(value) for key, value in properties.items()
                                   if key != "bootstrap.servers" and len(str(value)) >= 3})


def _replace_secrets(text: str, secrets: typing.Collection[str]) -> str:
    # Longest first, so a value that contains another is blanked whole.
    for value in sorted(secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***")
    return text
