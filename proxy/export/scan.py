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
# Bytes of records the merge buffers for one export, all its partitions together: memory is
# bounded by construction, whatever the topic's records look like. Each partition gets an equal
# share, and is paused while its buffer holds that much. Pausing drops what librdkafka had fetched
# for it: once the merge has used up the buffer, it waits for a new fetch. Producers write runs of
# records to one partition at a time (librdkafka's sticky partitioner): bench/export_scan.py's
# topic has runs of ~1,300 records (10 % over 3,600). At 2,000 records per partition nearly every
# run stalled the scan (4x slower on a busy machine); 8 MiB over 4 partitions is ~5,000 of its
# ~270-byte records each (12 MiB was no faster, and its peak RSS grew 1.10 x from a 100k to a
# 500k export), and an all-topics export (about 50 partitions) gets ~160 kB each.
READ_AHEAD_BYTES = 8 * 1024 * 1024
# What a buffered record costs besides its value: the bytes object's header, the offset and
# timestamp ints and three list slots (CPython 3.11, 64 bit).
RECORD_OVERHEAD_BYTES = 128
# Records handed on at a time: bounds the rows and CSV text an export builds at once.
SLICE_RECORDS = 1_000

# The scan handles records in lists, with C-level calls (map, groupby, bisect, sort): a Python
# statement per record is what an export's time goes to.
_topic_of = operator.methodcaller("topic")
_partition_of = operator.methodcaller("partition")
_offset_of = operator.methodcaller("offset")
_value_of = operator.methodcaller("value")
_timestamp_of = operator.methodcaller("timestamp")
_epoch_ms = operator.itemgetter(1)  # of timestamp(): (type, milliseconds)


class ScanCancelled(Exception):
    """The export that owns the scan was cancelled (the client went away, or shutdown)."""


class ScannedRecords(typing.NamedTuple):
    """Kafka records as columns: per record its (topic, partition), offset, value and timestamp (epoch ms, -1: none).

    Only what rows are made of: confluent_kafka's Message objects (with a topic string each) are
    let go as soon as a read is sorted out, so the scan's memory is that of the values.
    """

    partitions: list[PartitionKey]
    offsets: list[int]
    values: list[bytes | None]
    timestamps: list[int]


def buffered_bytes(values: Iterable[bytes | None]) -> int:
    """What records with these values cost in memory, about (RECORD_OVERHEAD_BYTES each besides the value)."""
    values = list(values)
    return sum(map(len, filter(None, values))) + RECORD_OVERHEAD_BYTES * len(values)


def _columns(records: list[typing.Any]) -> tuple[list[int], list[bytes | None], list[int]]:
    """Offsets, values and timestamps (epoch ms) of confluent_kafka Messages."""
    return (list(map(_offset_of, records)), list(map(_value_of, records)),
            list(map(_epoch_ms, map(_timestamp_of, records))))


class _Buffered:
    """One partition's records waiting for the merge, and how many of the first ones are in time order."""

    __slots__ = ("key", "offsets", "values", "timestamps", "size", "in_order", "next_offset")

    def __init__(self, key: PartitionKey, start: int):
        self.key = key
        self.offsets: list[int] = []
        self.values: list[bytes | None] = []
        self.timestamps: list[int] = []
        # Bytes held (buffered_bytes): what the read-ahead bound counts.
        self.size = 0
        # The first in_order records are known to be in timestamp order.
        self.in_order = 0
        # Guards against records fetched twice (after a resume) or from before the start.
        self.next_offset = max(start, 0)

    def add(self, offsets: list[int], values: list[bytes | None], timestamps: list[int]) -> None:
        self.offsets += offsets
        self.values += values
        self.timestamps += timestamps
        self.size += buffered_bytes(values)
        self.next_offset = offsets[-1] + 1

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
        values = self.values[:count]
        taken = ScannedRecords([self.key] * len(values), self.offsets[:count], values, self.timestamps[:count])
        del self.offsets[:count], self.values[:count], self.timestamps[:count]
        self.size -= buffered_bytes(values)
        self.in_order = max(0, self.in_order - count)
        return taken


