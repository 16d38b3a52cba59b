"""Ingest from Kafka: one consumer thread reads every partition of the live topics.

The thread decodes and filters records (proxy.live.decode); it hands whole batches to the IOLoop
and never touches a Tornado object itself. Envelopes are rendered once, for the records someone
sees: while clients are connected, by the thread in the loop that decodes; without clients, on the
IOLoop for the newest records of each topic only (the history). A bounded number of batches may be
in flight, so a stalled IOLoop slows the consumer instead of growing a queue.
"""

from __future__ import annotations

import collections
import logging
import operator
import threading
import time
import typing

from proxy import metrics
from proxy.config import KafkaSettings
from proxy.kafka import BEGINNING, KafkaReader, KafkaUnavailable, PartitionKey
from proxy.live.decode import IngestStats, RecordDecoder
from proxy.live.health import STALL_SECONDS, IngestHealth
from proxy.live.wire import LiveRecord

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
# Records are read and decoded this many at a time, up to BATCH_SIZE per hand-over: Kafka records
# are objects the garbage collector tracks, and enough of them alive at once (CPython's threshold
# is 700; the proxy raises it, see cli.tune_garbage_collector) start a collection that moves every
# one still alive to an older generation; at a backlog drain that made full collections of the
# whole heap frequent (about 1 us per record).
READ_SIZE = 250
# The history load reads this many times the history size back from each partition's end.
HISTORY_READ_BACK = 3
POLL_TIMEOUT = 0.1
MAX_BATCHES_IN_FLIGHT = 8
RETRY_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


T = typing.TypeVar("T")


def newest_per_topic(items: list[T], count: int, topic_of: typing.Callable[[T], str]) -> list[T]:
    """The last `count` items of each topic, in their original order."""
    kept: collections.Counter[str] = collections.Counter()
    newest = []
    for item in reversed(items):
        topic = topic_of(item)
        if kept[topic] < count:
            kept[topic] += 1
            newest.append(item)
    newest.reverse()
    return newest


# A Kafka record's topic, called from C (map, Counter): no Python frame per record.
_topic_of = operator.methodcaller("topic")
_record_topic = operator.itemgetter(0)  # a LiveRecord's


class Delivery(typing.NamedTuple):
    """One batch handed to the IOLoop: envelopes already rendered, or accepted Kafka records
    to render there (those of them someone will see)."""

    items: list[typing.Any]  # list[LiveRecord] if rendered, else Kafka records
    rendered: bool
    single_topic: bool


