"""Kafka scan: read partitions to their end as of the request, merged by record timestamp."""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import threading
import time
import typing
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
# Records buffered per partition by the merge. A partition is paused while its buffer is full,
# which drops what librdkafka had fetched for it: once the merge has used up the buffer, it waits
# for a new fetch. Producers write runs of records to one partition at a time (librdkafka's sticky
# partitioner): bench/export_scan.py's topic has runs of ~1,300 records (10 % over 3,600). At
# 2,000 nearly every run stalled the scan (4x slower on a busy machine); 6,000 holds most runs,
# and more only raises the peak RSS.
READ_AHEAD_RECORDS = 6_000
# The bound for all partitions of an export together (an all-topics export reads about 50), so
# memory never exceeds what 2,000 records per partition could take.
READ_AHEAD_TOTAL_RECORDS = 104_000
# Records handed on at a time: bounds the rows and CSV text an export builds at once.
SLICE_RECORDS = 1_000

# The scan handles records in lists, with C-level calls (map, groupby, bisect, sort): a Python
# statement per record is what an export's time goes to.
_topic_of = operator.methodcaller("topic")
_partition_of = operator.methodcaller("partition")
_timestamp_of = operator.methodcaller("timestamp")
_epoch_ms = operator.itemgetter(1)  # of timestamp(): (type, milliseconds)


class ScanCancelled(Exception):
    """The export that owns the scan was cancelled (the client went away, or shutdown)."""


class ScannedRecords(typing.NamedTuple):
    """Kafka records (topic(), partition(), offset(), value()) and their timestamps (epoch ms, -1: none)."""

    records: list[typing.Any]
    timestamps: list[int]


def timestamps_of(records: Iterable[typing.Any]) -> list[int]:
    return list(map(_epoch_ms, map(_timestamp_of, records)))


class _Buffered:
    """One partition's records waiting for the merge, and how many of the first ones are in time order."""

    __slots__ = ("records", "timestamps", "in_order", "next_offset")

    def __init__(self, start: int):
        self.records: list[typing.Any] = []
        self.timestamps: list[int] = []
        # The first in_order records are known to be in timestamp order.
        self.in_order = 0
        # Guards against records fetched twice (after a resume) or from before the start.
        self.next_offset = max(start, 0)

    def add(self, records: list[typing.Any]) -> None:
        self.records += records
        self.timestamps += timestamps_of(records)
        self.next_offset = records[-1].offset() + 1

    def ordered(self) -> int:
        """How many of the first records are in timestamp order (a producer's clock may go back)."""
        stamps, known = self.timestamps, self.in_order
        count = len(stamps)
        known = max(known, min(count, 1))
        step = 64
        while known < count:
            # A slice in order is its own sort: checked in C, in growing steps.
            piece = stamps[known - 1:known + step]
            if piece == sorted(piece):
                known = min(known + step, count)
                step *= 2
                continue
            known += next(index for index in range(1, len(piece)) if piece[index] < piece[index - 1]) - 1
            break
        self.in_order = known
        return known

    def take(self, count: int) -> ScannedRecords:
        taken = ScannedRecords(self.records[:count], self.timestamps[:count])
        del self.records[:count], self.timestamps[:count]
        self.in_order = max(0, self.in_order - count)
        return taken


