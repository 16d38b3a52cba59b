"""Request → visible rows: which partitions to read, from where, and what the merchant may see of each record.

The scan (proxy.export.scan) supplies records merged by timestamp; the policy (proxy.policy)
decides what of each the merchant may see; the CSV writer gets plain row dicts, in lists.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import logging
import typing
from collections.abc import Iterator

import orjson

from proxy import records
from proxy.export.errors import NotExportable, UnknownTopic
from proxy.export.scan import PartitionScanner, ScannedRecords
from proxy.kafka import BEGINNING, PartitionKey
from proxy.policy import ViewFunction, VisibilityPolicy

# Columns of the export of all topics at once (GET /export/data).
ALL_TOPICS_COLUMNS = ("topic", "partition", "offset", "timestamp", "value")
# Topic label (file names, metrics) of the all-topics export.
ALL_TOPICS_LABEL = "all"
# The export's lines keep the export's logger name.
log = logging.getLogger("proxy.export")
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
    """The rows one request may show, in record-timestamp order, in lists; iterate batches() once.

    Creating it resolves the partitions (and, for `limit`, where the last rows start), so a
    refusal (403, 404, Kafka down) comes before any output is opened.
    """

    def __init__(self, policy: VisibilityPolicy, request: ExportRequest, scanner: PartitionScanner,
                 max_record_bytes: int = records.DEFAULT_MAX_RECORD_BYTES):
        self.policy = policy
        self.request = request
        self.scanner = scanner
        self.max_record_bytes = max_record_bytes
        # Records of the requested range the export skipped, by reason (proxy.records.REASONS).
        self.skipped: collections.Counter[str] = collections.Counter()
        self.columns = ALL_TOPICS_COLUMNS if request.topic is None else policy.columns(request.topic)
        # The policy's rows of one message (topic export), or its visible message per topic (all
        # topics): decided once per export, called per record.
        self._rows_of = None if request.topic is None else policy.rows_function(request.topic, request.merchant_id)
        self._views: dict[str, ViewFunction] = {}
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

    @property
    def skipped_records(self) -> int:
        return sum(self.skipped.values())

    def batches(self) -> Iterator[list[dict[str, typing.Any]]]:
        """The rows, in lists of what the scan gives at a time (never empty)."""
        extra = self._extra_rows
        for scanned in self.scanner.read_merged(self._starts, self._ends):
            rows = self._visible_rows(scanned, count_skipped=True)
            if extra:
                skipped_now = min(extra, len(rows))
                rows, extra = rows[skipped_now:], extra - skipped_now
            if rows:
                yield rows

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
            for scanned in self.scanner.read_range(topic, partition, start, stop):
                end = max(end, scanned.offsets[-1] + 1)
                rows += len(self._visible_rows(scanned, count_skipped=False))
            if rows >= limit or start <= low:
                return _Tail(start, end, rows)
            window *= 2
            start, stop = max(low, start - window), start

    def _visible_rows(self, scanned: ScannedRecords, count_skipped: bool) -> list[dict[str, typing.Any]]:
        """The CSV rows the merchant may see among the records in the request's time range.

        A record that cannot be used (proxy.records) or turned into rows is skipped and counted:
        it costs only itself, never the export.
        """
        request = self.request
        partitions, offsets, values, stamps = scanned
        if request.from_ms is not None or request.to_ms is not None:
            # Kafka's record timestamp, not the message's own field: filtered while scanning because
            # offsets_for_times is not reliable on every broker.
            low = -(2 ** 63) if request.from_ms is None else request.from_ms
            high = 2 ** 63 if request.to_ms is None else request.to_ms
            in_range = [low <= stamp <= high for stamp in stamps]
            partitions, offsets, values, stamps = (list(itertools.compress(column, in_range)) for column in scanned)
        decode, loads, max_bytes = records.decode_value, orjson.loads, self.max_record_bytes
        rows_of = self._rows_of
        rows: list[dict[str, typing.Any]] = []
        # This loop runs once per record of every export: no per-record helper calls but the policy's.
        for position, raw in enumerate(values):
            try:
                # The record rule's common case inline: a value within max_bytes that orjson reads
                # as an object is what records.decode_value() returns. It reads anything else
                # itself, or names the reason to skip it.
                try:
                    message = loads(raw) if len(raw) <= max_bytes else None
                except (TypeError, orjson.JSONDecodeError):  # a tombstone (None), or not plain JSON
                    message = None
                if type(message) is not dict:
                    message = decode(raw, max_bytes)
                # Built whole before the first is written: a record is exported entirely or not at all.
                if rows_of is not None:
                    rows += rows_of(message)
                else:
                    rows += self._all_topics_rows(partitions[position], offsets[position], stamps[position], message)
            except records.SkippedRecord as skip:
                if count_skipped:
                    self.skipped[skip.reason] += 1
            except Exception:  # one record must not end every merchant's export of the topic
                if count_skipped:
                    self._cannot_render(partitions[position], offsets[position])
        return rows

    def _all_topics_rows(self, key: PartitionKey, offset: int, timestamp: int,
                         message: dict[str, typing.Any]) -> list[dict[str, typing.Any]]:
        """The all-topics export's row of one record, if the merchant may see it."""
        topic, partition = key
        try:
            view = self._views[topic]
        except KeyError:
            view = self._views[topic] = self.policy.view_function(topic, self.request.merchant_id)
        visible = view(message)
        if visible is None:
            return []
        return [{"topic": topic, "partition": partition, "offset": offset, "timestamp": iso_time(timestamp),
                 "value": visible}]

    def _cannot_render(self, key: PartitionKey, offset: int) -> None:
        if not self.skipped["cannot_render"]:
            # Once per export, with the traceback: this is a bug to fix, not bad input.
            log.exception("export skips %s[%d] offset %d: it cannot be turned into rows", key[0], key[1], offset)
        self.skipped["cannot_render"] += 1


def iso_time(epoch_ms: int) -> str | None:
    if epoch_ms < 0:  # the record has no timestamp
        return None
    moment = _EPOCH + datetime.timedelta(milliseconds=epoch_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