class KafkaIngest:
    """The consumer thread: initial history load, then live batches, with topic discovery."""

    def __init__(self, kafka: KafkaSettings, topics: list[str], history_size: int, refresh_interval: float,
                 decoder: RecordDecoder,
                 on_history: typing.Callable[[dict[str, list[str]]], None],
                 on_batch: typing.Callable[[list[LiveRecord]], None],
                 call_soon: typing.Callable[..., None],
                 wants_every_message: typing.Callable[[], bool] = lambda: True,
                 congested: typing.Callable[[], bool] = lambda: False, max_backpressure: float = 5.0):
        """on_history and on_batch run on the IOLoop; call_soon(fn, *args) schedules them there.

        wants_every_message() tells whether live clients are connected; without them only the
        newest records of each topic (for the history) are rendered. congested() tells that
        live sessions are too far behind: the consumer then waits (Kafka keeps the backlog).
        """
        self.kafka = kafka
        self.topics = list(topics)
        self.history_size = history_size
        self.refresh_interval = refresh_interval
        self.decoder = decoder
        self._on_history = on_history
        self._on_batch = on_batch
        self._wants_every_message = wants_every_message
        self._call_soon = call_soon
        self._congested = congested
        self.max_backpressure = max_backpressure
        self.stats = IngestStats()
        self.health = IngestHealth()
        self._in_flight = threading.BoundedSemaphore(MAX_BATCHES_IN_FLIGHT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned: dict[str, set[int]] = {}
        self._start_offsets: dict[PartitionKey, int] = {}
        self._lag: dict[str, dict[int, int]] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the consumer (bad settings raise ValueError here) and start the thread."""
        reader = KafkaReader(self.kafka.properties, secrets=self.kafka.secrets, events=self.health)
        self._thread = threading.Thread(target=self._run, args=(reader,), name="kafka-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish, close the consumer, and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- read from the IOLoop ----------------------------------------------------------------

    def is_alive(self) -> bool:
        """The consumer thread runs and its loop turned recently (for the systemd watchdog).

        Unlike health.state(), a Kafka outage does not count: restarting the proxy would not help.
        """
        thread = self._thread
        return thread is not None and thread.is_alive() and not self.health.stalled()

    def lag(self) -> dict[str, dict[str, int]]:
        """Per topic and partition, messages not yet read (from the last fetch responses)."""
        return {topic: {str(p): lag for p, lag in parts.items()} for topic, parts in self._lag.items()}

    # ---- the thread ----------------------------------------------------------------------------

    def _run(self, reader: KafkaReader) -> None:
        try:
            while True:
                partitions = self._wait_for_metadata(reader)
                if partitions is None:
                    return
                try:
                    self._load_history(reader, partitions)
                    break
                except KafkaUnavailable as exc:
                    # The broker went away in the middle of the load: start the load over.
                    log.warning("Kafka unreachable while loading the history (%s); retrying", exc)
                    self.health.unreachable(str(exc))
            self._follow(reader)
        except Exception:
            log.exception("Kafka ingest stopped by an unexpected error")
            self.health.unreachable("ingest thread failed; see the log")
        finally:
            reader.close()

    def _wait_for_metadata(self, reader: KafkaReader) -> dict[str, list[int]] | None:
        """Partitions of the live topics, retrying with backoff while the broker is unreachable."""
        attempt = 0
        while not self._stop.is_set():
            self.health.turned()
            try:
                partitions = reader.list_partitions(timeout=5.0)
            except KafkaUnavailable as exc:
                self.health.unreachable(str(exc))
                delay = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
                log.warning("Kafka unreachable (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            self.health.reached()
            return {t: partitions[t] for t in self.topics if t in partitions}
        return None

    def _load_history(self, reader: KafkaReader, partitions: dict[str, list[int]]) -> None:
        """Read the tail of every partition up to its end, then keep the newest N per topic.

        Each partition starts HISTORY_READ_BACK x N records before its high mark, so that failed
        requests and malformed records (not kept) rarely leave the history short. A high mark that
        is too small (Tansu) only makes us read more; the end is found by partition-end events.
        """
        size = self.history_size
        self._assigned.clear()
        starts: dict[PartitionKey, int] = {}
        for topic, parts in partitions.items():
            for partition in parts:
                low, high = reader.watermarks(topic, partition, timeout=10.0)
                starts[topic, partition] = max(low, high - size * HISTORY_READ_BACK) if high >= 0 else BEGINNING
        pending = set(starts)
        reader.assign(starts)
        self._remember(starts)
        # Per partition, the newest N accepted records.
        tails: dict[PartitionKey, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=size))
        next_refresh = time.monotonic() + self.refresh_interval
        while pending and not self._stop.is_set():
            self.health.turned()
            consumed: collections.Counter[str] = collections.Counter()
            skipped: collections.Counter[tuple[str, str]] = collections.Counter()
            batch = reader.read(BATCH_SIZE, POLL_TIMEOUT)
            pending.difference_update(batch.ends)
            for message in batch.records:
                consumed[message.topic()] += 1
                if self.decoder.accept(message, skipped) and size:
                    tails[message.topic(), message.partition()].append(message)
            self.stats.add(consumed, skipped)
            if time.monotonic() >= next_refresh:
                # Partitions found now are read from their beginning and join the history.
                self._discover(reader)
                next_refresh = time.monotonic() + self.refresh_interval
        if self._stop.is_set():
            return
        skipped = collections.Counter()
        histories: dict[str, list[str]] = {}
        for topic in self.topics:
            records = [r for key in sorted(tails) if key[0] == topic for m in tails[key]
                       if (r := self.decoder.envelope(m, skipped)) is not None]
            records.sort(key=lambda record: record[1])  # by timestamp; stable: partition order kept
            histories[topic] = [envelope for _, _, envelope in records[-size:]] if size else []
        self.stats.add(collections.Counter(), skipped)
        self._hand_over(self._on_history, histories)
        self.health.history_loaded = True
        log.info("initial history loaded: %s", {t: len(h) for t, h in histories.items() if h})

    def _follow(self, reader: KafkaReader) -> None:
        """Forward new records in batches; look for new topics and partitions periodically."""
        next_refresh = time.monotonic() + self.refresh_interval
        while not self._stop.is_set():
            self.health.turned()
            try:
                batch = self._next_batch(reader)
            except KafkaUnavailable as exc:
                # A fatal client error: it does not go away by itself, so report it and wait.
                if self.health.last_error != str(exc):
                    log.error("%s", exc)
                self.health.unreachable(str(exc))
                self._stop.wait(RETRY_BACKOFF[-1])
                continue
            if batch.items:
                self._hand_over(self._deliver, batch)
            if time.monotonic() >= next_refresh:
                try:
                    self._discover(reader)
                    self._update_lag(reader)
                except KafkaUnavailable as exc:
                    # Metadata, seek and position calls fail while the cluster is in trouble;
                    # the next round tries again.
                    log.warning("Kafka housekeeping failed: %s", exc)
                next_refresh = time.monotonic() + self.refresh_interval

    def _next_batch(self, reader: KafkaReader) -> Delivery:
        """Up to BATCH_SIZE records, read READ_SIZE at a time while more are queued, decoded (and,
        while clients are connected, rendered) and counted; waits POLL_TIMEOUT only for the first."""
        render = self._wants_every_message()
        accept = self.decoder.accept
        items: list[typing.Any] = []
        consumed: collections.Counter[str] = collections.Counter()
        skipped: collections.Counter[tuple[str, str]] = collections.Counter()
        read = 0
        while read < BATCH_SIZE:
            try:
                records = reader.read(READ_SIZE, POLL_TIMEOUT if not read else 0).records
            except KafkaUnavailable as exc:
                if not read:
                    raise
                # Hand over what was read (those records are consumed); a lasting failure is
                # raised again by the next read.
                self.health.unreachable(str(exc))
                break
            read += len(records)
            if render:
                # Clients will see every record: render each in the loop that decodes it, once.
                items += self.decoder.forward(records, consumed, skipped)
            else:
                # Counting in C (map) instead of per record in Python: this loop is the ingest ceiling.
                consumed.update(map(_topic_of, records))
                items += [message for message in records if accept(message, skipped)]
            if len(records) < READ_SIZE:
                break  # nothing more was queued
        if read:
            self.stats.add(consumed, skipped)
        return Delivery(items, render, len(consumed) == 1)

    def _deliver(self, batch: Delivery) -> None:
        """On the IOLoop: pass on what someone will see, rendering the envelopes not rendered yet.

        Whether clients are connected is decided here, at delivery: the thread's guess may be out
        of date by then (the last client left: keep only the history's part; the first one came:
        render the whole batch).
        """
        items = batch.items
        if not self._wants_every_message() and len(items) > self.history_size:
            if batch.single_topic:
                items = items[-self.history_size:] if self.history_size else []
            else:
                items = newest_per_topic(items, self.history_size, _record_topic if batch.rendered else _topic_of)
        if not batch.rendered:
            skipped: collections.Counter[tuple[str, str]] = collections.Counter()
            items = self.decoder.envelopes(items, skipped)
            if skipped:
                self.stats.add(collections.Counter(), skipped)
        self._on_batch(items)

    def _hand_over(self, callback: typing.Callable[[typing.Any], None], payload: typing.Any) -> None:
        """Schedule callback(payload) on the IOLoop, waiting while too many batches are in flight
        or the live sessions are congested."""
        if self._congested():
            # Bounded: a client that reads, but slower than the stream, must not hold everyone back.
            waited_since = time.monotonic()
            deadline = waited_since + self.max_backpressure
            while self._congested() and not self._stop.is_set() and time.monotonic() < deadline:
                self.health.turned()  # waiting for clients that read is progress, not a stall
                self._stop.wait(0.005)
            metrics.INGEST_BACKPRESSURE_SECONDS.inc(time.monotonic() - waited_since)
        while not self._in_flight.acquire(timeout=0.5):
            if self._stop.is_set():
                return

        def run() -> None:
            try:
                callback(payload)
            finally:
                self._in_flight.release()

        self._call_soon(run)

    def _discover(self, reader: KafkaReader) -> None:
        """Assign partitions of live topics that appeared since the last look, from their start."""
        try:
            partitions = reader.list_partitions(timeout=2.0)
        except KafkaUnavailable as exc:
            self.health.unreachable(str(exc))
            return
        self.health.reached()
        new = {(topic, partition): BEGINNING
               for topic in self.topics
               for partition in partitions.get(topic, ())
               if partition not in self._assigned.get(topic, ())}
        if new:
            reader.add(new)
            self._remember(new)
            log.info("following new partitions: %s", ", ".join(f"{t}[{p}]" for t, p in new))

    def _remember(self, starts: typing.Mapping[PartitionKey, int]) -> None:
        for (topic, partition), offset in starts.items():
            self._assigned.setdefault(topic, set()).add(partition)
            self._start_offsets[topic, partition] = max(offset, 0)

    def _update_lag(self, reader: KafkaReader) -> None:
        """Record per-partition lag, and rewind partitions whose broker lost its data.

        A broker that lost its log (restarted without storage, topic re-created) ends below our
        position. Apache Kafka then answers OFFSET_OUT_OF_RANGE and auto.offset.reset rewinds;
        some brokers (Tansu) just return nothing. Either way the position beyond the high mark
        means "start again from the new beginning".
        """
        lag: dict[str, dict[int, int]] = {}
        positions = reader.positions([(t, p) for t, parts in self._assigned.items() for p in parts])
        for (topic, partition), offset in positions.items():
            high = reader.cached_high_watermark(topic, partition)
            # The position is unknown until the first record; fall back to where we assigned it.
            position = offset if offset >= 0 else self._start_offsets.get((topic, partition), -1)
            if high is None or position < 0:
                continue
            if position > high:
                log.warning("%s[%d] ends at %d, before our position %d: the broker lost its data; "
                            "reading from its new beginning", topic, partition, high, position)
                reader.rewind((topic, partition))
                self._start_offsets[topic, partition] = 0
                continue
            behind = high - position
            lag.setdefault(topic, {})[partition] = behind
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(behind)
        self._lag = lag


__all__ = ["KafkaIngest", "STALL_SECONDS", "newest_per_topic"]
