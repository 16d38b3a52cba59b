"""Kafka scan: read partitions to their end as of the request, merged by record timestamp."""

from __future__ import annotations

import heapq
import logging
import threading
import time
import typing
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

from proxy.kafka import Batch, KafkaReader, KafkaUnavailable, PartitionKey

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


class ScannedRecord(typing.NamedTuple):
    """One Kafka record as the export reads it."""

    timestamp: int
    topic: str
    partition: int
    offset: int
    value: bytes | None


class PartitionScanner:
    """One export's own Kafka consumer: metadata, watermarks, and partitions read up to their end.

    Knows how to scan: "the end" is the partition-EOF event, never a precomputed end offset
    (ListOffsets is wrong on some brokers); silence is slowness, not the end, until `timeout`;
    client errors become proxy.kafka.KafkaUnavailable, a cancel ScanCancelled.
    """

    BATCH = 1000

    def __init__(self, properties: Mapping[str, typing.Any], timeout: float, cancelled: threading.Event,
                 read_ahead: int = READ_AHEAD_RECORDS, secrets: Iterable[str] = ()):
        """secrets: the values of ${VAR}s in the properties, blanked out of every librdkafka log line."""
        self._timeout = timeout
        self._cancelled = cancelled
        self._read_ahead = max(2, read_ahead)
        try:
            self._reader = KafkaReader(properties, defaults=EXPORT_CONSUMER_DEFAULTS, secrets=secrets,
                                       record_errors_fail=True)
        except ValueError as exc:
            raise KafkaUnavailable(str(exc)) from None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> PartitionScanner:
        return self

    def __exit__(self, *exc_info: typing.Any) -> None:
        self.close()

    def partitions(self) -> dict[str, list[int]]:
        """Partition ids of every topic that exists in Kafka now."""
        try:
            return self._reader.list_partitions(self._timeout)
        except KafkaUnavailable as exc:
            raise KafkaUnavailable(f"Kafka is unreachable: {exc}") from None

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        """(low, high) offsets. The high one may be too low on some brokers (Tansu): use it only to read more."""
        try:
            return self._reader.watermarks(topic, partition, self._timeout)
        except KafkaUnavailable as exc:
            raise KafkaUnavailable(f"Kafka is unreachable: {exc}") from None

    def read_range(self, topic: str, partition: int, start: int, end: int | None) -> Iterator[ScannedRecord]:
        """Records of one partition with start <= offset < end (None: up to the partition's end)."""
        key = (topic, partition)
        self._reader.assign({key: start})
        while True:
            batch = self._next_batch()
            at_end = batch.ends.get(key)
            for index, message in enumerate(batch.records):
                if message.topic() != topic or message.partition() != partition:
                    continue
                if at_end is not None and index >= at_end:
                    return
                offset = message.offset()
                if offset < start:
                    continue
                if end is not None and offset >= end:
                    return
                yield _record_of(message)
            if key in batch.ends:
                return

    def read_merged(self, starts: Mapping[PartitionKey, int],
                    ends: Mapping[PartitionKey, int] | None = None) -> Iterator[ScannedRecord]:
        """Records of the given partitions from their start offset to their end, merged by timestamp.

        The end is the partition's end as of the read (its EOF event), or ends[partition] (an
        offset once read) if given. A k-way merge: a record is yielded once every partition that
        is not at its end has one buffered, and each partition buffers at most about `read_ahead`
        records (it is paused while full), so memory does not grow with the topic.
        """
        if not starts:
            return
        ends = ends or {}
        reader = self._reader
        reader.assign(starts)
        buffered: dict[PartitionKey, deque[ScannedRecord]] = {key: deque() for key in starts}
        # Guards against records fetched twice (after a resume) or from before the start.
        next_offset = {key: max(offset, 0) for key, offset in starts.items()}
        not_at_end = set(starts)
        # Partitions not at their end with nothing buffered: the merge cannot go on without them.
        starving = set(starts)
        paused: set[PartitionKey] = set()
        read_ahead, resume_below = self._read_ahead, self._read_ahead // 2
        # (head record, its partition). Records compare as (timestamp, topic, partition, offset):
        # a stable, reproducible order, and never equal, so the partition is never compared.
        heads: list[tuple[ScannedRecord, PartitionKey]] = []
        # This loop runs once per record of every export: no per-record helper calls.
        new_record, heappush, heappop, heapreplace = tuple.__new__, heapq.heappush, heapq.heappop, heapq.heapreplace

        def reached_end(key: PartitionKey) -> None:
            not_at_end.discard(key)
            starving.discard(key)
            # The export reads the partition as of the request; later records are not its business.
            reader.pause([key])

        while True:
            while starving:
                batch = self._next_batch()
                batch_ends = batch.ends
                for index, message in enumerate(batch.records):
                    key = (message.topic(), message.partition())
                    if key not in not_at_end or (batch_ends and index >= batch_ends.get(key, index + 1)):
                        continue  # written after this partition's end was reached
                    offset = message.offset()
                    if offset < next_offset[key]:
                        continue
                    end = ends.get(key)
                    if end is not None and offset >= end:
                        reached_end(key)
                        continue
                    next_offset[key] = offset + 1
                    queue = buffered[key]
                    record = new_record(ScannedRecord, (message.timestamp()[1], key[0], key[1], offset, message.value()))
                    queue.append(record)
                    if len(queue) == 1:
                        heappush(heads, (record, key))
                        starving.discard(key)
                    if end is not None and offset + 1 >= end:
                        reached_end(key)
                    elif len(queue) >= read_ahead and key not in paused:
                        reader.pause([key])
                        paused.add(key)
                for key in batch_ends:
                    # Every record before the end event came in this batch or an earlier one.
                    if key in not_at_end:
                        reached_end(key)
            if not heads:
                return
            if len(heads) == 1:
                # Only one partition has records left to merge (a topic of one partition, or the
                # others are done): its records go out in order, without the heap.
                _, key = heads.pop()
                queue = buffered[key]
                if key in paused:
                    reader.resume([key])
                    paused.discard(key)
                while queue:
                    yield queue.popleft()
                if key in not_at_end:
                    starving.add(key)
                continue
            record, key = heads[0]
            queue = buffered[key]
            queue.popleft()
            if queue:
                heapreplace(heads, (queue[0], key))
            else:
                heappop(heads)
                if key in not_at_end:
                    starving.add(key)
            if key in paused and len(queue) <= resume_below:
                reader.resume([key])
                paused.discard(key)
            yield record

    def _next_batch(self) -> Batch:
        """The next records and partition ends, waiting for at least one; stops on cancel or a silent Kafka."""
        waiting_since = time.monotonic()
        while True:
            if self._cancelled.is_set():
                raise ScanCancelled("the export was cancelled")
            # Only an empty queue waits, briefly, so a cancel is seen quickly.
            batch = self._reader.read(self.BATCH, 0.05)
            if batch.records or batch.ends:
                return batch
            if time.monotonic() - waiting_since > self._timeout:
                last = self._reader.last_error
                reason = f" (last error: {last})" if last is not None else ""
                raise KafkaUnavailable(f"Kafka sent nothing for {self._timeout:g} s{reason}")


def _record_of(message: typing.Any) -> ScannedRecord:
    return ScannedRecord(message.timestamp()[1], message.topic(), message.partition(), message.offset(), message.value())

