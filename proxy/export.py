"""Merchant CSV exports: scan Kafka partitions, keep what the merchant may see, write CSV.

Kafka scan → visibility filter (proxy.policy) → CSV writer (proxy.csv_export) → data folder
(proxy.data_folder) or the HTTP response. Everything that blocks (the Kafka client, the disk)
runs on a thread of the export executor, so the IOLoop and the live stream never wait for an export.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import heapq
import itertools
import json
import logging
import os
import re
import threading
import time
import typing
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

import ujson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from proxy import kafka_client
from proxy.config import Config, kafka_properties
from proxy.csv_export import CsvExportWriter
from proxy.data_folder import DataFolder
from proxy.metrics import EXPORT_DURATION, EXPORT_REQUESTS, ROWS_EXPORTED
from proxy.policy import VisibilityPolicy

log = logging.getLogger(__name__)

# Columns of the export of all topics at once (GET /export/data).
ALL_TOPICS_COLUMNS = ("topic", "partition", "offset", "timestamp", "value")
# Topic label (file names, metrics) of the all-topics export, and metrics label of unknown topics
# (a label per requested name would let any client grow the metrics without bound).
ALL_TOPICS_LABEL = "all"
OTHER_TOPIC_LABEL = "other"
KAFKA_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_PLAIN_LOG_VALUE = re.compile(r"[A-Za-z0-9._:+/=@-]+")

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
# Records buffered per partition by the merge. Below about a fetch's worth of records, pausing
# and resuming partitions (which drops what librdkafka had fetched for them) slows exports 10x.
READ_AHEAD_RECORDS = 2000


class ExportError(Exception):
    """An export that cannot be served; status is the HTTP status that says why."""

    status = 500
    outcome = "failed"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ExportError):
    status, outcome = 400, "bad_request"


class MissingToken(ExportError):
    status, outcome = 401, "unauthorized"


class NotExportable(ExportError):
    status, outcome = 403, "not_exportable"


class UnknownTopic(ExportError):
    status, outcome = 404, "unknown_topic"


class TooManyExports(ExportError):
    status, outcome = 429, "too_many_exports"


class KafkaUnavailable(ExportError):
    status, outcome = 503, "kafka_unavailable"


class ExportCancelled(ExportError):
    """The client went away or the server is shutting down."""

    status, outcome = 503, "cancelled"


class ExportFailed(ExportError):
    """The export file could not be written (disk full, permissions)."""

    status, outcome = 500, "failed"


def parse_time(name: str, text: str | None) -> int | None:
    """A from/to query value as epoch milliseconds: digits are epoch ms, else ISO 8601 (UTC if no zone)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if re.fullmatch(r"-?[0-9]{1,15}", text):
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 time or epoch milliseconds, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return (moment - _EPOCH) // datetime.timedelta(milliseconds=1)


def parse_limit(text: str | None) -> int | None:
    """The limit query value: how many of the most recent visible rows; None if absent."""
    if text is None or not text.strip():
        return None
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()):
        raise BadRequest(f"'limit' must be a whole number from 0 to 999999999, got {text!r}")
    return int(text)



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


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """A finished export: its file name (None when streamed), rows and bytes written."""

    filename: str | None
    rows: int
    bytes: int
    # Records that were not JSON objects, and cells dropped for lack of an inferred column.
    skipped_records: int = 0
    dropped_keys: int = 0


class Record(typing.NamedTuple):
    """One Kafka record as the export reads it."""

    timestamp: int
    topic: str
    partition: int
    offset: int
    value: bytes | None


TopicPartitionKey = tuple[str, int]


