"""Which Kafka records the live stream forwards, their envelopes, and the count of what it skips."""

from __future__ import annotations

import collections
import logging
import threading
import time
import typing

import orjson
import ujson

from proxy import metrics, records
from proxy.live import wire
from proxy.live.wire import LiveRecord

log = logging.getLogger("proxy.live.ingest")


class IngestStats:
    """Counters of consumed and skipped records, per topic (updated once per batch)."""

    def __init__(self) -> None:
        self._consumed: collections.Counter[str] = collections.Counter()
        self._skipped: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._lock = threading.Lock()

    def add(self, consumed: collections.Counter[str], skipped: collections.Counter[tuple[str, str]]) -> None:
        with self._lock:
            self._consumed.update(consumed)
            for (topic, reason), count in skipped.items():
                self._skipped[topic][reason] += count
        for topic, count in consumed.items():
            metrics.labelled(metrics.MESSAGES_CONSUMED, topic).inc(count)
        for (topic, reason), count in skipped.items():
            metrics.labelled(metrics.MESSAGES_SKIPPED, topic, reason).inc(count)

    def consumed_by_topic(self) -> dict[str, int]:
        with self._lock:
            return dict(self._consumed)

    def skipped_by_topic(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {topic: dict(reasons) for topic, reasons in self._skipped.items()}


class RecordDecoder:
    """Decides which records to forward and renders their envelopes; counts what it skips.

    accept() applies the one rule of proxy.records (what is a usable record) plus the live view's
    own (no failed requests); envelope() renders what it accepted. While clients are connected the
    consumer thread runs both for every record, as forward(); without clients it runs accept() only,
    and envelopes() renders on the IOLoop the newest records of each topic (the history), so ingest
    does not pay for formatting messages nobody reads.
    """

    def __init__(self, topics: typing.Iterable[str], drop_failed_requests: bool,
                 hidden_fields: typing.Mapping[str, frozenset[str]] | None = None,
                 max_record_bytes: int = records.DEFAULT_MAX_RECORD_BYTES):
        self.drop_failed_requests = drop_failed_requests
        self.max_record_bytes = max_record_bytes
        # Topics with fields nobody may see (from the policy): those values are re-encoded.
        self._hidden = {topic: fields for topic, fields in (hidden_fields or {}).items() if fields}
        self._prefix = {t: wire.envelope_prefix(t) for t in topics}
        self._warned: set[tuple[str, str]] = set()

    def accept(self, message: typing.Any, skipped: collections.Counter[tuple[str, str]]) -> bool:
        """Whether the record is a usable JSON object to forward (and not a failed request)."""
        try:
            value = records.decode_value(message.value(), self.max_record_bytes)
        except records.SkippedRecord as skip:
            return self._skip(message, message.topic(), skip.reason, skipped)
        if self.drop_failed_requests and value.get("http_code", 200) != 200 and records.is_failed_request(value):
            skipped[message.topic(), "failed_request"] += 1
            return False
        return True

    def envelope(self, message: typing.Any, skipped: collections.Counter[tuple[str, str]]) -> LiveRecord | None:
        """(topic, timestamp, envelope JSON) of an accepted record; None (counted) if it cannot be rendered."""
        topic, raw = message.topic(), message.value()
        hidden = self._hidden.get(topic)
        try:
            if hidden:
                value = records.decode_value(raw, self.max_record_bytes)
                for field in hidden:
                    value.pop(field, None)
                text = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
            else:
                # The producer's own bytes: accept() has proven them to be strict JSON, which every
                # client parses as the proxy did.
                text = records.value_text(raw)
        except (records.SkippedRecord, ValueError, OverflowError) as exc:
            # Not expected after accept(); if it happens, the record costs only itself.
            self._skip(message, topic, "cannot_render", skipped, detail=repr(exc))
            return None
        kind, timestamp = message.timestamp()
        if not kind:  # TIMESTAMP_NOT_AVAILABLE
            timestamp = int(time.time() * 1000)
        return topic, timestamp, wire.render_envelope(self._prefix[topic], message.partition(), message.offset(),
                                                      timestamp, text)

    def forward(self, messages: list[typing.Any], consumed: collections.Counter[str],
                skipped: collections.Counter[tuple[str, str]]) -> list[LiveRecord]:
        """envelope() of each record of a batch that accept() takes, in one loop (the consumer thread's,
        while clients are connected and will see every record); counts every record in consumed.

        At a backlog drain this loop runs for every record, so accept() and envelope() are inlined
        for the common case, each record decoded once and its fields read once: a value of at most
        max_record_bytes that orjson reads as an object, of a topic without hidden fields. That is
        exactly what records.decode_value() accepts without a detour, decoded by the same call; and
        such a value has no byte order mark (orjson refuses one), so its text is its bytes. Every
        other record (tombstone, too large, byte order mark, malformed, hidden fields) takes
        accept() and envelope() themselves. tests/test_decode.py holds the two ways equal.
        """
        rendered: list[LiveRecord] = []
        append = rendered.append
        loads, decode_error, is_failed = orjson.loads, orjson.JSONDecodeError, records.is_failed_request
        prefixes, hidden, max_bytes = self._prefix, self._hidden, self.max_record_bytes
        drop_failed = self.drop_failed_requests
        now_ms = int(time.time() * 1000)
        for message in messages:
            topic, raw = message.topic(), message.value()
            consumed[topic] += 1
            if raw is not None and len(raw) <= max_bytes and topic not in hidden:
                try:
                    value = loads(raw)
                except decode_error:
                    value = None
                if type(value) is dict:
                    if drop_failed and value.get("http_code", 200) != 200 and is_failed(value):
                        skipped[topic, "failed_request"] += 1
                        continue
                    kind, timestamp = message.timestamp()
                    if not kind:  # TIMESTAMP_NOT_AVAILABLE
                        timestamp = now_ms
                    # wire.render_envelope() as an f-string: one allocation, the cheapest way CPython
                    # builds this text.
                    append((topic, timestamp, f'{prefixes[topic]}{message.partition()},"offset":{message.offset()},'
                                              f'"timestamp":{timestamp},"value":{raw.decode("utf-8")}}}'))
                    continue
            if self.accept(message, skipped):
                record = self.envelope(message, skipped)
                if record is not None:
                    append(record)
        return rendered

    def envelopes(self, messages: list[typing.Any], skipped: collections.Counter[tuple[str, str]]) -> list[LiveRecord]:
        """envelope() of each accepted record of a batch, rendered in one loop.

        The common case (no hidden field, no byte order mark) is inlined: at a backlog drain
        this loop runs for every record, and three calls per record were a tenth of the proxy.
        """
        rendered: list[LiveRecord] = []
        append = rendered.append
        prefixes, hidden, envelope = self._prefix, self._hidden, self.envelope
        render = wire.ENVELOPE_FORMAT.__mod__
        now_ms = int(time.time() * 1000)
        for message in messages:
            topic, raw = message.topic(), message.value()
            if topic in hidden or raw.startswith(records.BOM):
                record = envelope(message, skipped)
                if record is not None:
                    append(record)
                continue
            kind, timestamp = message.timestamp()
            if not kind:  # TIMESTAMP_NOT_AVAILABLE
                timestamp = now_ms
            append((topic, timestamp, render((prefixes[topic], message.partition(), message.offset(), timestamp,
                                              raw.decode("utf-8")))))
        return rendered

    def _skip(self, message: typing.Any, topic: str, reason: str,
              skipped: collections.Counter[tuple[str, str]], detail: str | None = None) -> bool:
        skipped[topic, reason] += 1
        # Once per topic and reason: a producer writing junk must not flood the log.
        if (topic, reason) not in self._warned:
            self._warned.add((topic, reason))
            log.warning("skipping a record of topic %s (partition %d, offset %d): %s%s; further ones are only counted",
                        topic, message.partition(), message.offset(), records.REASONS.get(reason, reason),
                        f" ({detail})" if detail else "")
        return False
