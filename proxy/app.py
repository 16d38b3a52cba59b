"""The proxy server: wires Kafka ingest, the live hub and the HTTP routes into one IOLoop."""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import re
import signal
import typing

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

from proxy import http_api, metrics
from proxy.config import TRANSPORTS, Config, kafka_settings
from proxy.export import handlers as export_handlers
from proxy.export.data_folder import DataFolder
from proxy.export.service import ExportService
from proxy.live.decode import RecordDecoder
from proxy.live.fanout import SHUTDOWN_CLOSE, LiveHub
from proxy.live.ingest import KafkaIngest
from proxy.policy import VisibilityPolicy, merchant_id_for, token_from_authorization
from proxy.systemd import SystemdNotifier

log = logging.getLogger(__name__)
access_log = logging.getLogger("proxy.access")
SECRET_IN_PATH = re.compile(r"[0-9a-f]{32}")
# Shutdown waits this long for exports to stop; one stuck in a Kafka call has no file to remove yet.
EXPORT_CANCEL_TIMEOUT = 3.0



def static_dir() -> str:
    """The folder of the live page and its vendored scripts: the repository's static/, installed
    as the package proxy.static (setup.py maps it), so a wheel serves it from site-packages."""
    return str(importlib.resources.files("proxy.static"))


class ProxyServer:
    """One running proxy: start() it inside an IOLoop, stop() it on a signal."""

    def __init__(self, config: Config):
        self.config = config
        # Built once, here: every component gets only what it needs.
        self.kafka = kafka_settings(config)  # a ${VAR} that is not set raises ConfigError
        self.policy = VisibilityPolicy(config.export.topics)
        self.hub = LiveHub(config.topics, config.history_size)
        self.ingest: KafkaIngest | None = None
        self.http_server: tornado.httpserver.HTTPServer | None = None
        self.port: int | None = None
        self.systemd = SystemdNotifier()
        self.data_folder = DataFolder(config.data_dir, config.export.retention, config.export.max_bytes)
        self.exports = ExportService(self.kafka.properties, self.policy, self.data_folder,
                                     max_concurrent=config.export.max_concurrent)

    def make_app(self) -> tornado.web.Application:
        """Every URL the service has, in one list."""
        config = self.config
        router = self.hub.router(config.live.prefix, {
            "disabled_transports": [t for t in TRANSPORTS if t not in config.live.transports],
            "heartbeat_delay": config.live.heartbeat_interval,
            "max_session_queue_bytes": config.live.max_session_queue_bytes,
            "websocket_allow_origin": "*" if "*" in config.cors_origins else config.cors_origins,
            "sockjs_url": "/static/vendor/sockjs.min.js",
            # The proxy coalesces messages itself (LiveSession); no per-message flush.
            "immediate_flush": False,
        })
        # The raw (non-SockJS) websocket endpoint would bypass the bounded, coalescing queue.
        sockjs_routes = [route for route in router.urls if not route[0].endswith("/websocket")]
        common = {"cors_origins": config.cors_origins}
        static = static_dir()
        routes: list[typing.Any] = [
            (r"/topics/?", http_api.TopicsHandler, dict(common, hub=self.hub)),
            (r"/status/?", http_api.StatusHandler, dict(common, hub=self.hub, ingest=self.ingest)),
            (r"/health/?", http_api.HealthHandler, dict(common, ingest=self.ingest)),
            (r"/metrics/?", http_api.MetricsHandler, common),
            (r"/+export/+data/*", export_handlers.ExportHandler, dict(common, service=self.exports)),
            (r"/+export/+data/+([^/]+)/*", export_handlers.ExportHandler, dict(common, service=self.exports)),
            (r"/+data/+(.*)", export_handlers.DataFileHandler, dict(common, path=config.data_dir)),
            *sockjs_routes,
            (r"/static/(.*)", http_api.JsonStaticFileHandler, dict(common, path=static)),
            (r"/()", http_api.JsonStaticFileHandler, dict(common, path=static, default_filename="index.html")),
        ]
        return tornado.web.Application(
            routes,
            default_handler_class=http_api.NotFoundHandler,
            default_handler_args=common,
            log_function=self._log_request,
        )

    async def start(self) -> None:
        """Start the consumer thread and listen; returns once the port is open."""
        config = self.config
        loop = tornado.ioloop.IOLoop.current()
        decoder = RecordDecoder(config.topics, config.live.drop_failed_requests,
                                {topic: self.policy.hidden_fields(topic) for topic in config.topics})
        self.ingest = KafkaIngest(self.kafka, config.topics, config.history_size, config.topic_refresh_interval,
                                  decoder, self._history_loaded, self.hub.publish, loop.add_callback,
                                  wants_every_message=lambda: self.hub.session_count() > 0)
        # Bad Kafka settings fail here, before anything else is touched. The history cannot reach
        # the IOLoop before the port is open: nothing below awaits.
        self.ingest.start()
        self.data_folder.start(self.config.export.sweep_interval)
        app = self.make_app()
        self.http_server = tornado.httpserver.HTTPServer(app, xheaders=self.config.listen.trust_forwarded_headers)
        sockets = tornado.netutil.bind_sockets(self.config.listen.port, self.config.listen.address)
        self.http_server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.systemd.start_watchdog(self.ingest.is_alive)
        log.info("listening on http://%s:%d (SockJS at %s)", self.config.listen.address, self.port,
                 self.config.live.prefix)

    def _history_loaded(self, histories: dict[str, list[str]]) -> None:
        self.hub.load_history(histories)
        self.systemd.ready()

    async def stop(self) -> None:
        """Stop accepting, say goodbye to clients, stop the consumer."""
        self.systemd.stopping()
        self.systemd.stop_watchdog()
        if self.http_server is not None:
            self.http_server.stop()
        self.hub.close_all(*SHUTDOWN_CLOSE)
        try:
            await asyncio.wait_for(self.exports.cancel_all(), EXPORT_CANCEL_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("exports still running after %.0fs; stopping anyway", EXPORT_CANCEL_TIMEOUT)
        self.data_folder.stop()
        # IOStream writes go to the kernel at once when they can; one short pause lets the
        # rest of the close frames out before the sockets are torn down.
        await asyncio.sleep(0.1)
        if self.ingest is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.ingest.stop)
        if self.http_server is not None:
            await self.http_server.close_all_connections()
        self.systemd.close()

    async def run_until_signalled(self) -> None:
        """start(), then stop() on SIGTERM or SIGINT."""
        await self.start()
        await self.wait_for_signal()

    async def wait_for_signal(self) -> None:
        """Wait for SIGTERM or SIGINT, then stop()."""
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await stop_requested.wait()
        log.info("shutting down")
        await self.stop()

    @staticmethod
    def _log_request(handler: tornado.web.RequestHandler) -> None:
        """One structured line per request; names the merchant by id, never by token."""
        status = handler.get_status()
        request = handler.request
        route = type(handler).__name__
        metrics.HTTP_REQUESTS.labels(route, str(status)).inc()
        # An export file's name is the only key to it: never write it to the log.
        path = SECRET_IN_PATH.sub("<secret>", request.path) if route == "DataFileHandler" else request.path
        fields = {
            "method": request.method, "path": path, "status": status,
            "duration_ms": round(1000.0 * request.request_time(), 1), "remote": request.remote_ip,
            "route": route,
        }
        token = token_from_authorization(request.headers.get("Authorization"))
        if token:
            fields["merchant_id"] = merchant_id_for(token)
        level = logging.INFO if status < 500 else logging.ERROR
        access_log.log(level, "http %s", " ".join(f"{k}={v}" for k, v in fields.items()))
