"""The proxy server: wires Kafka ingest, the live hub and the HTTP routes into one IOLoop."""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import json
import logging
import re
import signal
import socket
import typing
import urllib.parse

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

from proxy import http_api, httpdate, metrics
from proxy.config import TRANSPORTS, Config, admin_tokens, kafka_settings
from proxy.export import handlers as export_handlers
from proxy.export.data_folder import DataFolder
from proxy.export.service import ExportService
from proxy.listener import ProxyHTTPServer, connection_cap
from proxy.live.decode import RecordDecoder
from proxy.live.access import LiveAccess
from proxy.live.fanout import SHUTDOWN_CLOSE, FanoutLimits, LiveHub
from proxy.live.ingest import KafkaIngest
from proxy.live.merchant_view import MerchantViews
from proxy.live.transports import LiveWebSocketTransport
from proxy.live.upgrade import FastUpgrade
from proxy.policy import VisibilityPolicy, merchant_id_for, token_from_authorization
from proxy.systemd import SystemdNotifier

log = logging.getLogger(__name__)
access_log = logging.getLogger("proxy.access")
# The random part of an export file name (any case: the log must not give it away either way).
SECRET_IN_PATH = re.compile(r"[0-9a-fA-F]{32}")
# A path the access log shows as it is; anything else is quoted, so no path can forge a log line.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/<>%-]*")
# Shutdown waits this long for exports to stop; one stuck in a Kafka call has no file to remove yet.
EXPORT_CANCEL_TIMEOUT = 3.0



def loggable_path(path: str) -> str:
    """A request path for the access log, with the secret of any export file name in it redacted.

    An export file's name is the only key to it. Clients may percent-encode any character of it
    (or encode it twice), so the secret is looked for after decoding, on every route.
    """
    for _ in range(3):
        decoded = urllib.parse.unquote(path, errors="replace")
        if decoded == path:
            break
        path = decoded
    path = SECRET_IN_PATH.sub("<secret>", path)
    return path if _PLAIN_PATH.fullmatch(path) else json.dumps(path, ensure_ascii=True)


def static_dir() -> str:
    """The folder of the live page and its vendored scripts: the repository's static/, installed
    as the package proxy.static (setup.py maps it), so a wheel serves it from site-packages."""
    return str(importlib.resources.files("proxy.static"))


