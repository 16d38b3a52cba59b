"""HTTP handlers for topics, status and health, and the JSON/CORS base every handler shares."""

from __future__ import annotations

import functools
import http
import importlib.resources
import logging
import typing

import prometheus_client
import tornado.web
import ujson

from proxy import metrics
from proxy.policy import token_from_authorization

if typing.TYPE_CHECKING:
    from proxy.live.access import LiveAccess
    from proxy.live.fanout import LiveHub
    from proxy.live.ingest import KafkaIngest

log = logging.getLogger(__name__)


def _json(value: typing.Any) -> str:
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


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
    instance: str
    access: LiveAccess

    def prepare(self) -> None:
        # It shows recent records: in token mode only the management UI's admin tokens see it.
        if self.access.requires_token and not self.access.is_admin(
                token_from_authorization(self.request.headers.get("Authorization"))):
            raise ApiError(401, "an admin token is required: send 'Authorization: Token <admin token>'",
                           {"WWW-Authenticate": "Token"})

    def get(self) -> None:
        consumed = self.ingest.stats.consumed_by_topic()
        skipped = self.ingest.stats.skipped_by_topic()
        parts = []
        for topic in self.hub.topics:
            history = self.hub.history[topic]
            summary = _json({"buffered": len(history), "consumed": consumed.get(topic, 0),
                             "skipped": skipped.get(topic, {})})
            # The newest envelope goes in as the clients got it (proxy.records vetted it): decoding
            # it again could only fail (a value nested 1024 levels is one too deep in its envelope).
            parts.append('%s:{"last_message":%s,%s' % (_json(topic), history.last() or "null", summary[1:]))
        rest = _json({"instance": self.instance, "sessions": self.hub.session_count()})
        self.set_header("Content-Type", "application/json")
        self.finish('{"topics":{%s},%s' % (",".join(parts), rest[1:]))


class HealthHandler(JsonHandler):
    """GET /health: 200 once the consumer is connected and history is loaded, else 503."""

    ingest: KafkaIngest
    # Behind a load balancer, which of the instances answered.
    instance: str
    # "open" or "token": the live page asks for a token when it is "token".
    live_access: str
    # Its 503 is the answer (starting, Kafka unreachable), not a failed request: a load balancer
    # probing every second must not fill the log with errors (ingest's own lines say why).
    server_error_log_level = logging.WARNING

    def get(self) -> None:
        state, reason = self.ingest.health.state()
        body: dict[str, typing.Any] = {"status": state, "instance": self.instance,
                                       "live_access": self.live_access}
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


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI document shipped in the package (proxy/openapi.yaml)."""
    return importlib.resources.files("proxy").joinpath("openapi.yaml").read_bytes()


class OpenApiHandler(JsonHandler):
    """GET /openapi.yaml: the OpenAPI 3.1 description of every HTTP route."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml; charset=utf-8")
        self.finish(openapi_document())
