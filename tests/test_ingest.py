"""The consumer thread's batches: decoded (and rendered while clients watch) on the thread, delivered on the IOLoop.

Whether clients are connected can change between the read and the delivery; these tests hold
the delivery to what is true when it runs. The end-to-end behaviour (history, live messages,
bad records) is tested against the real broker in test_live.py and test_bad_records.py.
"""

from __future__ import annotations

import json
import typing

from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from proxy.config import KafkaSettings
from proxy.kafka import Batch, KafkaUnavailable
from proxy.live import ingest
from proxy.live.decode import RecordDecoder
from proxy.live.ingest import KafkaIngest
from proxy.live.wire import LiveRecord

TOPICS = ["buyOffer", "addOffer"]
HISTORY_SIZE = 3


def kafka_record(topic: str, offset: int, value: bytes | None = None) -> Message:
    value = b'{"n":%d}' % offset if value is None else value
    return Message(topic=topic, partition=0, offset=offset, value=value, timestamp=(TIMESTAMP_CREATE_TIME, offset))


class Watchers:
    """The ingest's view of the live sessions (wants_every_message), and what it delivered."""

    def __init__(self, connected: bool):
        self.connected = connected
        self.delivered: list[list[LiveRecord]] = []

    def ingest(self) -> KafkaIngest:
        return KafkaIngest(KafkaSettings({}, frozenset()), TOPICS, HISTORY_SIZE, 1.0, RecordDecoder(TOPICS, True),
                           on_history=lambda histories: None, on_batch=self.delivered.append,
                           call_soon=lambda callback: callback(), wants_every_message=lambda: self.connected)

    def offsets(self) -> list[tuple[str, int]]:
        return [(topic, json.loads(envelope)["offset"]) for batch in self.delivered for topic, _, envelope in batch]


class QueuedRecords:
    """A KafkaReader whose broker has these records queued, handing out at most max_records per read."""

    def __init__(self, records: list[Message]):
        self.queued = list(records)
        self.reads: list[int] = []

    def read(self, max_records: int, wait: float) -> Batch:
        self.reads.append(max_records)
        taken, self.queued = self.queued[:max_records], self.queued[max_records:]
        return Batch(taken, {})


def mixed_batch(count: int) -> list[Message]:
    return [kafka_record(TOPICS[offset % 2], offset) for offset in range(count)]


def test_while_clients_watch_every_record_is_delivered_rendered_in_batches_of_at_most_batch_size() -> None:
    watchers = Watchers(connected=True)
    ingest_ = watchers.ingest()
    records = mixed_batch(ingest.BATCH_SIZE + 10) + [kafka_record("buyOffer", 10 ** 6, b"junk")]
    reader = QueuedRecords(records)
    while reader.queued:
        batch = ingest_._next_batch(typing.cast(typing.Any, reader))
        assert batch.rendered and len(batch.items) <= ingest.BATCH_SIZE
        ingest_._deliver(batch)
    assert watchers.offsets() == [(m.topic(), m.offset()) for m in records[:-1]]
    assert max(reader.reads) <= ingest.READ_SIZE
    assert ingest_.stats.consumed_by_topic() == {"buyOffer": (len(records) + 1) // 2, "addOffer": len(records) // 2}
    assert ingest_.stats.skipped_by_topic() == {"buyOffer": {"invalid_json": 1}}


# Of mixed_batch(20), what the history keeps: the newest records of each topic.
NEWEST_OF_20 = [("buyOffer", 14), ("addOffer", 15), ("buyOffer", 16), ("addOffer", 17), ("buyOffer", 18),
                ("addOffer", 19)]


def read_then_deliver(watching_at_read: bool, watching_at_delivery: bool) -> tuple[Watchers, typing.Any]:
    """mixed_batch(20) read with clients watching or not, then delivered with clients watching or not."""
    watchers = Watchers(connected=watching_at_read)
    ingest_ = watchers.ingest()
    batch = ingest_._next_batch(typing.cast(typing.Any, QueuedRecords(mixed_batch(20))))
    watchers.connected = watching_at_delivery
    ingest_._deliver(batch)
    return watchers, batch


def test_without_clients_only_the_newest_records_of_each_topic_are_rendered() -> None:
    watchers, batch = read_then_deliver(False, False)
    assert not batch.rendered
    assert watchers.offsets() == NEWEST_OF_20


def test_a_batch_rendered_for_clients_who_left_before_its_delivery_keeps_only_the_history_part() -> None:
    watchers, _ = read_then_deliver(True, False)
    assert watchers.offsets() == NEWEST_OF_20


def test_a_batch_read_without_clients_is_delivered_whole_to_a_client_who_came_before_its_delivery() -> None:
    watchers, _ = read_then_deliver(False, True)
    assert watchers.offsets() == [(TOPICS[offset % 2], offset) for offset in range(20)]


class FailingAfterFirstRead(QueuedRecords):
    """A reader whose client fails after the first read (the cluster went away mid-batch)."""

    def read(self, max_records: int, wait: float) -> Batch:
        if self.reads:
            self.reads.append(max_records)
            raise KafkaUnavailable("Kafka client failed: _TRANSPORT")
        return super().read(max_records, wait)


def test_records_read_before_the_cluster_failed_mid_batch_are_still_delivered_and_the_failure_reported() -> None:
    watchers = Watchers(connected=True)
    ingest_ = watchers.ingest()
    ingest_._deliver(ingest_._next_batch(typing.cast(typing.Any, FailingAfterFirstRead(mixed_batch(600)))))
    assert watchers.offsets() == [(TOPICS[offset % 2], offset) for offset in range(ingest.READ_SIZE)]
    assert ingest_.health.last_error == "Kafka client failed: _TRANSPORT"
