"""HTTP handlers for topics, status and health, and the JSON/CORS base every handler shares."""

from __future__ import annotations

import http
import logging
import typing

import prometheus_client
import tornado.web
import ujson

from proxy import metrics

if typing.TYPE_CHECKING:
    from proxy.live.fanout import LiveHub
    from proxy.live.ingest import KafkaIngest

log = logging.getLogger(__name__)


class ApiError(tornado.web.HTTPError):
    """An HTTP error whose message is safe to show the client as {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, reason=http.HTTPStatus(status).phrase)
        self.message = message
        self.headers = headers or {}


class JsonHandler(tornado.web.RequestHandler):
    """Base handler: JSON bodies, JSON errors, CORS headers and OPTIONS preflight."""

    def initialize(self, cors_origins: typing.Sequence[str] = ("*",), **kwargs: typing.Any) -> None:
        self.cors_origins = cors_origins
        for name, value in kwargs.items():
            setattr(self, name, value)
        # Tornado sets the default headers before initialize(): again, now that the origins are known.
        self.clear()

    def set_default_headers(self) -> None:
        origins = getattr(self, "cors_origins", ("*",))
        origin = self.request.headers.get("Origin")
        if "*" in origins:
            self.set_header("Access-Control-Allow-Origin", "*")
        else:
            self.set_header("Vary", "Origin")
            if origin and origin in origins:
                self.set_header("Access-Control-Allow-Origin", origin)
        self.set_header("Access-Control-Expose-Headers", "Retry-After, Content-Disposition, ETag")

    def options(self, *args: typing.Any) -> None:
        """CORS preflight: allow the methods this route serves and the Authorization header."""
        self.set_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept, Range")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def write_json(self, body: typing.Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False))

    def write_error(self, status_code: int, **kwargs: typing.Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        else:
            message = http.HTTPStatus(status_code).phrase
        self.set_header("Content-Type", "application/json")
        self.finish(ujson.dumps({"error": message}, ensure_ascii=False, escape_forward_slashes=False))


class NotFoundHandler(JsonHandler):
    """Every URL no route matches: a JSON 404."""

    def prepare(self) -> None:
        raise ApiError(404, f"no such resource: {self.request.path}")


class TopicsHandler(JsonHandler):
    """GET /topics: the live topics, in configuration order."""

    hub: LiveHub

    def get(self) -> None:
        self.write_json(self.hub.topics)


class StatusHandler(JsonHandler):
    """GET /status: per topic, buffered messages, the last one and how many were consumed."""

    hub: LiveHub
    ingest: KafkaIngest

    def get(self) -> None:
        consumed = self.ingest.stats.consumed_by_topic()
        skipped = self.ingest.stats.skipped_by_topic()
        topics = {}
        for topic in self.hub.topics:
            history = self.hub.history[topic]
            last = history.last()
            topics[topic] = {
                "buffered": len(history),
                "last_message": ujson.loads(last) if last is not None else None,
                "consumed": consumed.get(topic, 0),
                "skipped": skipped.get(topic, {}),
            }
        self.write_json({"topics": topics, "sessions": self.hub.session_count()})


class HealthHandler(JsonHandler):
    """GET /health: 200 once the consumer is connected and history is loaded, else 503."""

    ingest: KafkaIngest

    def get(self) -> None:
        state, reason = self.ingest.health.state()
        body: dict[str, typing.Any] = {"status": state}
        if reason:
            body["reason"] = reason
        if self.get_argument("verbose", "0") not in ("0", "", "false"):
            body["lag"] = self.ingest.lag()
        self.write_json(body, 200 if state == "ok" else 503)


class MetricsHandler(JsonHandler):
    """GET /metrics: Prometheus text exposition of the proxy's metrics."""

    def get(self) -> None:
        self.set_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        self.finish(prometheus_client.generate_latest(metrics.REGISTRY))


class JsonStaticFileHandler(tornado.web.StaticFileHandler):
    """Static files with the API's CORS headers, preflight and JSON errors."""

    set_default_headers = JsonHandler.set_default_headers
    options = JsonHandler.options
    write_error = JsonHandler.write_error

    def initialize(self, path: str, default_filename: str | None = None,  # type: ignore[override]
                   cors_origins: typing.Sequence[str] = ("*",)) -> None:
        super().initialize(path=path, default_filename=default_filename)
        self.cors_origins = cors_origins
        # Tornado sets the default headers before initialize(): again, now that the origins are known.
        self.clear()
