"""Kafka scan: read partitions to their end as of the request, merged by record timestamp."""

from __future__ import annotations

import heapq
import logging
import threading
import time
import typing
from collections import deque
from collections.abc import Iterator, Mapping

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from proxy import kafka_client
from proxy.kafka_client import KafkaUnavailable

# The scan's lines are the export's: they keep the export's logger name.
log = logging.getLogger("proxy.export")

# The export consumer's librdkafka settings; the kafka section of the config may override them.
EXPORT_CONSUMER_DEFAULTS = {
    # Bound the client's read-ahead: librdkafka would queue up to 64 MB, and a slow writer
    # would let memory grow with the topic. fetch.max.bytes must stay below the queue bound.
    "queued.max.messages.kbytes": "4096",
    "fetch.max.bytes": str(1024 * 1024),
    "max.partition.fetch.bytes": str(256 * 1024),
    # With a bounded queue, librdkafka otherwise waits a whole second each time it is full.
    "fetch.queue.backoff.ms": "10",
    # Some brokers (Tansu) hold every fetch for the full wait even when data is there.
    "fetch.wait.max.ms": "10",
    # A start offset deleted by retention meanwhile: go on from the earliest one left.
    "auto.offset.reset": "earliest",
    "allow.auto.create.topics": "false",
}
# Records buffered per partition by the merge. Below about a fetch's worth of records, pausing
# and resuming partitions (which drops what librdkafka had fetched for them) slows exports 10x.
READ_AHEAD_RECORDS = 2000


class ScanCancelled(Exception):
    """The export that owns the scan was cancelled (the client went away, or shutdown)."""


class Record(typing.NamedTuple):
    """One Kafka record as the export reads it."""

    timestamp: int
    topic: str
    partition: int
    offset: int
    value: bytes | None


TopicPartitionKey = tuple[str, int]


