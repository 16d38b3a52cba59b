"""Request → visible rows: which partitions to read, from where, and what the merchant may see of each record.

The scan (proxy.export.scan) supplies records merged by timestamp; the policy (proxy.policy)
decides what of each the merchant may see; the CSV writer gets plain row dicts.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import typing
from collections.abc import Iterable, Iterator

import ujson

from proxy.export.errors import NotExportable, UnknownTopic
from proxy.export.scan import PartitionScanner, ScannedRecord
from proxy.kafka import BEGINNING, PartitionKey
from proxy.policy import VisibilityPolicy

# Columns of the export of all topics at once (GET /export/data).
ALL_TOPICS_COLUMNS = ("topic", "partition", "offset", "timestamp", "value")
# Topic label (file names, metrics) of the all-topics export.
ALL_TOPICS_LABEL = "all"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """What to export for whom: a topic (None: all exportable topics) and optional time/row bounds."""

    topic: str | None
    merchant_id: str
    from_ms: int | None = None
    to_ms: int | None = None
    limit: int | None = None

    @property
    def label(self) -> str:
        return ALL_TOPICS_LABEL if self.topic is None else self.topic


class _Tail(typing.NamedTuple):
    """Offsets [start, end) of a partition and how many visible rows lie between them."""

    start: int
    end: int
    rows: int


class ExportRows:
    """The rows one request may show, in record-timestamp order; iterate once.

    Creating it resolves the partitions (and, for `limit`, where the last rows start), so a
    refusal (403, 404, Kafka down) comes before any output is opened.
    """

    def __init__(self, policy: VisibilityPolicy, request: ExportRequest, scanner: PartitionScanner):
        self.policy = policy
        self.request = request
        self.scanner = scanner
        # Records that were not JSON objects.
        self.skipped_records = 0
        self.columns = ALL_TOPICS_COLUMNS if request.topic is None else policy.columns(request.topic)
        partitions = self._partitions_to_read(request.topic)
        self._starts: dict[PartitionKey, int] = {}
        self._ends: dict[PartitionKey, int] = {}
        self._extra_rows = 0
        if request.limit is None:
            self._starts = {key: BEGINNING for key in partitions}
        elif request.limit > 0:
            tails = {key: self._tail(key, request.limit) for key in partitions}
            self._starts = {key: tail.start for key, tail in tails.items() if tail.rows > 0}
            self._ends = {key: tail.end for key, tail in tails.items()}
            # The tails hold at least `limit` rows in all: skip the oldest of them while merging,
            # rather than keeping the last `limit` rows in memory.
            self._extra_rows = max(0, sum(tail.rows for tail in tails.values()) - request.limit)

    def __iter__(self) -> Iterator[dict[str, typing.Any]]:
        records = self.scanner.read_merged(self._starts, self._ends)
        return itertools.islice(self._visible_rows(records, count_skipped=True), self._extra_rows, None)

    def _partitions_to_read(self, topic: str | None) -> list[PartitionKey]:
        existing = self.scanner.partitions()
        if topic is None:
            return [(name, partition) for name in self.policy.exportable_topics()
                    for partition in existing.get(name, [])]
        if not self.policy.is_exportable(topic):
            if topic in existing:
                raise NotExportable(f"topic {topic} is not exportable")
            raise UnknownTopic(f"no such topic: {topic}")
        # An exportable topic nobody has written yet exports as an empty (header-only) file.
        return [(topic, partition) for partition in existing.get(topic, [])]

    def _tail(self, key: PartitionKey, limit: int) -> _Tail:
        """The end of a partition that holds its last `limit` visible rows (or all it has).

        Reads backwards from the high watermark in growing windows, counting visible rows. A high
        watermark that is too low (Tansu) only makes the first window start earlier: it reads more,
        never less. The end is where that first read met the partition's end.
        """
        topic, partition = key
        low, high = self.scanner.watermarks(topic, partition)
        window = limit
        start, stop = max(low, high - window), None
        end, rows = start, 0
        while True:
            for record in self.scanner.read_range(topic, partition, start, stop):
                end = max(end, record.offset + 1)
                rows += sum(1 for _ in self._visible_rows((record,), count_skipped=False))
            if rows >= limit or start <= low:
                return _Tail(start, end, rows)
            window *= 2
            start, stop = max(low, start - window), start

    def _visible_rows(self, records: Iterable[ScannedRecord], count_skipped: bool) -> Iterator[dict[str, typing.Any]]:
        """The CSV rows the merchant may see among the records in the request's time range."""
        request = self.request
        policy, merchant_id = self.policy, request.merchant_id
        from_ms, to_ms = request.from_ms, request.to_ms
        for record in records:
            # Kafka's record timestamp, not the message's own field: filtered while scanning because
            # offsets_for_times is not reliable on every broker.
            if (from_ms is not None and record.timestamp < from_ms) or (to_ms is not None and record.timestamp > to_ms):
                continue
            message = _decode(record.value)
            if message is None:
                if count_skipped:
                    self.skipped_records += 1
                continue
            if request.topic is not None:
                yield from policy.visible_rows(record.topic, message, merchant_id)
                continue
            visible = policy.visible_message(record.topic, message, merchant_id)
            if visible is not None:
                yield {"topic": record.topic, "partition": record.partition, "offset": record.offset,
                       "timestamp": iso_time(record.timestamp), "value": visible}


def _decode(value: bytes | None) -> dict[str, typing.Any] | None:
    """A record's JSON object, or None if it is not one."""
    if value is None:
        return None
    try:
        message = ujson.loads(value)
    except ValueError:
        try:
            # ujson rejects some valid JSON (integers beyond 64 bits); the stdlib does not.
            message = json.loads(value)
        except ValueError:
            return None
    return message if isinstance(message, dict) else None


def iso_time(epoch_ms: int) -> str | None:
    if epoch_ms < 0:  # the record has no timestamp
        return None
    moment = _EPOCH + datetime.timedelta(milliseconds=epoch_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