class ProxyServer:
    """One running proxy: start() it inside an IOLoop, stop() it on a signal."""

    def __init__(self, config: Config):
        self.config = config
        httpdate.install()
        # Built once, here: every component gets only what it needs.
        self.kafka = kafka_settings(config)  # a ${VAR} that is not set raises ConfigError
        self.policy = VisibilityPolicy(config.export.topics)
        live = config.live
        self.access = LiveAccess(live.access, admin_tokens(config), live.auth_timeout)
        # Merchants' views of the live stream, only when tokens say who is watching.
        self.views = MerchantViews(self.policy, config.topics, config.history_size) if self.access.requires_token else None
        self.hub = LiveHub(config.topics, config.history_size, FanoutLimits(
            live.max_session_queue_bytes, live.max_queued_bytes, live.slow_client_timeout, live.flush_interval),
            self.access, self.views)
        self.ingest: KafkaIngest | None = None
        self.http_server: tornado.httpserver.HTTPServer | None = None
        self.port: int | None = None
        self.instance_id: str | None = None
        self.systemd = SystemdNotifier()
        self.data_folder = DataFolder(config.data_dir, config.export.retention, config.export.max_bytes)
        self.exports = ExportService(self.kafka.properties, self.policy, self.data_folder,
                                     max_concurrent=config.export.max_concurrent, secrets=self.kafka.secrets,
                                     max_record_bytes=config.max_record_bytes)

    def make_app(self) -> tornado.web.Application:
        """Every URL the service has, in one list."""
        config = self.config
        router = self.hub.router(config.live.prefix, {
            "disabled_transports": [t for t in TRANSPORTS if t not in config.live.transports],
            "heartbeat_delay": config.live.heartbeat_interval,
            "response_limit": config.live.streaming_response_limit,
            "max_message_bytes": config.live.max_message_bytes,
            "websocket_allow_origin": "*" if "*" in config.cors_origins else config.cors_origins,
            "sockjs_url": "/static/vendor/sockjs.min.js",
            # The proxy coalesces messages itself (LiveSession); no per-message flush.
            "immediate_flush": False,
        })
        # The raw (non-SockJS) websocket endpoint would bypass the bounded, coalescing queue.
        # sockjs-tornado routes jsonp_send even with jsonp off: not routed then.
        unused = ("/websocket",) + (() if "jsonp" in config.live.transports else ("/jsonp_send$",))
        sockjs_routes = [route for route in router.urls if not route[0].endswith(unused)]
        common = {"cors_origins": config.cors_origins}
        static = static_dir()
        routes: list[typing.Any] = [
            (r"/topics/?", http_api.TopicsHandler, dict(common, hub=self.hub)),
            (r"/status/?", http_api.StatusHandler, dict(common, hub=self.hub, ingest=self.ingest,
                                                         instance=self.instance_id, access=self.access)),
            (r"/health/?", http_api.HealthHandler, dict(common, ingest=self.ingest, instance=self.instance_id,
                                                         live_access=self.access.mode)),
            (r"/metrics/?", http_api.MetricsHandler, common),
            (r"/openapi\.yaml", http_api.OpenApiHandler, common),
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
            # Tornado closes a websocket whose message exceeds this (code 1009).
            websocket_max_message_size=config.live.max_message_bytes,
        )

    async def start(self) -> None:
        """Start the consumer thread and listen; returns once the port is open."""
        config = self.config
        loop = tornado.ioloop.IOLoop.current()
        decoder = RecordDecoder(config.topics, config.live.drop_failed_requests,
                                {topic: self.policy.hidden_fields(topic) for topic in config.topics},
                                config.max_record_bytes)
        # Merchants' histories are cut from a deeper buffer: load as much at start.
        history_depth = self.views.depth if self.views is not None else config.history_size
        self.ingest = KafkaIngest(self.kafka, config.topics, history_depth, config.topic_refresh_interval,
                                  decoder, self._history_loaded, self.hub.publish, loop.add_callback,
                                  wants_every_message=lambda: self.hub.session_count() > 0,
                                  congested=self.hub.congested, max_backpressure=config.live.slow_client_timeout)
        # Bad Kafka settings fail here, before anything else is touched. The history cannot reach
        # the IOLoop before the port is open: nothing below awaits.
        self.ingest.start()
        sockets = tornado.netutil.bind_sockets(self.config.listen.port, self.config.listen.address,
                                                backlog=self.config.listen.backlog)
        self.port = sockets[0].getsockname()[1]
        # Bound first, so the default name has the real port: the name tags this instance's
        # temporary files in a data folder other instances may share.
        self.instance_id = config.instance_id or f"{socket.gethostname()}:{self.port}"
        self.data_folder.start(self.config.export.sweep_interval, self.instance_id)
        app = self.make_app()
        listen = config.listen
        self.http_server = ProxyHTTPServer(
            app, xheaders=listen.trust_forwarded_headers, max_connections=connection_cap(listen.max_connections),
            idle_connection_timeout=listen.idle_connection_timeout, body_timeout=listen.body_timeout,
            max_body_size=listen.max_body_size, defer_accept=listen.defer_accept,
            # The one body a route reads: SockJS messages from xhr-based clients.
            body_limits=[(re.escape(config.live.prefix) + r"/[^/]+/[^/]+/xhr_send", config.live.max_message_bytes)])
        if not listen.trust_forwarded_headers:  # X-Forwarded-For is read by Tornado's path only
            self.http_server.fast_path = FastUpgrade(app, LiveWebSocketTransport).accept
        self.http_server.add_sockets(sockets)
        self.systemd.start_watchdog(self.ingest.is_alive)
        # What start-up made lives as long as the process: out of the cyclic collector's reach, a
        # full collection walks only what came since (~35k objects: ~30 ms on this machine, which
        # a burst of connects used to trigger in its middle).
        gc.collect()
        gc.freeze()
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
        # The route: the handler's class (a fast-upgraded websocket names the one it stands in for).
        route = getattr(handler, "access_log_route", None) or type(handler).__name__
        metrics.labelled(metrics.HTTP_REQUESTS, route, str(status)).inc()
        level = logging.INFO if status < 500 else getattr(handler, "server_error_log_level", logging.ERROR)
        if not access_log.isEnabledFor(level):
            return  # nothing to format (at log_level WARNING, every request but the 5xx)
        path = loggable_path(request.path)
        fields = {
            "method": request.method, "path": path, "status": status,
            "duration_ms": round(1000.0 * request.request_time(), 1), "remote": request.remote_ip,
            "route": route,
        }
        token = token_from_authorization(request.headers.get("Authorization"))
        if token:
            fields["merchant_id"] = merchant_id_for(token)
        access_log.log(level, "http %s", " ".join(f"{k}={v}" for k, v in fields.items()))
