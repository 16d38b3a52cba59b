"""The HTTP listener: Tornado's HTTPServer with the limits a server on the open network needs.

- A connection cap (listen.max_connections) below the descriptor limit. When it is reached, the
  connection idle the longest (waiting for a request's headers: a keep-alive connection between
  requests, a port scanner, a slow header sender) is closed to make room, if it has been idle
  for IDLE_GRACE; otherwise the new connection is answered 503 and closed at once.
- Descriptor exhaustion (EMFILE/ENFILE) is handled the same way; with nothing idle to close, the
  accept loop pauses briefly instead of spinning, and says so once per interval rather than logging
  a traceback per attempt. /health therefore keeps answering while idle connections pile up.
- Request bodies are limited per route before a byte of them is read: a declared Content-Length
  over the limit gets a JSON 413 (tornado would answer a bare 400, or buffer up to 100 MB).
- Methods no handler implements (TRACE, made-up ones) get a JSON 405 before any handler runs.
One module of about 400 lines on purpose: every limit hooks the same accept loop and the same
per-connection bookkeeping, and split up they would have to share both.

Tornado's own accept loop (tornado.netutil.add_accept_handler) lets EMFILE escape to the IOLoop,
which logs a traceback and calls it again at once as long as the backlog is not empty.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import http
import logging
import re
import resource
import socket
import time
import typing
from collections.abc import Awaitable, Callable, Sequence

import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.web
import ujson
from tornado import gen

from proxy import metrics

log = logging.getLogger(__name__)

# Descriptors kept back from the connection cap for everything else the process opens: librdkafka
# sockets and wake-up pipes (the live consumer and one client per running export), export files,
# the epoll descriptor, logs.
DESCRIPTOR_RESERVE = 256
# Connections accepted per IOLoop turn: a flood cannot starve the loop. Tornado takes 128; with
# TCP_DEFER_ACCEPT a connection is served at accept (a websocket upgrade and its history: ~0.5 ms),
# so a burst of screens connecting at once takes turns with the fan-out's ticks and /health.
ACCEPT_BATCH = 16
# A connection is not closed for being idle before it had this long to send its request: under a
# flood of new connections, the oldest idle one would otherwise be one accepted a moment ago
# whose request (a /health probe, say) is already waiting in its socket.
IDLE_GRACE = 1.0
# How long accepting pauses when descriptors ran out and no idle connection could be closed.
ACCEPT_BACKOFF = 0.2
# At shutdown, how long close_all_connections() waits for request handlers to notice.
CLOSE_TIMEOUT = 2.0
# At most one line per this many seconds for each kind of refusal.
LOG_INTERVAL = 10.0
# After a 413, how long the rest of a refused body is read and thrown away: a client that sends
# its body before reading the answer (most do) would otherwise get a reset instead of the 413.
DRAIN_SECONDS = 2.0
DRAIN_CHUNK = 64 * 1024

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
DECIMAL = re.compile(r"[0-9]+")
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 33\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
    b'{"error": "too many connections"}'
)


def connection_cap(configured: int | None) -> int:
    """listen.max_connections, or (null) what the descriptor limit leaves after the reserve."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        limit = 1 << 20  # Linux's own ceiling (fs.nr_open)
    available = limit - min(DESCRIPTOR_RESERVE, limit // 4)
    cap = available if configured is None else configured
    if cap > available:
        log.warning("listen.max_connections is %d but the descriptor limit (%d) leaves room for %d: "
                    "descriptors may run out first (the proxy then closes idle connections and pauses "
                    "accepting)", cap, limit, available)
    else:
        log.info("at most %d connections (descriptor limit %d)", cap, limit)
    return cap


class ThrottledLog:
    """Logs a recurring event at most once per interval with how often it happened: a flood of
    connections must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL):
        self._logger = logger
        self._interval = interval
        self._count = 0
        self._last = -interval

    def warning(self, message: str, *args: typing.Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        if self._count > 1:
            message += f" ({self._count} times since the last such line)"
        self._logger.warning(message, *args)
        self._last, self._count = now, 0


def has_bytes(connection: socket.socket) -> bool:
    """Whether the client has sent something (not to be waited for: the socket may still block)."""
    try:
        return bool(connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing yet (BlockingIOError), or gone already: its stream will see
        return False


class TrackedIOStream(tornado.iostream.IOStream):
    """An accepted connection's stream that tells the server when its descriptor is released
    (HTTP, a detached websocket or a refused body alike)."""

    def __init__(self, sock: socket.socket, on_closed: Callable[[TrackedIOStream], None],
                 **kwargs: typing.Any):
        super().__init__(sock, **kwargs)
        self._on_closed = on_closed
        self._nodelay_set: bool | None = None

    def set_nodelay(self, value: bool) -> None:
        """Set TCP_NODELAY only when it changes: each setsockopt is a system call, and setting it
        pushes out whatever the kernel holds back."""
        if value != self._nodelay_set:
            super().set_nodelay(value)
            self._nodelay_set = value

    def close_fd(self) -> None:
        super().close_fd()
        self._on_closed(self)


class FirstBytes:
    """An accepted connection whose first bytes have not arrived: no stream yet, but counted, idle
    (closable to make room) and closed at shutdown like one. Waits at most `timeout` (the header
    timeout Tornado then applies again to the rest of the request's headers)."""

    def __init__(self, sock: socket.socket, address: typing.Any,
                 on_readable: Callable[[FirstBytes, socket.socket, typing.Any], None],
                 on_closed: Callable[[FirstBytes], None], timeout: float):
        self.sock: socket.socket | None = sock
        self._address = address
        self._on_readable = on_readable
        self._on_closed = on_closed
        self._io_loop = tornado.ioloop.IOLoop.current()
        self._io_loop.add_handler(sock, self._readable, tornado.ioloop.IOLoop.READ)
        self._timeout = self._io_loop.call_later(timeout, self.close)

    def _readable(self, fd: typing.Any, events: int) -> None:
        sock = self._release()
        if sock is not None:
            self._on_readable(self, sock, self._address)

    def close(self) -> None:
        sock = self._release()
        if sock is not None:
            sock.close()
            self._on_closed(self)

    def _release(self) -> socket.socket | None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self._io_loop.remove_handler(sock)
            self._io_loop.remove_timeout(self._timeout)
        return sock


class AcceptLoop:
    """Accepts connections on one listening socket; can stop watching it for a while."""

    def __init__(self, sock: socket.socket, on_connection: Callable[[socket.socket, typing.Any], None],
                 on_exhausted: Callable[[AcceptLoop], bool], on_error: Callable[[AcceptLoop, OSError], None]):
        self.sock = sock
        self._on_connection = on_connection
        self._on_exhausted = on_exhausted
        self._on_error = on_error
        self._io_loop = tornado.ioloop.IOLoop.current()
        self._watching = False
        self._stopped = False
        self._resume: object | None = None

    def start(self) -> None:
        self._resume = None
        if not self._stopped and not self._watching:
            self._io_loop.add_handler(self.sock, self._accept, tornado.ioloop.IOLoop.READ)
            self._watching = True

    def pause(self, seconds: float) -> None:
        """Leave waiting clients in the kernel's backlog for a while (no busy loop)."""
        self._unwatch()
        if self._resume is None and not self._stopped:
            self._resume = self._io_loop.call_later(seconds, self.start)

    def stop(self) -> None:
        self._stopped = True
        self._unwatch()
        if self._resume is not None:
            self._io_loop.remove_timeout(self._resume)
            self._resume = None

    def _unwatch(self) -> None:
        if self._watching:
            self._io_loop.remove_handler(self.sock)
            self._watching = False

    def _accept(self, fd: typing.Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._watching:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:  # closed by the client while still in the backlog
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    self._on_error(self, exc)
                    return
                if not self._on_exhausted(self):  # paused
                    return
                continue  # an idle connection was closed: there is a descriptor for the next one
            self._on_connection(connection, address)


class ProxyHTTPServer(tornado.httpserver.HTTPServer):
    """HTTPServer with a connection cap that closes idle connections first, a quiet back-off when
    descriptors run out, and per-route body limits checked before the body is read."""

    def initialize(self, request_callback: typing.Any, *, max_connections: int, max_body_size: int,  # type: ignore[override]
                   body_limits: Sequence[tuple[str, int]] = (), defer_accept: int = 0, **kwargs: typing.Any) -> None:
        """body_limits: (path regex, bytes) pairs that override max_body_size; first match wins.
        defer_accept: seconds the kernel holds a connect until its first bytes (0: not at all)."""
        if kwargs.get("ssl_options") is not None:
            raise ValueError("ProxyHTTPServer serves plain HTTP; terminate TLS in front of it")
        self._body_limits = [(re.compile(pattern), limit) for pattern, limit in body_limits]
        self._default_body_limit = max_body_size
        # Tornado's own limit is the ceiling (it bounds chunked bodies); each request gets its own.
        ceiling = max([max_body_size, *(limit for _, limit in self._body_limits)])
        super().initialize(request_callback, max_body_size=ceiling, **kwargs)
        self.max_connections = max_connections
        self.defer_accept = defer_accept
        self.open_connections = 0
        self._streams: set[TrackedIOStream | FirstBytes] = set()
        # Connections waiting for a request's headers, the longest-waiting first: since when.
        self._idle: collections.OrderedDict[tornado.iostream.IOStream | FirstBytes, float] = collections.OrderedDict()
        self._refused_log = ThrottledLog(log)
        self._exhausted_log = ThrottledLog(log)
        self._paused_log = ThrottledLog(log)
        self._accept_error_log = ThrottledLog(log)
        self._body_log = ThrottledLog(log)
        self._method_log = ThrottledLog(log)
        # Given a new connection before Tornado's HTTP server: True when it took the connection
        # (proxy.live.upgrade's plain websocket upgrade).
        self.fast_path: Callable[[tornado.iostream.IOStream, typing.Any], bool] | None = None

    def add_sockets(self, sockets: typing.Iterable[socket.socket]) -> None:
        for sock in sockets:
            accept_loop = AcceptLoop(sock, self._accepted, self._descriptors_exhausted, self._accept_failed)
            if self.defer_accept and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, self.defer_accept)
            self._sockets[sock.fileno()] = sock
            # TCPServer.stop() calls this to stop accepting before it closes the socket.
            self._handlers[sock.fileno()] = accept_loop.stop
            accept_loop.start()

    async def close_all_connections(self) -> None:
        """Close every connection (websockets too), then wait a little for the request loops.

        Tornado's version closes HTTP connections one by one and waits for each forever: one
        request whose handler never finishes (sockjs-tornado's do not, when a request fails
        before their prepare()) would hold the shutdown until systemd kills the process.
        """
        for stream in list(self._streams):
            stream.close()
        # Not wait_for(super().close_all_connections()): a request loop that swallows the
        # cancellation would let it go on to wait for the next connection, and wait_for with it.
        closing = [asyncio.ensure_future(connection.close()) for connection in list(self._connections)]
        if closing:
            _, pending = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT)
            if pending:
                log.warning("%d connection(s) did not finish within %.0f s of being closed; stopping anyway",
                            len(pending), CLOSE_TIMEOUT)

    def body_limit(self, path: str) -> int:
        """The largest request body the route of path accepts, in bytes."""
        path = path.split("?", 1)[0]
        for pattern, limit in self._body_limits:
            if pattern.fullmatch(path):
                return limit
        return self._default_body_limit

    def start_request(self, server_conn: object,
                      request_conn: tornado.httputil.HTTPConnection) -> tornado.httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = typing.cast(typing.Any, request_conn).stream
        if stream is not None and not stream.closed():
            self._idle[stream] = time.monotonic()
            self._idle.move_to_end(stream)
        return RequestGate(self, delegate, request_conn, stream)

    def request_started(self, stream: tornado.iostream.IOStream) -> None:
        """The connection's request headers are in: it is busy until its next request starts."""
        self._idle.pop(stream, None)

    def refuse_body(self, request_conn: tornado.httputil.HTTPConnection,
                    start_line: tornado.httputil.RequestStartLine, length: int, limit: int) -> None:
        """Answer 413 without reading the body into memory; the connection is closed after it."""
        self._body_log.warning("refused a %d-byte request body to %s %s (at most %d bytes there)",
                               length, start_line.method, start_line.path.split("?", 1)[0], limit)
        self._refuse_request(request_conn, 413, f"request body too large: {length} bytes, this route accepts "
                             f"at most {limit}", length)

    def refuse_method(self, request_conn: tornado.httputil.HTTPConnection,
                      start_line: tornado.httputil.RequestStartLine, length: int) -> None:
        """Answer 405 to a method no handler implements (TRACE, CONNECT, made-up ones), as the
        handlers answer the methods they do not serve.

        Tornado's handlers refuse them before prepare(), and sockjs-tornado's then fail in
        finish() on an attribute prepare() sets: a traceback and a request that never ends.
        """
        self._method_log.warning("refused method %.20r from %s", start_line.method, request_conn.context)
        self._refuse_request(request_conn, 405, f"method {start_line.method[:20]} is not allowed", length)

    def _refuse_request(self, request_conn: tornado.httputil.HTTPConnection, status: int, message: str,
                        length: int) -> None:
        stream = typing.cast(typing.Any, request_conn).detach()
        metrics.HTTP_REQUESTS.labels("Listener", str(status)).inc()
        tornado.ioloop.IOLoop.current().spawn_callback(self._answer_and_drain, stream, status, message, length)

    def _accepted(self, connection: socket.socket, address: typing.Any) -> None:
        if self.open_connections >= self.max_connections and not self._close_oldest_idle("limit"):
            self._refuse_connection(connection)
            return
        self.open_connections += 1
        metrics.OPEN_CONNECTIONS.inc()
        if self.fast_path is None:
            self._serve(connection, address)
            return
        # The fast path looks at the request once its first bytes are there: with TCP_DEFER_ACCEPT
        # nearly always at accept; without, nearly never (a client sends once its connect completes).
        if self.defer_accept and has_bytes(connection):
            self._serve(connection, address)
            return
        waiting = FirstBytes(connection, address, self._first_bytes, self._closed,
                             typing.cast(float, self.conn_params.header_timeout))
        self._streams.add(waiting)
        self._idle[waiting] = time.monotonic()

    def _first_bytes(self, waiting: FirstBytes, connection: socket.socket, address: typing.Any) -> None:
        self._streams.discard(waiting)
        self._idle.pop(waiting, None)
        self._serve(connection, address)

    def _serve(self, connection: socket.socket, address: typing.Any) -> None:
        """An accepted connection (counted in open_connections) to the fast path or Tornado's HTTP server."""
        try:
            stream = TrackedIOStream(connection, self._closed, max_buffer_size=self.max_buffer_size,
                                     read_chunk_size=self.read_chunk_size)
        except Exception:
            connection.close()
            self.open_connections -= 1
            metrics.OPEN_CONNECTIONS.dec()
            log.exception("cannot serve a new connection")
            return
        self._streams.add(stream)
        if self.fast_path is not None and self.fast_path(stream, address):
            return
        self._idle[stream] = time.monotonic()
        self.handle_stream(stream, address)

    def _closed(self, stream: TrackedIOStream | FirstBytes) -> None:
        self.open_connections -= 1
        self._streams.discard(stream)
        metrics.OPEN_CONNECTIONS.dec()
        self._idle.pop(stream, None)

    def _close_oldest_idle(self, reason: str) -> bool:
        """Close the connection that has waited longest for a request, if longer than IDLE_GRACE;
        False if there is none."""
        oldest = next(iter(self._idle.items()), None)
        if oldest is None or time.monotonic() - oldest[1] < IDLE_GRACE:
            return False
        stream, _ = self._idle.popitem(last=False)
        stream.close()  # releases its descriptor now
        metrics.IDLE_CONNECTIONS_CLOSED.labels(reason).inc()
        return True

    def _refuse_connection(self, connection: socket.socket) -> None:
        """Nothing to make room with: answer 503 and close, without a stream or a request."""
        metrics.CONNECTIONS_REFUSED.inc()
        self._refused_log.warning("refused a connection: %d open, none idle for %.0f s (listen.max_connections)",
                                  self.open_connections, IDLE_GRACE)
        try:
            connection.setblocking(False)
            connection.send(TOO_MANY_CONNECTIONS)
        except OSError:
            pass
        connection.close()

    def _descriptors_exhausted(self, accept_loop: AcceptLoop) -> bool:
        """EMFILE/ENFILE on accept: close an idle connection (True: accept again now) or pause."""
        if self._close_oldest_idle("descriptors"):
            self._exhausted_log.warning("out of file descriptors with %d connections open: closed the longest "
                                        "idle one", self.open_connections)
            return True
        metrics.ACCEPT_PAUSES.inc()
        accept_loop.pause(ACCEPT_BACKOFF)
        self._paused_log.warning("out of file descriptors with %d connections open, none idle for %.0f s: accepting "
                                 "paused for %s s", self.open_connections, IDLE_GRACE, ACCEPT_BACKOFF)
        return False

    def _accept_failed(self, accept_loop: AcceptLoop, exc: OSError) -> None:
        # ENOBUFS/ENOMEM, or a network error Linux reports on accept(): retry after a pause.
        accept_loop.pause(ACCEPT_BACKOFF)
        self._accept_error_log.warning("accept() failed: %s; accepting paused for %s s", exc, ACCEPT_BACKOFF)

    @staticmethod
    async def _answer_and_drain(stream: tornado.iostream.IOStream, status: int, message: str, length: int) -> None:
        body = ujson.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        deadline = tornado.ioloop.IOLoop.current().time() + DRAIN_SECONDS
        try:
            await stream.write(head + body)
            remaining = length
            while remaining > 0:
                chunk = await gen.with_timeout(deadline, stream.read_bytes(min(DRAIN_CHUNK, remaining), partial=True),
                                               quiet_exceptions=tornado.iostream.StreamClosedError)
                remaining -= len(chunk)
        except (tornado.iostream.StreamClosedError, TimeoutError):
            pass
        finally:
            stream.close()


class RequestGate(tornado.httputil.HTTPMessageDelegate):
    """Sits in front of the application for one request: marks the connection busy and applies
    the route's body limit as soon as the headers are in."""

    def __init__(self, server: ProxyHTTPServer, delegate: tornado.httputil.HTTPMessageDelegate,
                 request_conn: tornado.httputil.HTTPConnection, stream: tornado.iostream.IOStream | None):
        self.server = server
        self.delegate = delegate
        self.request_conn = request_conn
        self.stream = stream

    def headers_received(self, start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
                         headers: tornado.httputil.HTTPHeaders) -> Awaitable[None] | None:
        if self.stream is not None:
            self.server.request_started(self.stream)
        request_line = typing.cast(tornado.httputil.RequestStartLine, start_line)
        limit = self.server.body_limit(request_line.path)
        declared = headers.get("Content-Length", "")
        # int() refuses strings of more than 4,300 digits; any 19 digits are too many bytes.
        length = (int(declared) if len(declared) < 19 else 10 ** 18) if DECIMAL.fullmatch(declared) else 0
        if request_line.method not in tornado.web.RequestHandler.SUPPORTED_METHODS:
            self.server.refuse_method(self.request_conn, request_line, length)
            return None
        if length > limit:
            self.server.refuse_body(self.request_conn, request_line, length, limit)
            return None
        # Chunked bodies: tornado stops reading (answers 400) as soon as they pass the limit.
        typing.cast(typing.Any, self.request_conn).set_max_body_size(limit)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()
