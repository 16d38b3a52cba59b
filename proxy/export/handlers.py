"""HTTP handlers of the merchant CSV export: query parsing, starting an export, serving the finished files."""

from __future__ import annotations

import datetime
import os
import re
import threading
import typing

import tornado.web

from proxy.export.data_folder import is_export_file_name
from proxy.export.errors import BadRequest, ExportError, MissingToken
from proxy.export.service import ExportService
from proxy.http_api import ApiError, JsonHandler, JsonStaticFileHandler
from proxy.policy import merchant_id_for, token_from_authorization

CSV_CONTENT_TYPE = "text/csv; charset=utf-8"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


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


def wants_csv(accept: str | None) -> bool:
    """Whether an Accept header asks for text/csv explicitly (*/* does not)."""
    for media_range in (accept or "").split(","):
        media_type, _, params = media_range.partition(";")
        quality = re.search(r"(?:^|;)\s*q\s*=\s*([0-9.]+)", params)
        if media_type.strip().lower() == "text/csv" and not (quality and _is_zero(quality.group(1))):
            return True
    return False


def _is_zero(number: str) -> bool:
    try:
        return float(number) == 0
    except ValueError:
        return False


def api_error(error: ExportError) -> ApiError:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Token"
    return ApiError(error.status, error.message, headers)


class ExportHandler(JsonHandler):
    """GET /export/data[/<topic>]: the rows a merchant may see, as a file URL or streamed as CSV."""

    service: ExportService

    def initialize(self, service: ExportService, cors_origins: typing.Sequence[str] = ("*",)) -> None:
        super().initialize(cors_origins=cors_origins, service=service)
        # Set when the client goes away, and by the service on shutdown: either stops the export.
        self._cancelled = threading.Event()
        self._client_gone = False
        self._streaming = False

    def on_connection_close(self) -> None:
        # The export stops and removes its temporary file instead of finishing for nobody.
        self._client_gone = True
        self._cancelled.set()

    async def get(self, topic: str | None = None) -> None:
        topic = topic or None
        try:
            token = token_from_authorization(self.request.headers.get("Authorization"))
            if token is None:
                raise MissingToken("a token is required: send 'Authorization: Token <token>'")
            merchant_id = merchant_id_for(token)
            bounds = {"from_ms": parse_time("from", self.get_argument("from", None)),
                      "to_ms": parse_time("to", self.get_argument("to", None)),
                      "limit": parse_limit(self.get_argument("limit", None))}
        except ExportError as exc:
            self.service.record_rejected(topic, None, exc)
            raise api_error(exc) from None
        try:
            if wants_csv(self.request.headers.get("Accept")):
                await self.service.export_to_stream(topic, merchant_id, self._send_csv, cancelled=self._cancelled,
                                                    **bounds)
                return
            result = await self.service.export_to_file(topic, merchant_id, cancelled=self._cancelled, **bounds)
        except ExportError as exc:
            if self._client_gone:
                return  # nobody to answer
            if self._streaming:
                # The status line is long gone: cut the connection, so the client sees an
                # incomplete transfer instead of a CSV that merely looks complete.
                self.request.connection.close()
                return
            raise api_error(exc) from None
        # The answer is the merchant's own: no shared cache may keep it.
        self.set_header("Cache-Control", "no-store")
        self.write_json({"url": f"data/{result.filename}"})

    async def _send_csv(self, chunk: bytes) -> None:
        if not self._streaming:
            self._streaming = True
            label = self.path_args[0] if self.path_args and self.path_args[0] else "all"
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self.set_header("Content-Type", CSV_CONTENT_TYPE)
            self.set_header("Content-Disposition", f'attachment; filename="{label}-{now}.csv"')
            self.set_header("X-Content-Type-Options", "nosniff")
            self.set_header("Cache-Control", "no-store")
        self.write(chunk)
        await self.flush()


class DataFileHandler(JsonStaticFileHandler):
    """GET /data/<file>.csv: a finished export file (no token: the name is the secret)."""

    def parse_url_path(self, url_path: str) -> str:
        # Only export file names are served: no directories, no "..", no temporary or hidden
        # files, whatever the encoding. A 404 says nothing about what exists.
        if not is_export_file_name(url_path):
            raise ApiError(404, "no such file")
        return url_path

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        try:
            return super().validate_absolute_path(root, absolute_path)
        except tornado.web.HTTPError as exc:
            if exc.status_code in (403, 404):
                raise ApiError(404, "no such file (exports are deleted after a while)") from None
            raise

    @classmethod
    def get_content_version(cls, abspath: str) -> str:
        # Export files never change after their rename, so size and mtime identify them; the
        # default hashes the whole file on the IOLoop (and gives up beyond 64 MiB).
        stat = os.stat(abspath)
        return f"{stat.st_size:x}-{stat.st_mtime_ns:x}"

    def get_content_type(self) -> str:
        return CSV_CONTENT_TYPE

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Content-Disposition", f'attachment; filename="{path}"')
        self.set_header("X-Content-Type-Options", "nosniff")
