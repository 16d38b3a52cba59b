"""The export scan's merge: records of every partition in k-way-merge order, whatever the batches."""

from __future__ import annotations

import asyncio
import csv
import heapq
import io
import random
import threading
import typing
import uuid

from confluent_kafka import Message
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import TopicExportConfig
from proxy.export.data_folder import DataFolder
from proxy.export.scan import PartitionScanner, ScannedRecords, buffered_bytes
from proxy.export.service import ExportService
from proxy.kafka import BEGINNING, Batch, PartitionKey
from proxy.policy import VisibilityPolicy
from proxy.testing import produce

BASE_TIME_MS = 1_521_194_400_000


def merged_oracle(partitions: dict[PartitionKey, list[tuple[int, int]]], starts: dict[PartitionKey, int],
                  ends: dict[PartitionKey, int]) -> list[tuple[str, int, int]]:
    """What a k-way merge on (timestamp, topic, partition, offset) of each partition's records yields.

    partitions: (offset, timestamp) per record in offset order. Independent of the scan: heapq.merge.
    """
    runs = []
    for (topic, partition), records in partitions.items():
        start, end = max(starts[(topic, partition)], 0), ends.get((topic, partition))
        runs.append([(timestamp, topic, partition, offset) for offset, timestamp in records
                     if offset >= start and (end is None or offset < end)])
    return [(topic, partition, offset) for _, topic, partition, offset in heapq.merge(*runs)]


class ReplayedKafka:
    """A KafkaReader stand-in serving fixed partitions the way librdkafka does, unpredictably.

    Batches of random sizes, a partition's records in runs, the end event once a partition's
    last record has been served (later records are appended after it and must be ignored),
    and after a resume, some records served again. Values are value_of(key, offset), padded to
    value_bytes.
    """

    def __init__(self, partitions: dict[PartitionKey, list[tuple[int, int]]], seed: int, value_bytes: int = 0):
        self._random = random.Random(seed)
        self._messages = {key: [Message(topic=key[0], partition=key[1], offset=offset,
                                        value=value_of(key, offset).ljust(value_bytes),
                                        timestamp=(1, timestamp)) for offset, timestamp in records]
                          for key, records in partitions.items()}
        # Per partition, how many of its records were served at least once (a record served again
        # after a resume is counted once).
        self.served_through: dict[PartitionKey, int] = dict.fromkeys(partitions, 0)
        self._position: dict[PartitionKey, int] = {}
        self._ended: set[PartitionKey] = set()
        self._paused: set[PartitionKey] = set()
        self.last_error = None
        self.pauses = 0
        self.served = 0

    def assign(self, starts: typing.Mapping[PartitionKey, int]) -> None:
        self._position = {}
        for key, offset in starts.items():
            offsets = [message.offset() for message in self._messages[key]]
            self._position[key] = 0 if offset == BEGINNING else next(
                (index for index, at in enumerate(offsets) if at >= offset), len(offsets))
        self._ended, self._paused = set(), set()

    def pause(self, keys: typing.Iterable[PartitionKey]) -> None:
        self._paused.update(keys)
        self.pauses += 1

    def resume(self, keys: typing.Iterable[PartitionKey]) -> None:
        for key in keys:
            self._paused.discard(key)
            # librdkafka may serve again what it had fetched before the pause.
            self._position[key] = max(0, self._position[key] - self._random.randint(0, 3))
            if self._position[key] < len(self._messages[key]):
                self._ended.discard(key)

    def read(self, max_records: int, wait: float) -> Batch:
        records: list[typing.Any] = []
        ends: dict[PartitionKey, int] = {}
        size = self._random.randint(0, min(max_records, 25))
        active = [key for key in self._position if key not in self._paused and key not in self._ended]
        while active and len(records) < size:
            key = self._random.choice(active)
            messages, position = self._messages[key], self._position[key]
            run = messages[position:position + self._random.randint(1, 7)]
            records += run
            self._position[key] = position + len(run)
            self.served_through[key] = max(self.served_through[key], self._position[key])
            if self._position[key] >= len(messages):
                ends[key] = len(records)
                self._ended.add(key)
                active.remove(key)
                if self._random.random() < 0.5:  # written after the end
                    records.append(Message(topic=key[0], partition=key[1], offset=messages[-1].offset() + 1
                                           if messages else 0, value=b"{}", timestamp=(1, 0)))
        self.served += len(records)
        return Batch(records, ends)

    def close(self) -> None:
        pass

    def served_bytes(self) -> int:
        """What the distinct records served so far cost buffered (proxy.export.scan.buffered_bytes)."""
        return sum(buffered_bytes(message.value() for message in self._messages[key][:count])
                   for key, count in self.served_through.items())