class PartitionScanner:
    """One export's own Kafka consumer: metadata, watermarks, and partitions read up to their end.

    Knows how to scan: "the end" is the partition-EOF event, never a precomputed end offset
    (ListOffsets is wrong on some brokers); silence is slowness, not the end, until `timeout`;
    client errors become proxy.kafka_client.KafkaUnavailable, a cancel ScanCancelled.
    proxy.kafka_client builds the consumer.
    """

    BATCH = 1000

    def __init__(self, properties: Mapping[str, typing.Any], timeout: float, cancelled: threading.Event,
                 read_ahead: int = READ_AHEAD_RECORDS):
        self._timeout = timeout
        self._cancelled = cancelled
        self._read_ahead = max(2, read_ahead)
        self._fatal_error: KafkaError | None = None
        self._last_error: KafkaError | None = None
        try:
            self._consumer = kafka_client.make_consumer(properties, defaults=EXPORT_CONSUMER_DEFAULTS,
                                                        error_cb=self._on_error)
        except ValueError as exc:
            raise KafkaUnavailable(str(exc)) from None

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> PartitionScanner:
        return self

    def __exit__(self, *exc_info: typing.Any) -> None:
        self.close()

    def partitions(self) -> dict[str, list[int]]:
        """Partition ids of every topic that exists in Kafka now."""
        try:
            return kafka_client.list_partitions(self._consumer, self._timeout)
        except KafkaUnavailable as exc:
            raise KafkaUnavailable(f"Kafka is unreachable: {exc}") from None

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        """(low, high) offsets. The high one may be too low on some brokers (Tansu): use it only to read more."""
        try:
            return kafka_client.watermarks(self._consumer, topic, partition, self._timeout)
        except KafkaUnavailable as exc:
            raise KafkaUnavailable(f"Kafka is unreachable: {exc}") from None

    def read_range(self, topic: str, partition: int, start: int, end: int | None) -> Iterator[Record]:
        """Records of one partition with start <= offset < end (None: up to the partition's end)."""
        self._consumer.assign([TopicPartition(topic, partition, start)])
        while True:
            for message in self._next_batch():
                if message.topic() != topic or message.partition() != partition:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        return
                    raise KafkaUnavailable(f"Kafka error on {topic}[{partition}]: {kafka_client.describe(error)}")
                offset = message.offset()
                if offset < start:
                    continue
                if end is not None and offset >= end:
                    return
                yield _record_of(message)

    def read_merged(self, starts: Mapping[TopicPartitionKey, int],
                    ends: Mapping[TopicPartitionKey, int] | None = None) -> Iterator[Record]:
        """Records of the given partitions from their start offset to their end, merged by timestamp.

        The end is the partition's end as of the read (its EOF event), or ends[partition] (an
        offset once read) if given. A k-way merge: a record is yielded once every partition that
        is not at its end has one buffered, and each partition buffers at most about `read_ahead`
        records (it is paused while full), so memory does not grow with the topic.
        """
        if not starts:
            return
        ends = ends or {}
        consumer = self._consumer
        consumer.assign([TopicPartition(topic, partition, offset) for (topic, partition), offset in starts.items()])
        buffered: dict[TopicPartitionKey, deque[Record]] = {key: deque() for key in starts}
        # Guards against records fetched twice (after a resume) or from before the start.
        next_offset = {key: max(offset, 0) for key, offset in starts.items()}
        not_at_end = set(starts)
        # Partitions not at their end with nothing buffered: the merge cannot go on without them.
        starving = set(starts)
        paused: set[TopicPartitionKey] = set()
        heads: list[tuple[tuple[int, str, int, int], TopicPartitionKey]] = []

        def reached_end(key: TopicPartitionKey) -> None:
            not_at_end.discard(key)
            starving.discard(key)
            # The export reads the partition as of the request; later records are not its business.
            consumer.pause([TopicPartition(*key)])

        while True:
            while starving:
                for message in self._next_batch():
                    key = (message.topic(), message.partition())
                    if key not in not_at_end:
                        continue  # written after this partition's end was reached
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            raise KafkaUnavailable(f"Kafka error on {key[0]}[{key[1]}]: {kafka_client.describe(error)}")
                        reached_end(key)
                        continue
                    offset = message.offset()
                    if offset < next_offset[key]:
                        continue
                    end = ends.get(key)
                    if end is not None and offset >= end:
                        reached_end(key)
                        continue
                    next_offset[key] = offset + 1
                    queue = buffered[key]
                    record = _record_of(message)
                    queue.append(record)
                    if len(queue) == 1:
                        heapq.heappush(heads, (_merge_key(record), key))
                        starving.discard(key)
                    if end is not None and offset + 1 >= end:
                        reached_end(key)
                    elif len(queue) >= self._read_ahead and key not in paused:
                        consumer.pause([TopicPartition(*key)])
                        paused.add(key)
            if not heads:
                return
            _, key = heapq.heappop(heads)
            queue = buffered[key]
            record = queue.popleft()
            if queue:
                heapq.heappush(heads, (_merge_key(queue[0]), key))
            elif key in not_at_end:
                starving.add(key)
            if key in paused and len(queue) <= self._read_ahead // 2:
                consumer.resume([TopicPartition(*key)])
                paused.discard(key)
            yield record

    def _next_batch(self) -> list[typing.Any]:
        """The next messages and events, waiting for at least one; stops on cancel or a silent Kafka."""
        waiting_since = time.monotonic()
        while True:
            if self._cancelled.is_set():
                raise ScanCancelled("the export was cancelled")
            if self._fatal_error is not None:
                raise KafkaUnavailable(f"Kafka client failed: {kafka_client.describe(self._fatal_error)}")
            try:
                # Only an empty queue waits, briefly, so a cancel is seen quickly.
                batch = kafka_client.consume_available(self._consumer, self.BATCH, 0.05)
            except KafkaException as exc:
                raise KafkaUnavailable(f"Kafka client failed: {kafka_client.describe(exc.args[0])}") from None
            if batch:
                return batch
            if time.monotonic() - waiting_since > self._timeout:
                reason = f" (last error: {kafka_client.describe(self._last_error)})" if self._last_error is not None else ""
                raise KafkaUnavailable(f"Kafka sent nothing for {self._timeout:g} s{reason}")

    def _on_error(self, error: KafkaError) -> None:
        # Called from inside consume(), on the export thread.
        self._last_error = error
        if error.fatal():
            self._fatal_error = error
        # librdkafka logs connection failures itself (proxy.kafka); only a fatal error is news.
        log.log(logging.ERROR if error.fatal() else logging.DEBUG, "export consumer: %s", kafka_client.describe(error))


def _record_of(message: typing.Any) -> Record:
    return Record(message.timestamp()[1], message.topic(), message.partition(), message.offset(), message.value())


def _merge_key(record: Record) -> tuple[int, str, int, int]:
    # Ties on the timestamp keep a stable, reproducible order.
    return (record.timestamp, record.topic, record.partition, record.offset)