class PartitionScanner:
    """One export's own Kafka consumer: metadata, watermarks, and partitions read up to their end.

    Knows how to scan: "the end" is the partition-EOF event, never a precomputed end offset
    (ListOffsets is wrong on some brokers); silence is slowness, not the end, until `timeout`;
    client errors become proxy.kafka.KafkaUnavailable, a cancel ScanCancelled.
    """

    # Records per read of the client's queue.
    BATCH = 5_000

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

    def read_range(self, topic: str, partition: int, start: int, end: int | None) -> Iterator[ScannedRecords]:
        """Records of one partition with start <= offset < end (None: up to the partition's end), in offset order."""
        key = (topic, partition)
        self._reader.assign({key: start})
        while True:
            batch = self._next_batch()
            at_end = batch.ends.get(key)
            mine = [record for record in (batch.records if at_end is None else batch.records[:at_end])
                    if record.topic() == topic and record.partition() == partition]
            records = [record for record in mine if start <= record.offset() and (end is None or record.offset() < end)]
            if records:
                yield ScannedRecords(records, timestamps_of(records))
            if at_end is not None or (end is not None and mine and mine[-1].offset() >= end - 1):
                return

    def read_merged(self, starts: Mapping[PartitionKey, int],
                    ends: Mapping[PartitionKey, int] | None = None) -> Iterator[ScannedRecords]:
        """Records of the given partitions from their start offset to their end, merged by timestamp.

        The end is the partition's end as of the read (its EOF event), or ends[partition] (an
        offset once read) if given. The order is that of a k-way merge on (timestamp, topic,
        partition, offset): a partition's records keep their offset order. Memory does not grow
        with the topic: each partition buffers about `read_ahead` records (it is paused while
        full; fewer when the export reads many partitions), and records go out in lists of what
        the buffers allow, at most SLICE_RECORDS at a time.
        """
        if not starts:
            return
        ends = ends or {}
        reader = self._reader
        reader.assign(starts)
        keys = sorted(starts)
        buffered = {key: _Buffered(offset) for key, offset in starts.items()}
        not_at_end = set(starts)
        # Partitions not at their end with nothing buffered: the merge cannot go on without them.
        starving = set(starts)
        paused: set[PartitionKey] = set()
        read_ahead = max(2, min(self._read_ahead, READ_AHEAD_TOTAL_RECORDS // len(starts)))
        resume_below = read_ahead // 2

        def reached_end(key: PartitionKey) -> None:
            not_at_end.discard(key)
            starving.discard(key)
            # The export reads the partition as of the request; later records are not its business.
            reader.pause([key])

        while True:
            while starving:
                batch = self._next_batch()
                batch_ends = batch.ends
                index = 0
                # A batch holds runs of one partition's records in offset order.
                for topic, of_topic in itertools.groupby(batch.records, _topic_of):
                    for partition, of_partition in itertools.groupby(of_topic, _partition_of):
                        records = list(of_partition)
                        first, index = index, index + len(records)
                        key = (topic, partition)
                        if key not in not_at_end:
                            continue
                        # Records at or past the end event were written after this partition's end.
                        records = records[:max(0, batch_ends.get(key, index) - first)]
                        buffer = buffered[key]
                        if records and records[0].offset() < buffer.next_offset:
                            records = [record for record in records if record.offset() >= buffer.next_offset]
                        end = ends.get(key)
                        past_end = end is not None and bool(records) and records[-1].offset() >= end
                        if past_end:
                            records = [record for record in records if record.offset() < end]
                        if records:
                            buffer.add(records)
                            starving.discard(key)
                        if past_end or (end is not None and buffer.next_offset >= end):
                            reached_end(key)
                        elif len(buffer.records) >= read_ahead and key not in paused:
                            reader.pause([key])
                            paused.add(key)
                for key in batch_ends:
                    # Every record before the end event came in this batch or an earlier one.
                    if key in not_at_end:
                        reached_end(key)
            merged = self._merge_step(keys, buffered, not_at_end)
            if merged is None:
                return
            for key in keys:
                buffer = buffered[key]
                if key in paused and len(buffer.records) <= resume_below:
                    reader.resume([key])
                    paused.discard(key)
                if not buffer.records and key in not_at_end:
                    starving.add(key)
            for start in range(0, len(merged.records), SLICE_RECORDS):
                yield ScannedRecords(merged.records[start:start + SLICE_RECORDS],
                                     merged.timestamps[start:start + SLICE_RECORDS])

    @staticmethod
    def _merge_step(keys: list[PartitionKey], buffered: Mapping[PartitionKey, _Buffered],
                    not_at_end: set[PartitionKey]) -> ScannedRecords | None:
        """The records the k-way merge would yield next, as far as the buffers tell; None once all are out.

        Every partition not at its end has records buffered. In each partition, the first
        records in timestamp order end with a last one, the bound; the merge cannot see past
        the least bound, since the next record of that partition (not read yet, or one that
        goes back in time) may be earlier than anything after it. Up to the least bound, the
        merge of runs in order is their sort by (timestamp, topic, partition, offset).
        """
        bound: tuple[int, PartitionKey] | None = None
        ordered: dict[PartitionKey, int] = {}
        for key in keys:
            buffer = buffered[key]
            if buffer.records:
                count = ordered[key] = buffer.ordered()
                if key in not_at_end or count < len(buffer.records):
                    last = (buffer.timestamps[count - 1], key)
                    if bound is None or last < bound:
                        bound = last
        if not ordered:
            return None
        pieces = []
        for key, count in ordered.items():
            if bound is not None and key != bound[1]:
                stamps = buffered[key].timestamps
                # Keys compare as (timestamp, topic, partition): at the bound's timestamp, only the
                # records of partitions that sort before the bound's go first.
                count = (bisect.bisect_right if key < bound[1] else bisect.bisect_left)(stamps, bound[0], 0, count)
            if count:
                pieces.append(buffered[key].take(count))
        if len(pieces) == 1:
            return pieces[0]
        records = list(itertools.chain.from_iterable(piece.records for piece in pieces))
        stamps = list(itertools.chain.from_iterable(piece.timestamps for piece in pieces))
        # Pieces in (topic, partition) order, each in offset order: a stable sort by timestamp
        # puts equal timestamps in (topic, partition, offset) order.
        order = sorted(range(len(stamps)), key=stamps.__getitem__)
        return ScannedRecords(list(map(records.__getitem__, order)), list(map(stamps.__getitem__, order)))

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
