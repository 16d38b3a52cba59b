"""Which Kafka records the live stream forwards, their envelopes, and the count of what it skips."""

from __future__ import annotations

import collections
import logging
import threading
import time
import typing

import ujson

from proxy import metrics
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
            metrics.MESSAGES_CONSUMED.labels(topic).inc(count)
        for (topic, reason), count in skipped.items():
            metrics.MESSAGES_SKIPPED.labels(topic, reason).inc(count)

    def consumed_by_topic(self) -> dict[str, int]:
        with self._lock:
            return dict(self._consumed)

    def skipped_by_topic(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {topic: dict(reasons) for topic, reasons in self._skipped.items()}


class RecordDecoder:
    """Decides which records to forward and renders their envelopes; counts what it skips.

    accept() runs on the consumer thread for every record; envelope() runs on the IOLoop only for
    records someone will see (the newest of each topic, or all while clients are connected), so
    ingest does not pay for formatting messages nobody reads.
    """

    def __init__(self, topics: typing.Iterable[str], drop_failed_requests: bool,
                 hidden_fields: typing.Mapping[str, frozenset[str]] | None = None):
        self.drop_failed_requests = drop_failed_requests
        # Topics with fields nobody may see (from the policy): those values are re-encoded.
        self._hidden = {topic: fields for topic, fields in (hidden_fields or {}).items() if fields}
        self._prefix = {t: wire.envelope_prefix(t) for t in topics}
        self._warned: set[tuple[str, str]] = set()

    def accept(self, message: typing.Any, skipped: collections.Counter[tuple[str, str]]) -> bool:
        """Whether the record is a JSON object to forward (valid, and not a failed request)."""
        try:
            value = ujson.loads(message.value())
        except (ValueError, TypeError):
            return self._skip(message, message.topic(), "invalid_json", skipped)
        if type(value) is not dict:
            return self._skip(message, message.topic(), "not_an_object", skipped)
        if self.drop_failed_requests and value.get("http_code", 200) != 200:
            skipped[message.topic(), "failed_request"] += 1
            return False
        return True

    def envelope(self, message: typing.Any, skipped: collections.Counter[tuple[str, str]]) -> LiveRecord | None:
        """(topic, timestamp, envelope JSON) of an accepted record; None if it cannot be JSON."""
        topic, raw = message.topic(), message.value()
        hidden = self._hidden.get(topic)
        # Reuse the producer's bytes instead of re-encoding: accept() has proven them to be a
        # JSON object. ujson also accepts NaN/Infinity, which JSON does not: re-encode those.
        if hidden or b"NaN" in raw or b"Infinity" in raw:
            value = ujson.loads(raw)
            for field in hidden or ():
                value.pop(field, None)
            try:
                text = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
            except OverflowError:
                self._skip(message, topic, "invalid_json", skipped)
                return None
        else:
            text = raw.decode("utf-8")
        kind, timestamp = message.timestamp()
        if not kind:  # TIMESTAMP_NOT_AVAILABLE
            timestamp = int(time.time() * 1000)
        return topic, timestamp, wire.render_envelope(self._prefix[topic], message.partition(), message.offset(),
                                                      timestamp, text)

    def _skip(self, message: typing.Any, topic: str, reason: str,
              skipped: collections.Counter[tuple[str, str]]) -> bool:
        skipped[topic, reason] += 1
        if (topic, reason) not in self._warned:
            self._warned.add((topic, reason))
            log.warning("skipping %s value in topic %s (partition %d, offset %d); further ones are only counted",
                        reason.replace("_", " "), topic, message.partition(), message.offset())
        return False