def value_of(key: PartitionKey, offset: int) -> bytes:
    return f'{{"topic":"{key[0]}","partition":{key[1]},"offset":{offset}}}'.encode()


def replaying_scanner(kafka: ReplayedKafka, read_ahead_bytes: int) -> PartitionScanner:
    scanner = PartitionScanner.__new__(PartitionScanner)
    scanner._timeout, scanner._cancelled, scanner._read_ahead_bytes = 10.0, threading.Event(), read_ahead_bytes
    scanner._reader = kafka
    return scanner


def scanned_records(pieces: typing.Iterable[ScannedRecords]) -> list[tuple[str, int, int]]:
    return [(topic, partition, offset) for piece in pieces for (topic, partition), offset in
            zip(piece.partitions, piece.offsets)]


# Timestamps from a few values, so that equal ones across partitions are common, and clocks that go back.
timestamps = st.one_of(st.integers(0, 5), st.integers(-1, 10 ** 6)).map(lambda t: t if t < 0 else BASE_TIME_MS + t)
partition_records = st.lists(st.tuples(st.integers(1, 3), timestamps), max_size=40).map(
    # (offset gap, timestamp) -> (offset, timestamp): offsets rise, with gaps (compaction, transactions).
    lambda gaps: [(sum(gap for gap, _ in gaps[:index + 1]), stamp) for index, (_, stamp) in enumerate(gaps)])


@settings(max_examples=300, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2 ** 32), read_ahead=st.integers(2, 12))
def test_the_scan_yields_the_k_way_merge_of_its_partitions_in_any_batches(data: st.DataObject, seed: int,
                                                                          read_ahead: int) -> None:
    keys = data.draw(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3)), min_size=1, max_size=5,
                              unique=True), label="partitions")
    partitions = {key: data.draw(partition_records, label=f"records of {key}") for key in keys}
    starts = {key: data.draw(st.sampled_from([BEGINNING, 0, 5, 20]), label=f"start of {key}") for key in keys}
    ends = {key: data.draw(st.integers(0, 100), label=f"end of {key}") for key in keys
            if data.draw(st.booleans(), label=f"{key} has an end")}
    kafka = ReplayedKafka(partitions, seed)
    # read_ahead: records per partition, of the size of these
    read_ahead_bytes = read_ahead * len(keys) * buffered_bytes([value_of(("a", 0), 0)])
    scanned = list(replaying_scanner(kafka, read_ahead_bytes).read_merged(starts, ends))
    got = scanned_records(scanned)
    assert got == merged_oracle(partitions, starts, ends)
    # Every record keeps its own value and timestamp.
    assert [value for piece in scanned for value in piece.values] == [value_of((topic, partition), offset)
                                                                      for topic, partition, offset in got]
    stamp_of = {(key, offset): stamp for key, records in partitions.items() for offset, stamp in records}
    assert [stamp for piece in scanned for stamp in piece.timestamps] == [
        stamp_of[((topic, partition), offset)] for topic, partition, offset in got]


