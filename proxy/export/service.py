"""Merchant CSV exports: admission, the export threads, and streaming to the HTTP response.

Kafka scan (proxy.export.scan) → visible rows (proxy.export.rows, asking proxy.policy) → CSV
writer (proxy.export.csv_writer) → data folder (proxy.export.data_folder) or the HTTP response.
Everything that blocks (the Kafka client, the disk) runs on a thread of the export executor,
so the IOLoop and the live stream never wait for an export.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import json
import logging
import re
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping

from proxy.config import TOPIC_NAME
from proxy.export.csv_writer import CsvExportWriter
from proxy.export.data_folder import DataFolder
from proxy.export.errors import (
    BadRequest,
    ExportCancelled,
    ExportError,
    ExportFailed,
    ExportKafkaUnavailable,
    InsufficientStorage,
    TooManyExports,
    UnknownTopic,
)
from proxy.export.rows import ExportRequest, ExportRows
from proxy.export.scan import READ_AHEAD_BYTES, PartitionScanner, ScanCancelled
from proxy.kafka import KafkaUnavailable
from proxy.metrics import EXPORT_DURATION, EXPORT_RECORDS_SKIPPED, EXPORT_REQUESTS, ROWS_EXPORTED
from proxy.policy import VisibilityPolicy
from proxy.records import DEFAULT_MAX_RECORD_BYTES

log = logging.getLogger("proxy.export")

# Metrics label of topics that are not exportable (a label per requested name would let any
# client grow the metrics without bound).
OTHER_TOPIC_LABEL = "other"
_PLAIN_LOG_VALUE = re.compile(r"[A-Za-z0-9._:+/=@-]+")
# A full file system (or a file beyond what it or the process may write): the server has no room.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """A finished export: its file name (None when streamed), rows and bytes written."""

    filename: str | None
    rows: int
    bytes: int
    # Records skipped, by reason (proxy.records.REASONS); cells dropped for lack of an inferred column.
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    dropped_keys: int = 0

    @property
    def skipped_records(self) -> int:
        return sum(self.skipped.values())



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
                 read_ahead_bytes: int = READ_AHEAD_BYTES, secrets: Iterable[str] = (),
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
        """kafka: librdkafka properties; secrets: the values that came from ${VAR}s in them (never logged)."""
        self._kafka = dict(kafka)
        self._secrets = frozenset(secrets)
        self._max_record_bytes = max_record_bytes
        self.policy = policy
        self.data_folder = data_folder
        self.max_concurrent = max_concurrent
        self._kafka_timeout = kafka_timeout
        self._retry_after = retry_after
        self._read_ahead_bytes = read_ahead_bytes
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="export")
        self._running: set[_RunningExport] = set()
        self._closing = False

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
                     result.skipped, result.dropped_keys)
        return result

    def _check(self, request: ExportRequest) -> None:
        """The refusals that need no Kafka: shutting down, bad bounds, impossible names, too many exports."""
        if self._closing:
            raise ExportCancelled("the server is shutting down")
        if request.from_ms is not None and request.to_ms is not None and request.from_ms > request.to_ms:
            raise BadRequest("'from' is after 'to'")
        if request.limit is not None and request.limit < 0:
            raise BadRequest("'limit' must be 0 or more")
        if request.topic is not None and not TOPIC_NAME.fullmatch(request.topic):
            raise UnknownTopic(f"no such topic: {request.topic}")
        if len(self._running) >= self.max_concurrent:
            raise TooManyExports(f"{self.max_concurrent} exports are running; try again later",
                                 retry_after=self._retry_after)

    def _in_thread(self, export: Callable[[ExportRequest, threading.Event], ExportResult],
                   request: ExportRequest, cancelled: threading.Event) -> ExportResult:
        try:
            return export(request, cancelled)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise InsufficientStorage(f"no room for the export file: {exc.strerror}; try again later "
                                          "or ask for less (from, to, limit)") from exc
            raise ExportFailed(f"cannot write the export file: {exc.strerror or exc}") from exc

    def _export_to_file(self, request: ExportRequest, cancelled: threading.Event) -> ExportResult:
        export_file = self.data_folder.new_export_file(request.label)
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
        try:
            with PartitionScanner(self._kafka, self._kafka_timeout, cancelled, self._read_ahead_bytes,
                                  self._secrets) as scanner:
                rows = ExportRows(self.policy, request, scanner, self._max_record_bytes)
                with open_output() as output:
                    writer = CsvExportWriter(output, rows.columns)
                    for batch in rows.batches():
                        writer.write_rows(batch)
                    writer.finish()
        # The scan's errors, as export errors (HTTP status, metrics outcome).
        except ScanCancelled as exc:
            raise ExportCancelled(str(exc)) from None
        except KafkaUnavailable as exc:
            raise ExportKafkaUnavailable(str(exc)) from None
        skipped = dict(rows.skipped)
        if writer.rows_skipped:
            skipped["cannot_render"] = skipped.get("cannot_render", 0) + writer.rows_skipped
        return ExportResult(None, writer.rows_written, 0, skipped, writer.dropped_key_count)

    def _record(self, request: ExportRequest, outcome: str, rows: int, size: int, duration: float,
                error: str | None, skipped: Mapping[str, int] | None = None, dropped_keys: int = 0) -> None:
        """Metrics and the one log line of an export (the merchant id, never the token)."""
        label = request.label if request.topic is None or self.policy.is_exportable(request.topic) else OTHER_TOPIC_LABEL
        EXPORT_REQUESTS.labels(topic=label, outcome=outcome).inc()
        EXPORT_DURATION.labels(topic=label).observe(duration)
        if rows:
            ROWS_EXPORTED.labels(topic=label).inc(rows)
        for reason, count in (skipped or {}).items():
            EXPORT_RECORDS_SKIPPED.labels(topic=label, reason=reason).inc(count)
        skipped = skipped or {}
        fields = {"merchant_id": request.merchant_id, "topic": request.label, "rows": rows, "bytes": size,
                  "duration": round(duration, 3), "outcome": outcome, "from": request.from_ms,
                  "to": request.to_ms, "limit": request.limit, "skipped_records": sum(skipped.values()) or None,
                  "skipped": ",".join(f"{reason}:{count}" for reason, count in sorted(skipped.items())) or None,
                  "dropped_keys": dropped_keys or None, "error": error}
        line = " ".join(f"{name}={_log_value(value)}" for name, value in fields.items() if value is not None)
        log.log(logging.INFO if outcome in ("ok", "cancelled") else logging.WARNING, "export %s", line,
                extra={"export": fields})


def _log_value(value: typing.Any) -> str:
    # Quoted and escaped unless plainly safe: a topic name from the URL must not forge log lines.
    text = str(value)
    return text if _PLAIN_LOG_VALUE.fullmatch(text) else json.dumps(text, ensure_ascii=True)
