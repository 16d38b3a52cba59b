"""Ingest from Kafka: one consumer thread reads every partition of the live topics.

The thread decodes and filters records; it hands whole batches to the IOLoop and never touches a
Tornado object itself. Envelopes are rendered once, on the IOLoop, for the records someone sees. A bounded number of batches
may be in flight, so a stalled IOLoop slows the consumer instead of growing a queue.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import typing

import ujson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from proxy import kafka_client, metrics
from proxy.config import Config, kafka_properties
from proxy.kafka_client import KafkaUnavailable
from proxy.policy import VisibilityPolicy

log = logging.getLogger(__name__)

# (topic, record timestamp in ms, envelope JSON)
Record = tuple[str, int, str]

topic_of = Message.topic

BATCH_SIZE = 1000
# The history load reads this many times the history size back from each partition's end.
HISTORY_READ_BACK = 3
POLL_TIMEOUT = 0.1
MAX_BATCHES_IN_FLIGHT = 8
RETRY_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
# The consumer loop has not turned for this long (IOLoop stuck, thread wedged): call it stalled.
STALL_SECONDS = 30.0


def newest_per_topic(messages: list[typing.Any], count: int) -> list[typing.Any]:
    """The last `count` messages of each topic, in their original order."""
    kept: collections.Counter[str] = collections.Counter()
    newest = []
    for message in reversed(messages):
        topic = message.topic()
        if kept[topic] < count:
            kept[topic] += 1
            newest.append(message)
    newest.reverse()
    return newest


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
        self._prefix = {t: '{"topic":%s,"partition":' % ujson.dumps(t) for t in topics}
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

    def envelope(self, message: typing.Any, skipped: collections.Counter[tuple[str, str]]) -> Record | None:
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
        return topic, timestamp, '%s%d,"offset":%d,"timestamp":%d,"value":%s}' % (
            self._prefix[topic], message.partition(), message.offset(), timestamp, text)

    def _skip(self, message: typing.Any, topic: str, reason: str,
              skipped: collections.Counter[tuple[str, str]]) -> bool:
        skipped[topic, reason] += 1
        if (topic, reason) not in self._warned:
            self._warned.add((topic, reason))
            log.warning("skipping %s value in topic %s (partition %d, offset %d); further ones are only counted",
                        reason.replace("_", " "), topic, message.partition(), message.offset())
        return False


class KafkaIngest:
    """The consumer thread: initial history load, then live batches, with topic discovery."""

    def __init__(self, config: Config, on_history: typing.Callable[[dict[str, list[str]]], None],
                 on_batch: typing.Callable[[list[Record]], None],
                 call_soon: typing.Callable[..., None],
                 wants_every_message: typing.Callable[[], bool] = lambda: True):
        """on_history and on_batch run on the IOLoop; call_soon(fn, *args) schedules them there.

        wants_every_message() tells whether live clients are connected; without them only the
        newest records of each topic (for the history) are rendered.
        """
        self.config = config
        self.topics = list(config.topics)
        self.history_size = config.history_size
        self.properties = kafka_properties(config)
        self._on_history = on_history
        self._on_batch = on_batch
        self._wants_every_message = wants_every_message
        self._call_soon = call_soon
        policy = VisibilityPolicy.from_config(config.export)
        self.decoder = RecordDecoder(self.topics, config.live.drop_failed_requests,
                                     {topic: policy.hidden_fields(topic) for topic in self.topics})
        self.stats = IngestStats()
        self._in_flight = threading.BoundedSemaphore(MAX_BATCHES_IN_FLIGHT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned: dict[str, set[int]] = {}
        self._start_offsets: dict[tuple[str, int], int] = {}
        self._lag: dict[str, dict[int, int]] = {}
        # Health, written by the consumer thread, read by the IOLoop.
        self.connected = False
        self.history_loaded = False
        self.last_error: str | None = None
        self._last_turn = time.monotonic()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the consumer (bad settings raise ValueError here) and start the thread."""
        consumer = kafka_client.make_consumer(self.properties, error_cb=self._on_kafka_error)
        self._thread = threading.Thread(target=self._run, args=(consumer,), name="kafka-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish, close the consumer, and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- health, read from the IOLoop ----------------------------------------------------------

    def health(self) -> tuple[str, str | None]:
        """("ok" | "starting" | "degraded", reason)."""
        if self.last_error and not self.connected:
            return "degraded", f"Kafka unreachable: {self.last_error}"
        if not self.history_loaded:
            return "starting", "loading the initial history from Kafka"
        if self.last_error:
            return "degraded", f"Kafka unreachable: {self.last_error}"
        if time.monotonic() - self._last_turn > STALL_SECONDS:
            return "degraded", f"consumer stalled: no progress for over {STALL_SECONDS:.0f}s"
        return "ok", None

    def is_alive(self) -> bool:
        """The consumer thread runs and its loop turned recently (for the systemd watchdog).

        Unlike health(), a Kafka outage does not count: restarting the proxy would not help.
        """
        thread = self._thread
        return (thread is not None and thread.is_alive()
                and time.monotonic() - self._last_turn <= STALL_SECONDS)

    def lag(self) -> dict[str, dict[str, int]]:
        """Per topic and partition, messages not yet read (from the last fetch responses)."""
        return {topic: {str(p): lag for p, lag in parts.items()} for topic, parts in self._lag.items()}

    # ---- the thread ----------------------------------------------------------------------------

    def _run(self, consumer: typing.Any) -> None:
        try:
            while True:
                partitions = self._wait_for_metadata(consumer)
                if partitions is None:
                    return
                try:
                    self._load_history(consumer, partitions)
                    break
                except KafkaUnavailable as exc:
                    # The broker went away in the middle of the load: start the load over.
                    log.warning("Kafka unreachable while loading the history (%s); retrying", exc)
                    self.last_error = str(exc)
                    self.connected = False
            self._follow(consumer)
        except Exception:
            log.exception("Kafka ingest stopped by an unexpected error")
            self.last_error = "ingest thread failed; see the log"
            self.connected = False
        finally:
            consumer.close()

    def _on_kafka_error(self, error: KafkaError) -> None:
        # Called from inside consume(); all-brokers-down is what tells us the cluster is gone.
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
            if error.code() == KafkaError._ALL_BROKERS_DOWN:
                self.connected = False
            self.last_error = kafka_client.describe(error)
        else:
            log.warning("Kafka client error: %s", kafka_client.describe(error))

    def _wait_for_metadata(self, consumer: typing.Any) -> dict[str, list[int]] | None:
        """Partitions of the live topics, retrying with backoff while the broker is unreachable."""
        attempt = 0
        while not self._stop.is_set():
            self._last_turn = time.monotonic()  # waiting for Kafka is progress, not a stall
            try:
                partitions = kafka_client.list_partitions(consumer, timeout=5.0)
            except KafkaUnavailable as exc:
                self.last_error = str(exc)
                self.connected = False
                delay = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
                log.warning("Kafka unreachable (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            self._mark_connected()
            return {t: partitions[t] for t in self.topics if t in partitions}
        return None

    def _mark_connected(self) -> None:
        if not self.connected or self.last_error:
            log.info("connected to Kafka")
        self.connected = True
        self.last_error = None

    def _load_history(self, consumer: typing.Any, partitions: dict[str, list[int]]) -> None:
        """Read the tail of every partition up to its end, then keep the newest N per topic.

        Each partition starts HISTORY_READ_BACK x N records before its high mark, so that failed
        requests and malformed records (not kept) rarely leave the history short. A high mark that is too
        small (Tansu) only makes us read more; the end is found by partition EOF events.
        """
        size = self.history_size
        self._assigned.clear()
        assignment = []
        for topic, parts in partitions.items():
            for partition in parts:
                low, high = kafka_client.watermarks(consumer, topic, partition, timeout=10.0)
                start = max(low, high - size * HISTORY_READ_BACK) if high >= 0 else OFFSET_BEGINNING
                assignment.append(TopicPartition(topic, partition, start))
        pending = {(tp.topic, tp.partition) for tp in assignment}
        consumer.assign(assignment)
        self._remember(assignment)
        # Per partition, the newest N accepted records.
        tails: dict[tuple[str, int], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=size))
        next_refresh = time.monotonic() + self.config.topic_refresh_interval
        while pending and not self._stop.is_set():
            self._last_turn = time.monotonic()
            consumed: collections.Counter[str] = collections.Counter()
            skipped: collections.Counter[tuple[str, str]] = collections.Counter()
            for message in kafka_client.consume_available(consumer, BATCH_SIZE, POLL_TIMEOUT):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard((message.topic(), message.partition()))
                        self._mark_connected()
                    else:
                        self._log_record_error(error)
                    continue
                consumed[message.topic()] += 1
                if self.decoder.accept(message, skipped) and size:
                    tails[message.topic(), message.partition()].append(message)
            self.stats.add(consumed, skipped)
            if time.monotonic() >= next_refresh:
                # Partitions found now are read from their beginning and join the history.
                self._discover(consumer)
                next_refresh = time.monotonic() + self.config.topic_refresh_interval
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
        self.history_loaded = True
        log.info("initial history loaded: %s", {t: len(h) for t, h in histories.items() if h})

    def _follow(self, consumer: typing.Any) -> None:
        """Forward new records in batches; look for new topics and partitions periodically."""
        accept = self.decoder.accept
        next_refresh = time.monotonic() + self.config.topic_refresh_interval
        while not self._stop.is_set():
            self._last_turn = time.monotonic()
            messages = kafka_client.consume_available(consumer, BATCH_SIZE, POLL_TIMEOUT)
            if messages:
                batch: list[typing.Any] = []
                # Counting in C (map) instead of per record in Python: this loop is the ingest
                # ceiling. Error events carry a topic too; they are taken out again below.
                consumed = collections.Counter(map(topic_of, messages))
                skipped: collections.Counter[tuple[str, str]] = collections.Counter()
                for message in messages:
                    error = message.error()
                    if error is not None:
                        consumed[message.topic()] -= 1
                        if error.code() == KafkaError._PARTITION_EOF:
                            self._mark_connected()
                        else:
                            self._log_record_error(error)
                        continue
                    if accept(message, skipped):
                        batch.append(message)
                consumed = +consumed  # drop the zero counts of error events
                self.stats.add(consumed, skipped)
                if consumed:
                    self._mark_connected()
                if batch:
                    self._hand_over(self._deliver, (batch, len(consumed) == 1))
            if time.monotonic() >= next_refresh:
                try:
                    self._discover(consumer)
                    self._update_lag(consumer)
                except KafkaException as exc:
                    # Metadata, seek and position calls fail while the cluster is in trouble;
                    # the next round tries again.
                    log.warning("Kafka housekeeping failed: %s", kafka_client.describe(exc.args[0]))
                next_refresh = time.monotonic() + self.config.topic_refresh_interval

    def _deliver(self, batch: tuple[list[typing.Any], bool]) -> None:
        """On the IOLoop: render the envelopes someone will see and pass them on."""
        messages, single_topic = batch
        if not self._wants_every_message() and len(messages) > self.history_size:
            if single_topic:
                messages = messages[-self.history_size:] if self.history_size else []
            else:
                messages = newest_per_topic(messages, self.history_size)
        skipped: collections.Counter[tuple[str, str]] = collections.Counter()
        envelope = self.decoder.envelope
        records = [r for m in messages if (r := envelope(m, skipped)) is not None]
        if skipped:
            self.stats.add(collections.Counter(), skipped)
        self._on_batch(records)

    def _log_record_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION):
            log.debug("Kafka: %s", kafka_client.describe(error))
        else:
            log.warning("Kafka consumer error: %s", kafka_client.describe(error))

    def _hand_over(self, callback: typing.Callable[[typing.Any], None], payload: typing.Any) -> None:
        """Schedule callback(payload) on the IOLoop, waiting while too many batches are in flight."""
        while not self._in_flight.acquire(timeout=0.5):
            if self._stop.is_set():
                return

        def run() -> None:
            try:
                callback(payload)
            finally:
                self._in_flight.release()

        self._call_soon(run)

    def _discover(self, consumer: typing.Any) -> None:
        """Assign partitions of live topics that appeared since the last look, from their start."""
        try:
            partitions = kafka_client.list_partitions(consumer, timeout=2.0)
        except KafkaUnavailable as exc:
            self.last_error = str(exc)
            self.connected = False
            return
        self._mark_connected()
        new = [TopicPartition(topic, partition, OFFSET_BEGINNING)
               for topic in self.topics
               for partition in partitions.get(topic, ())
               if partition not in self._assigned.get(topic, ())]
        if new:
            consumer.incremental_assign(new)
            self._remember(new)
            log.info("following new partitions: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in new))

    def _remember(self, assignment: list[TopicPartition]) -> None:
        for tp in assignment:
            self._assigned.setdefault(tp.topic, set()).add(tp.partition)
            self._start_offsets[tp.topic, tp.partition] = max(tp.offset, 0)

    def _update_lag(self, consumer: typing.Any) -> None:
        """Record per-partition lag, and rewind partitions whose broker lost its data.

        A broker that lost its log (restarted without storage, topic re-created) ends below our
        position. Apache Kafka then answers OFFSET_OUT_OF_RANGE and auto.offset.reset rewinds;
        some brokers (Tansu) just return nothing. Either way the position beyond the high mark
        means "start again from the new beginning".
        """
        lag: dict[str, dict[int, int]] = {}
        positions = consumer.position([TopicPartition(t, p) for t, parts in self._assigned.items() for p in parts])
        for tp in positions:
            high = kafka_client.cached_high_watermark(consumer, tp.topic, tp.partition)
            # position() is unknown until the first record; fall back to where we assigned it.
            position = tp.offset if tp.offset >= 0 else self._start_offsets.get((tp.topic, tp.partition), -1)
            if high is None or position < 0:
                continue
            if position > high:
                log.warning("%s[%d] ends at %d, before our position %d: the broker lost its data; "
                            "reading from its new beginning", tp.topic, tp.partition, high, position)
                consumer.seek(TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
                self._start_offsets[tp.topic, tp.partition] = 0
                continue
            behind = high - position
            lag.setdefault(tp.topic, {})[tp.partition] = behind
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(behind)
        self._lag = lag