class PartitionScanner:
    """One export's own Kafka consumer: metadata, watermarks, and partitions read up to their end.

    Knows how to scan: "the end" is the partition-EOF event, never a precomputed end offset
    (ListOffsets is wrong on some brokers); silence is slowness, not the end, until `timeout`;
    client errors become KafkaUnavailable (503). proxy.kafka_client builds the consumer.
    """

    BATCH = 1000

    def __init__(self, properties: Mapping[str, typing.Any], timeout: float, cancelled: threading.Event,
                 read_ahead: int = READ_AHEAD_RECORDS):
        self._timeout = timeout
        self._cancelled = cancelled
        self._read_ahead = max(2, read_ahead)
        self._fatal_error: KafkaError | None = None
        self._last_error: KafkaError | None = None
        try:
            self._consumer = kafka_client.make_consumer(properties, defaults=EXPORT_CONSUMER_DEFAULTS,
                                                        error_cb=self._on_error)
        except ValueError as exc:
            raise KafkaUnavailable(str(exc)) from None

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> PartitionScanner:
        return self

    def __exit__(self, *exc_info: typing.Any) -> None:
        self.close()

    def partitions(self) -> dict[str, list[int]]:
        """Partition ids of every topic that exists in Kafka now."""
        try:
            return kafka_client.list_partitions(self._consumer, self._timeout)
        except kafka_client.KafkaUnavailable as exc:
            raise KafkaUnavailable(f"Kafka is unreachable: {exc}") from None

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        """(low, high) offsets. The high one may be too low on some brokers (Tansu): use it only to read more."""
        try:
            return kafka_client.watermarks(self._consumer, topic, partition, self._timeout)
        except kafka_client.KafkaUnavailable as exc:
            raise KafkaUnavailable(f"Kafka is unreachable: {exc}") from None

    def read_range(self, topic: str, partition: int, start: int, end: int | None) -> Iterator[Record]:
        """Records of one partition with start <= offset < end (None: up to the partition's end)."""
        self._consumer.assign([TopicPartition(topic, partition, start)])
        while True:
            for message in self._next_batch():
                if message.topic() != topic or message.partition() != partition:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        return
                    raise KafkaUnavailable(f"Kafka error on {topic}[{partition}]: {kafka_client.describe(error)}")
                offset = message.offset()
                if offset < start:
                    continue
                if end is not None and offset >= end:
                    return
                yield _record_of(message)

    def read_merged(self, starts: Mapping[TopicPartitionKey, int],
                    ends: Mapping[TopicPartitionKey, int] | None = None) -> Iterator[Record]:
        """Records of the given partitions from their start offset to their end, merged by timestamp.

        The end is the partition's end as of the read (its EOF event), or ends[partition] (an
        offset once read) if given. A k-way merge: a record is yielded once every partition that
        is not at its end has one buffered, and each partition buffers at most about `read_ahead`
        records (it is paused while full), so memory does not grow with the topic.
        """
        if not starts:
            return
        ends = ends or {}
        consumer = self._consumer
        consumer.assign([TopicPartition(topic, partition, offset) for (topic, partition), offset in starts.items()])
        buffered: dict[TopicPartitionKey, deque[Record]] = {key: deque() for key in starts}
        # Guards against records fetched twice (after a resume) or from before the start.
        next_offset = {key: max(offset, 0) for key, offset in starts.items()}
        not_at_end = set(starts)
        # Partitions not at their end with nothing buffered: the merge cannot go on without them.
        starving = set(starts)
        paused: set[TopicPartitionKey] = set()
        heads: list[tuple[tuple[int, str, int, int], TopicPartitionKey]] = []

        def reached_end(key: TopicPartitionKey) -> None:
            not_at_end.discard(key)
            starving.discard(key)
            # The export reads the partition as of the request; later records are not its business.
            consumer.pause([TopicPartition(*key)])

        while True:
            while starving:
                for message in self._next_batch():
                    key = (message.topic(), message.partition())
                    if key not in not_at_end:
                        continue  # written after this partition's end was reached
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            raise KafkaUnavailable(f"Kafka error on {key[0]}[{key[1]}]: {kafka_client.describe(error)}")
                        reached_end(key)
                        continue
                    offset = message.offset()
                    if offset < next_offset[key]:
                        continue
                    end = ends.get(key)
                    if end is not None and offset >= end:
                        reached_end(key)
                        continue
                    next_offset[key] = offset + 1
                    queue = buffered[key]
                    record = _record_of(message)
                    queue.append(record)
                    if len(queue) == 1:
                        heapq.heappush(heads, (_merge_key(record), key))
                        starving.discard(key)
                    if end is not None and offset + 1 >= end:
                        reached_end(key)
                    elif len(queue) >= self._read_ahead and key not in paused:
                        consumer.pause([TopicPartition(*key)])
                        paused.add(key)
            if not heads:
                return
            _, key = heapq.heappop(heads)
            queue = buffered[key]
            record = queue.popleft()
            if queue:
                heapq.heappush(heads, (_merge_key(queue[0]), key))
            elif key in not_at_end:
                starving.add(key)
            if key in paused and len(queue) <= self._read_ahead // 2:
                consumer.resume([TopicPartition(*key)])
                paused.discard(key)
            yield record

    def _next_batch(self) -> list[typing.Any]:
        """The next messages and events, waiting for at least one; stops on cancel or a silent Kafka."""
        waiting_since = time.monotonic()
        while True:
            if self._cancelled.is_set():
                raise ExportCancelled("the export was cancelled")
            if self._fatal_error is not None:
                raise KafkaUnavailable(f"Kafka client failed: {kafka_client.describe(self._fatal_error)}")
            try:
                # Take what is queued without waiting; only an empty queue waits, briefly, so the
                # end of a topic is not delayed by a timeout and a cancel is seen quickly.
                batch = self._consumer.consume(self.BATCH, timeout=0) or self._consumer.consume(1, timeout=0.05)
            except KafkaException as exc:
                raise KafkaUnavailable(f"Kafka client failed: {kafka_client.describe(exc.args[0])}") from None
            if batch:
                return batch
            if time.monotonic() - waiting_since > self._timeout:
                reason = f" (last error: {kafka_client.describe(self._last_error)})" if self._last_error is not None else ""
                raise KafkaUnavailable(f"Kafka sent nothing for {self._timeout:g} s{reason}")

    def _on_error(self, error: KafkaError) -> None:
        # Called from inside consume(), on the export thread.
        self._last_error = error
        if error.fatal():
            self._fatal_error = error
        # librdkafka logs connection failures itself (proxy.kafka); only a fatal error is news.
        log.log(logging.ERROR if error.fatal() else logging.DEBUG, "export consumer: %s", kafka_client.describe(error))