def test_a_partition_far_ahead_in_time_is_paused_rather_than_buffered_whole() -> None:
    late = {("a", 0): [(offset, BASE_TIME_MS + 10 ** 6 + offset) for offset in range(500)],
            ("a", 1): [(offset, BASE_TIME_MS + offset) for offset in range(500)]}
    kafka = ReplayedKafka(late, seed=7)
    record_bytes = buffered_bytes([value_of(("a", 0), 0)])
    scanner = replaying_scanner(kafka, read_ahead_bytes=2 * 20 * record_bytes)
    held = 0
    got: list[tuple[str, int, int]] = []
    for piece in scanner.read_merged({key: BEGINNING for key in late}):
        # Read from Kafka but not handed on yet (the pieces before this one are).
        held = max(held, sum(kafka.served_through.values()) - len(got))
        got += scanned_records([piece])
    assert got == merged_oracle(late, {key: BEGINNING for key in late}, {})
    assert kafka.pauses > 0
    # Bounded by the read-ahead of both partitions and a read (25 records here), not by their length.
    assert held <= 2 * (20 + 25)


@pytest.mark.parametrize("value_bytes", [2, 300, 20_000])
def test_the_merge_holds_no_more_bytes_than_its_read_ahead_whatever_the_record_size(value_bytes: int) -> None:
    """Memory is bounded by construction: in bytes, not in records whose size depends on the topic."""
    stamps = random.Random(5)
    # Partition 1 runs far ahead in time for most of its records, so its buffer fills.
    partitions = {("a", partition): [(offset, BASE_TIME_MS + stamps.randint(0, 50) + offset * (1 + 3 * partition))
                                     for offset in range(400)] for partition in range(3)}
    kafka = ReplayedKafka(partitions, seed=11, value_bytes=value_bytes)
    read_ahead_bytes = 64 * 1024
    scanner = replaying_scanner(kafka, read_ahead_bytes)
    handed_on, most_held = 0, 0
    got = []
    for piece in scanner.read_merged({key: BEGINNING for key in partitions}):
        most_held = max(most_held, kafka.served_bytes() - handed_on)
        handed_on += buffered_bytes(piece.values)
        got += scanned_records([piece])
    assert got == merged_oracle(partitions, {key: BEGINNING for key in partitions}, {})
    largest_record = buffered_bytes([max((value_of(key, 399).ljust(value_bytes) for key in partitions), key=len)])
    # Each partition's share, and what one read (25 records here) may add to a full buffer.
    assert most_held <= read_ahead_bytes + 3 * 25 * largest_record


def test_a_producer_clock_that_goes_back_keeps_each_partitions_order(broker, tmp_path) -> None:
    """Rows follow record timestamps across partitions, but never reorder one partition's records."""
    topic = f"clock-{uuid.uuid4().hex[:8]}"
    broker.create_topics([topic], partitions=3)
    generator = random.Random(3)
    partitions: dict[PartitionKey, list[tuple[int, int]]] = {}
    for partition in range(3):
        # A clock that mostly runs forward, sometimes jumps back, often repeats a millisecond.
        stamps, now = [], BASE_TIME_MS
        for _ in range(300):
            now += generator.choice([0, 0, 1, 2, 5, -40])
            stamps.append(now)
        produce(broker.bootstrap_servers, topic, [{"partition": partition, "offset": offset}
                                                   for offset in range(len(stamps))], partition, stamps)
        partitions[(topic, partition)] = list(enumerate(stamps))
    service = ExportService({"bootstrap.servers": broker.bootstrap_servers, "fetch.wait.max.ms": 10},
                            VisibilityPolicy({topic: TopicExportConfig(policy="public")}),
                            DataFolder(str(tmp_path), 3600, 1024 ** 3), read_ahead_bytes=3 * 50 * 200)
    result = asyncio.run(service.export_to_file(topic, "merchant"))
    with open(tmp_path / result.filename, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    expected = merged_oracle(partitions, {key: BEGINNING for key in partitions}, {})
    assert [(topic, int(row["partition"]), int(row["offset"])) for row in rows] == expected