class PartitionScanner:
    """One export's own Kafka consumer: metadata, watermarks, and partitions read up to their end.

    Knows how to scan: "the end" is the partition-EOF event, never a precomputed end offset
    (ListOffsets is wrong on some brokers); silence is slowness, not the end, until `timeout`;
    client errors become proxy.kafka.KafkaUnavailable, a cancel ScanCancelled.
    """

    # Records per read of the client's queue: also what a partition's buffer may take beyond its
    # share of the read-ahead, in the read that fills it.
    BATCH = 1_000

    def __init__(self, properties: Mapping[str, typing.Any], timeout: float, cancelled: threading.Event,
                 read_ahead_bytes: int = READ_AHEAD_BYTES, secrets: Iterable[str] = ()):
        """read_ahead_bytes: the records (buffered_bytes) the merge may hold, all partitions together.

        secrets: the values of ${VAR}s in the properties, blanked out of every librdkafka log line.
        """
        self._timeout = timeout
        self._cancelled = cancelled
        self._read_ahead_bytes = read_ahead_bytes
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
                yield ScannedRecords([key] * len(records), *_columns(records))
            if at_end is not None or (end is not None and mine and mine[-1].offset() >= end - 1):
                return

    def read_merged(self, starts: Mapping[PartitionKey, int],
                    ends: Mapping[PartitionKey, int] | None = None) -> Iterator[ScannedRecords]:
        """Records of the given partitions from their start offset to their end, merged by timestamp.

        The end is the partition's end as of the read (its EOF event), or ends[partition] (an
        offset once read) if given. The order is that of a k-way merge on (timestamp, topic,
        partition, offset): a partition's records keep their offset order. Memory does not grow
        with the topic: each partition buffers about its share of read_ahead_bytes (it is paused while
        full), and records go out in lists of what the buffers allow, at most SLICE_RECORDS at a time.
        """
        if not starts:
            return
        ends = ends or {}
        reader = self._reader
        reader.assign(starts)
        keys = sorted(starts)
        buffered = {key: _Buffered(key, offset) for key, offset in starts.items()}
        not_at_end = set(starts)
        # Partitions not at their end with nothing buffered: the merge cannot go on without them.
        starving = set(starts)
        paused: set[PartitionKey] = set()
        share = self._read_ahead_bytes // len(starts)
        resume_below = share // 2

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
                        offsets = list(map(_offset_of, records))
                        end = ends.get(key)
                        past_end = end is not None and bool(offsets) and offsets[-1] >= end
                        if offsets and (offsets[0] < buffer.next_offset or past_end):
                            # Read before (after a resume), before the start, or past the requested end.
                            keep = [buffer.next_offset <= offset and (end is None or offset < end) for offset in offsets]
                            records = list(itertools.compress(records, keep))
                            offsets = list(itertools.compress(offsets, keep))
                        if records:
                            buffer.add(offsets, list(map(_value_of, records)),
                                       list(map(_epoch_ms, map(_timestamp_of, records))))
                            starving.discard(key)
                        if past_end or (end is not None and buffer.next_offset >= end):
                            reached_end(key)
                        elif buffer.size >= share and key not in paused:
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
                if key in paused and buffer.size <= resume_below:
                    reader.resume([key])
                    paused.discard(key)
                if not buffer.offsets and key in not_at_end:
                    starving.add(key)
            for start in range(0, len(merged.offsets), SLICE_RECORDS):
                yield ScannedRecords(*(column[start:start + SLICE_RECORDS] for column in merged))

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
            if buffer.offsets:
                count = ordered[key] = buffer.ordered()
                if key in not_at_end or count < len(buffer.offsets):
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
        columns = [list(itertools.chain.from_iterable(column)) for column in zip(*pieces)]
        # Pieces in (topic, partition) order, each in offset order: a stable sort by timestamp
        # puts equal timestamps in (topic, partition, offset) order.
        order = sorted(range(len(columns[-1])), key=columns[-1].__getitem__)
        return ScannedRecords(*(list(map(column.__getitem__, order)) for column in columns))

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