def _record_of(message: typing.Any) -> Record:
    return Record(message.timestamp()[1], message.topic(), message.partition(), message.offset(), message.value())


def _merge_key(record: Record) -> tuple[int, str, int, int]:
    # Ties on the timestamp keep a stable, reproducible order.
    return (record.timestamp, record.topic, record.partition, record.offset)


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


def _iso_time(epoch_ms: int) -> str | None:
    if epoch_ms < 0:  # the record has no timestamp
        return None
    moment = _EPOCH + datetime.timedelta(milliseconds=epoch_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _ExportFile:
    """A temporary file in the data folder that becomes an export file only once it is complete."""

    def __init__(self, folder: DataFolder, label: str):
        self.folder = folder
        self.name = folder.new_export_name(label)
        self.temporary_path = folder.new_temporary_path()
        self.size = 0
        self._file: typing.TextIO | None = None

    def __enter__(self) -> typing.TextIO:
        os.makedirs(self.folder.path, exist_ok=True)
        self._file = open(self.temporary_path, "x", encoding="utf-8", newline="", buffering=1 << 16)
        return self._file

    def __exit__(self, exc_type: type[BaseException] | None, *_: typing.Any) -> None:
        assert self._file is not None
        if exc_type is not None:
            self._discard()
            return
        try:
            self._file.flush()
            # On disk before it gets its served name, so a crash never leaves a truncated export.
            os.fsync(self._file.fileno())
            self.size = os.fstat(self._file.fileno()).st_size
            self._file.close()
            os.replace(self.temporary_path, os.path.join(self.folder.path, self.name))
        except BaseException:
            self._discard()
            raise
        _fsync_directory(self.folder.path)

    def _discard(self) -> None:
        assert self._file is not None
        try:
            self._file.close()
        except OSError:
            pass  # e.g. the disk is full: the file goes anyway
        try:
            os.remove(self.temporary_path)
        except FileNotFoundError:
            pass


def _fsync_directory(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # not supported for directories on every file system
    finally:
        os.close(descriptor)


class _ChunkedText:
    """A text stream that hands its UTF-8 bytes on in chunks of about `size` bytes (streamed exports)."""

    def __init__(self, put: Callable[[bytes], None], size: int = 64 * 1024):
        self._put = put
        self._size = size
        self._parts: list[str] = []
        self._length = 0
        self.bytes = 0

    def write(self, text: str) -> int:
        self._parts.append(text)
        self._length += len(text)
        if self._length >= self._size:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if not self._parts:
            return
        data = "".join(self._parts).encode("utf-8")
        self._parts, self._length = [], 0
        self.bytes += len(data)
        self._put(data)

    def __enter__(self) -> _ChunkedText:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: typing.Any) -> None:
        # The last partial chunk goes out only after a complete export.
        if exc_type is None:
            self.flush()


@dataclasses.dataclass
class _ScanStats:
    """What a scan passed over: records that are not JSON objects."""

    skipped_records: int = 0


class _Tail(typing.NamedTuple):
    """Offsets [start, end) of a partition and how many visible rows lie between them."""

    start: int
    end: int
    rows: int


@dataclasses.dataclass(eq=False)  # kept in a set, by identity
class _RunningExport:
    request: ExportRequest
    cancelled: threading.Event
    future: asyncio.Future[typing.Any] | None = None


class ExportService:
    """Runs merchant exports: at most max_concurrent at a time, each on its own thread and consumer."""

    # Chunks of a streamed export waiting for the client: bounds memory when the client is slow.
    STREAM_QUEUE_CHUNKS = 4

    def __init__(self, kafka: Mapping[str, typing.Any], policy: VisibilityPolicy, data_folder: DataFolder, *,
                 max_concurrent: int = 2, kafka_timeout: float = 10.0, retry_after: int = 5,
                 read_ahead: int = READ_AHEAD_RECORDS):
        self._kafka = dict(kafka)
        self.policy = policy
        self.data_folder = data_folder
        self.max_concurrent = max_concurrent
        self._kafka_timeout = kafka_timeout
        self._retry_after = retry_after
        self._read_ahead = read_ahead
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="export")
        self._running: set[_RunningExport] = set()
        self._closing = False

    @classmethod
    def from_config(cls, config: Config, data_folder: DataFolder) -> ExportService:
        return cls(kafka_properties(config), VisibilityPolicy.from_config(config.export), data_folder,
                   max_concurrent=config.export.max_concurrent)

    @property
    def running(self) -> int:
        return len(self._running)

    async def export_to_file(self, topic: str | None, merchant_id: str, from_ms: int | None = None,
                             to_ms: int | None = None, limit: int | None = None,
                             cancelled: threading.Event | None = None) -> ExportResult:
        """Write the merchant's visible rows to a new file in the data folder; the result names it."""
        request = ExportRequest(topic, merchant_id, from_ms, to_ms, limit)
        return await self._run(request, cancelled or threading.Event(), self._export_to_file)

    async def export_to_stream(self, topic: str | None, merchant_id: str, send: Callable[[bytes], Awaitable[None]],
                               from_ms: int | None = None, to_ms: int | None = None, limit: int | None = None,
                               cancelled: threading.Event | None = None) -> ExportResult:
        """Send the merchant's visible rows as CSV chunks, as they are read, to `send` (the HTTP response).

        If send raises (the client went away), the export stops and ExportCancelled is raised.
        """
        request = ExportRequest(topic, merchant_id, from_ms, to_ms, limit)
        cancelled = cancelled or threading.Event()
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=self.STREAM_QUEUE_CHUNKS)

        def put(chunk: bytes) -> None:
            # On the export thread: wait for room in the queue, but not past a cancel.
            future = asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop)
            while True:
                try:
                    future.result(timeout=0.1)
                    return
                except concurrent.futures.TimeoutError:
                    if cancelled.is_set():
                        future.cancel()
                        raise ExportCancelled("the export was cancelled") from None

        async def forward(job: asyncio.Future[ExportResult]) -> None:
            while True:
                getter = asyncio.ensure_future(chunks.get())
                done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    chunk = getter.result()
                elif not chunks.empty():
                    getter.cancel()
                    chunk = chunks.get_nowait()
                else:
                    getter.cancel()
                    return  # the job ended and every chunk it made has been sent
                try:
                    await send(chunk)
                except Exception:
                    cancelled.set()
                    raise

        def export(request: ExportRequest, job_cancelled: threading.Event) -> ExportResult:
            return self._export_to_stream(request, job_cancelled, put)

        return await self._run(request, cancelled, export, forward)

    async def cancel_all(self) -> None:
        """Stop every running export and wait until each has removed its temporary file; refuse new ones."""
        self._closing = True
        running = list(self._running)
        for export in running:
            export.cancelled.set()
        await asyncio.gather(*(export.future for export in running if export.future is not None),
                             return_exceptions=True)
        self._executor.shutdown(wait=False)

    def record_rejected(self, topic: str | None, merchant_id: str | None, error: ExportError) -> None:
        """Count and log a request the HTTP layer refused before it reached the service (400, 401)."""
        request = ExportRequest(topic, merchant_id or "-")
        self._record(request, error.outcome, 0, 0, 0.0, error.message)

    async def _run(self, request: ExportRequest, cancelled: threading.Event,
                   export: Callable[[ExportRequest, threading.Event], ExportResult],
                   forward: Callable[[asyncio.Future[ExportResult]], Awaitable[None]] | None = None) -> ExportResult:
        started = time.monotonic()
        running: _RunningExport | None = None
        try:
            self._check(request)
            running = _RunningExport(request, cancelled)
            self._running.add(running)
            job = asyncio.get_running_loop().run_in_executor(self._executor, self._in_thread, export, request, cancelled)
            running.future = job
            if forward is not None:
                try:
                    await forward(job)
                except Exception:
                    # The client is gone: the job sees the cancel; wait for it to clean up.
                    await asyncio.gather(job, return_exceptions=True)
                    raise ExportCancelled("the client went away") from None
            result = await job
        except ExportError as exc:
            if isinstance(exc, ExportCancelled):
                exc.message = "the server is shutting down" if self._closing else "the client went away"
            self._record(request, exc.outcome, 0, 0, time.monotonic() - started, exc.message)
            raise
        except Exception:
            log.exception("export of %s for %s failed", request.label, request.merchant_id)
            self._record(request, ExportFailed.outcome, 0, 0, time.monotonic() - started, "internal error")
            raise ExportFailed("the export failed") from None
        finally:
            if running is not None:
                self._running.discard(running)
        self._record(request, "ok", result.rows, result.bytes, time.monotonic() - started, None,
                     result.skipped_records, result.dropped_keys)
        return result

    def _check(self, request: ExportRequest) -> None:
        """The refusals that need no Kafka: shutting down, bad bounds, impossible names, too many exports."""
        if self._closing:
            raise ExportCancelled("the server is shutting down")
        if request.from_ms is not None and request.to_ms is not None and request.from_ms > request.to_ms:
            raise BadRequest("'from' is after 'to'")
        if request.limit is not None and request.limit < 0:
            raise BadRequest("'limit' must be 0 or more")
        if request.topic is not None and not KAFKA_TOPIC_NAME.fullmatch(request.topic):
            raise UnknownTopic(f"no such topic: {request.topic}")
        if len(self._running) >= self.max_concurrent:
            raise TooManyExports(f"{self.max_concurrent} exports are running; try again later",
                                 retry_after=self._retry_after)

    def _in_thread(self, export: Callable[[ExportRequest, threading.Event], ExportResult],
                   request: ExportRequest, cancelled: threading.Event) -> ExportResult:
        try:
            return export(request, cancelled)
        except OSError as exc:
            raise ExportFailed(f"cannot write the export file: {exc.strerror or exc}") from exc

    def _export_to_file(self, request: ExportRequest, cancelled: threading.Event) -> ExportResult:
        export_file = _ExportFile(self.data_folder, request.label)
        written = self._write_csv(request, cancelled, lambda: export_file)
        # The new file may push the folder over its size cap.
        self.data_folder.sweep()
        return dataclasses.replace(written, filename=export_file.name, bytes=export_file.size)

    def _export_to_stream(self, request: ExportRequest, cancelled: threading.Event,
                          put: Callable[[bytes], None]) -> ExportResult:
        stream = _ChunkedText(put)
        written = self._write_csv(request, cancelled, lambda: stream)
        return dataclasses.replace(written, bytes=stream.bytes)

    def _write_csv(self, request: ExportRequest, cancelled: threading.Event,
                   open_output: Callable[[], typing.ContextManager[typing.Any]]) -> ExportResult:
        """The whole export, on the export thread: scan, filter, write. Errors come before any output."""
        stats = _ScanStats()
        with PartitionScanner(self._kafka, self._kafka_timeout, cancelled, self._read_ahead) as scanner:
            partitions = self._partitions_to_read(scanner, request.topic)
            starts: dict[TopicPartitionKey, int] = {}
            ends: dict[TopicPartitionKey, int] = {}
            extra_rows = 0
            if request.limit is None:
                starts = {key: OFFSET_BEGINNING for key in partitions}
            elif request.limit > 0:
                tails = {key: self._tail(scanner, key, request.limit, request) for key in partitions}
                starts = {key: tail.start for key, tail in tails.items() if tail.rows > 0}
                ends = {key: tail.end for key, tail in tails.items()}
                # The tails hold at least `limit` rows in all: skip the oldest of them while merging,
                # rather than keeping the last `limit` rows in memory.
                extra_rows = max(0, sum(tail.rows for tail in tails.values()) - request.limit)
            rows = itertools.islice(self._visible_rows(scanner.read_merged(starts, ends), request, stats),
                                    extra_rows, None)
            columns = ALL_TOPICS_COLUMNS if request.topic is None else self.policy.columns(request.topic)
            with open_output() as output:
                writer = CsvExportWriter(output, columns)
                for row in rows:
                    writer.write_row(row)
                writer.finish()
        return ExportResult(None, writer.rows_written, 0, stats.skipped_records, writer.dropped_key_count)

    def _partitions_to_read(self, scanner: PartitionScanner, topic: str | None) -> list[TopicPartitionKey]:
        existing = scanner.partitions()
        if topic is None:
            return [(name, partition) for name in self.policy.exportable_topics()
                    for partition in existing.get(name, [])]
        if not self.policy.is_exportable(topic):
            if topic in existing:
                raise NotExportable(f"topic {topic} is not exportable")
            raise UnknownTopic(f"no such topic: {topic}")
        # An exportable topic nobody has written yet exports as an empty (header-only) file.
        return [(topic, partition) for partition in existing.get(topic, [])]

    def _tail(self, scanner: PartitionScanner, key: TopicPartitionKey, limit: int, request: ExportRequest) -> _Tail:
        """The end of a partition that holds its last `limit` visible rows (or all it has).

        Reads backwards from the high watermark in growing windows, counting visible rows. A high
        watermark that is too low (Tansu) only makes the first window start earlier: it reads more,
        never less. The end is where that first read met the partition's end.
        """
        topic, partition = key
        low, high = scanner.watermarks(topic, partition)
        window = limit
        start, stop = max(low, high - window), None
        end, rows = start, 0
        while True:
            for record in scanner.read_range(topic, partition, start, stop):
                end = max(end, record.offset + 1)
                rows += sum(1 for _ in self._visible_rows((record,), request, _ScanStats()))
            if rows >= limit or start <= low:
                return _Tail(start, end, rows)
            window *= 2
            start, stop = max(low, start - window), start

    def _visible_rows(self, records: Iterable[Record], request: ExportRequest,
                      stats: _ScanStats) -> Iterator[dict[str, typing.Any]]:
        """The CSV rows the merchant may see among the records in the request's time range."""
        policy, merchant_id = self.policy, request.merchant_id
        from_ms, to_ms = request.from_ms, request.to_ms
        for record in records:
            # Kafka's record timestamp, not the message's own field: filtered while scanning because
            # offsets_for_times is not reliable on every broker.
            if (from_ms is not None and record.timestamp < from_ms) or (to_ms is not None and record.timestamp > to_ms):
                continue
            message = _decode(record.value)
            if message is None:
                stats.skipped_records += 1
                continue
            if request.topic is not None:
                yield from policy.visible_rows(record.topic, message, merchant_id)
                continue
            visible = policy.visible_message(record.topic, message, merchant_id)
            if visible is not None:
                yield {"topic": record.topic, "partition": record.partition, "offset": record.offset,
                       "timestamp": _iso_time(record.timestamp), "value": visible}

    def _record(self, request: ExportRequest, outcome: str, rows: int, size: int, duration: float,
                error: str | None, skipped_records: int = 0, dropped_keys: int = 0) -> None:
        """Metrics and the one log line of an export (the merchant id, never the token)."""
        label = request.label if request.topic is None or self.policy.is_exportable(request.topic) else OTHER_TOPIC_LABEL
        EXPORT_REQUESTS.labels(topic=label, outcome=outcome).inc()
        EXPORT_DURATION.labels(topic=label).observe(duration)
        if rows:
            ROWS_EXPORTED.labels(topic=label).inc(rows)
        fields = {"merchant_id": request.merchant_id, "topic": request.label, "rows": rows, "bytes": size,
                  "duration": round(duration, 3), "outcome": outcome, "from": request.from_ms,
                  "to": request.to_ms, "limit": request.limit, "skipped_records": skipped_records or None,
                  "dropped_keys": dropped_keys or None, "error": error}
        line = " ".join(f"{name}={_log_value(value)}" for name, value in fields.items() if value is not None)
        log.log(logging.INFO if outcome in ("ok", "cancelled") else logging.WARNING, "export %s", line,
                extra={"export": fields})


def _log_value(value: typing.Any) -> str:
    # Quoted and escaped unless plainly safe: a topic name from the URL must not forge log lines.
    text = str(value)
    return text if _PLAIN_LOG_VALUE.fullmatch(text) else json.dumps(text, ensure_ascii=True)
