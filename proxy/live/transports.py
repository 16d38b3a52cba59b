"""The SockJS transports the proxy offers: sockjs-tornado 1.0.7's, with the repairs it needs.

- A connection can die at any moment of the handshake or the stream. sockjs-tornado misses some
  of those moments (a websocket reset before open() returned, a streaming response whose write
  failed), leaving sessions attached to dead connections: heartbeats raising every 25 s forever,
  the session id refused with "Another connection still open". Every transport here can say
  whether its connection is gone (`connection_lost`) and drop its session (`drop`); writes that
  fail drop it at once, and LiveHub sweeps the rest every second.
- Malformed client input (non-SockJS frames, invalid JSON or UTF-8, oversized xhr_send bodies) is
  the client's error: one log line, a 4xx, no traceback.
- Live frames go straight to the socket when nothing is queued before them (`send_now`): one
  `sendmsg` per frame, no copy of the shared payload per session, no future and no callback
  round when the socket takes it all (nearly always: it is the cost that grows with sessions).
"""

from __future__ import annotations

import http
import logging
import struct
import typing
import urllib.parse

import tornado.iostream
import tornado.websocket
import ujson
from sockjs.tornado import proto, static, transports
from sockjs.tornado.util import bytes_to_str

log = logging.getLogger("proxy.live")

# Websocket frames from this size on are written without a copy (header and payload apart).
ZERO_COPY_FROM = 64 * 1024
# Close of a session whose connection broke (as sockjs-tornado's polling transports say it).
CONNECTION_INTERRUPTED = (1002, "Connection interrupted")


def send_now(stream: tornado.iostream.IOStream, parts: tuple[bytes, ...], flags: int = 0) -> typing.Any:
    """Write parts to the stream's socket now; None when it took them all, else the future of
    the rest, queued on the stream (Tornado writes it as the socket drains).

    Only when nothing is waiting in the stream's buffer (order is kept); TLS streams, or a stream
    with queued data, take the normal path. Raises StreamClosedError when the connection is gone.
    flags: of sendmsg (MSG_MORE: the kernel holds a short write back for the next one).
    """
    if stream.closed():
        raise tornado.iostream.StreamClosedError()
    sent = 0
    if not isinstance(stream, tornado.iostream.SSLIOStream) and not stream.writing():
        try:
            sent = stream.socket.sendmsg(parts, (), flags)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            stream.close(exc_info=exc)
            raise tornado.iostream.StreamClosedError(real_error=exc) from None
    future = None
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        future = stream.write(memoryview(part)[sent:] if sent else part)
        sent = 0
    return future


def sockjs_messages(message: str | bytes) -> list[typing.Any] | tuple[typing.Any] | None:
    """The messages of a SockJS frame from a websocket client (a JSON array of them, or one);
    None when it is not JSON."""
    try:
        decoded = proto.json_decode(bytes_to_str(message))
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded if isinstance(decoded, list) else (decoded,)


def origin_allowed(settings: dict[str, typing.Any], origin: str) -> bool:
    """Whether a websocket from a cross-origin page may open: `cors_origins` lists its origin
    (sockjs-tornado compared that list with the Origin's host alone, "allowed.example" against
    "https://allowed.example": a listed origin was refused its websocket, 403)."""
    allowed = settings.get("websocket_allow_origin", "*")
    return allowed == "*" or origin in allowed


def websocket_frame(payload: bytes) -> tuple[bytes, ...]:
    """payload as one unmasked websocket text frame, as the buffers to send.

    Small frames: one buffer (the copy costs next to nothing, and one buffer is one packet); from
    ZERO_COPY_FROM on, header and payload apart, so the shared payload is never copied. Tornado's
    write_message would build a new object per connection: a history burst to 200 clients would
    copy 100 MB.
    """
    size = len(payload)
    if size < 126:
        header = struct.pack("BB", 0x81, size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return (header + payload,) if size < ZERO_COPY_FROM else (header, payload)


# SockJS's open and heartbeat frames, encoded once.
FIXED_FRAMES = {message: websocket_frame(message.encode()) for message in (proto.CONNECT, proto.HEARTBEAT)}


class WebSocketFrames:
    """What both websocket transports (Tornado's handler, the fast upgrade's SockJSWebSocket)
    share: frames go straight to the socket (send_now; LiveSession writes its frames through
    write_parts, backpressure from the write's future), a failed write ends the session, and the
    client's messages go to the session (a frame that is not SockJS closes the websocket, 1002)."""

    server: typing.Any
    session: typing.Any
    request: typing.Any
    close: typing.Callable[..., None]  # the websocket's close(code, reason)
    on_close: typing.Callable[[], None]  # the transport's: ends the session

    def connection_lost(self) -> bool:
        return self._frame_stream() is None

    def drop(self) -> None:
        """The connection is gone: end the session."""
        self.on_close()

    def on_message(self, message: str | bytes) -> None:
        # SockJS requires that empty messages be ignored.
        if not message or not self.session:
            return
        messages = sockjs_messages(message)
        if messages is None:
            log.info("closing websocket from %s: not a SockJS message", self.request.remote_ip)
            self.close(1002, "malformed SockJS message")
            return
        self.session.on_messages(messages)

    def _frame_stream(self) -> tornado.iostream.IOStream | None:
        """The stream frames are written to; None when the connection is gone or closing."""
        raise NotImplementedError

    def _send(self, stream: tornado.iostream.IOStream, parts: tuple[bytes, ...]) -> typing.Any:
        return send_now(stream, parts)

    def send_pack(self, message: str, binary: bool = False) -> None:
        """sockjs-tornado's own frames (open, heartbeat, close). SockJS frames are text: binary is
        for sockjs-tornado's raw websocket endpoint, which the proxy does not route."""
        try:
            future = self.write_parts(FIXED_FRAMES.get(message) or websocket_frame(message.encode()))
        except (OSError, tornado.websocket.WebSocketClosedError):
            self.server.io_loop.add_callback(self.on_close)
            return
        if future is not None:
            future.add_done_callback(self._sent)

    def _sent(self, future: typing.Any) -> None:
        # Retrieved, so a write to a connection that died meanwhile is no "never retrieved" error.
        if future.exception() is not None:
            self.server.io_loop.add_callback(self.on_close)

    def write_parts(self, parts: tuple[bytes, ...]) -> typing.Any:
        """Send a frame encoded by websocket_frame() (shared by every session that sends it); None
        when the socket took it all, else a future. Raises WebSocketClosedError when the
        connection is gone or closing."""
        stream = self._frame_stream()
        if stream is None:
            raise tornado.websocket.WebSocketClosedError()
        try:
            return self._send(stream, parts)
        except tornado.iostream.StreamClosedError:
            raise tornado.websocket.WebSocketClosedError() from None


class _JsonErrors:
    """What every SockJS handler here adds: its error pages (a wrong method, say) are JSON
    {"error": ...} like every other route's, not Tornado's HTML."""

    # sockjs-tornado's finish() reads it, but only prepare() sets it: a request that fails before
    # (a malformed body, a wrong method) raised AttributeError and was never answered.
    logged = False

    def write_error(self, status_code: int, **kwargs: typing.Any) -> None:
        self._write_error_body(http.HTTPStatus(status_code).phrase)
        self.finish()  # type: ignore[attr-defined]

    def _write_error_body(self, error: str) -> None:
        """{"error": error} as the body (the status is the caller's)."""
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.write(ujson.dumps({"error": error}))  # type: ignore[attr-defined]


class _Droppable(_JsonErrors):
    """What every live transport adds: connection_lost() and drop()."""

    session: typing.Any

    def connection_lost(self) -> bool:
        raise NotImplementedError

    def drop(self) -> None:
        """Detach from the session and close it: its connection is gone."""
        session = self.session
        if session is None:
            return
        self._detach()  # type: ignore[attr-defined]
        session.close(*CONNECTION_INTERRUPTED)


class LiveWebSocketTransport(WebSocketFrames, _Droppable, transports.WebSocketTransport):
    """SockJS over a websocket."""

    async def _execute(self, transforms: typing.Any, *args: typing.Any, **kwargs: typing.Any) -> None:
        """sockjs-tornado refuses what is not a websocket upgrade in plain text; the same refusals
        in JSON, like every other route's errors."""
        headers = self.request.headers
        if self.request.method != "GET":
            refusal = (405, "a websocket is opened with GET")
        elif headers.get("Upgrade", "").lower() != "websocket":
            refusal = (400, 'expected "Upgrade: websocket"')
        elif "upgrade" not in (token.strip().lower() for token in headers.get("Connection", "").split(",")):
            refusal = (400, 'expected "Connection: Upgrade"')
        else:
            await super()._execute(transforms, *args, **kwargs)
            return
        self._transforms = transforms
        status, error = refusal
        self.set_status(status)
        if status == 405:
            self.set_header("Allow", "GET")
        self.set_header("Connection", "Close")
        self._write_error_body(error)
        self.finish()

    def open(self, session_id: str) -> None:  # type: ignore[override]
        super().open(session_id)
        # A client that reset the connection while the upgrade was answered made Tornado call
        # on_close() before open(), when there was no session to close yet.
        if self.session is not None and self.connection_lost():
            self.on_close()

    def check_origin(self, origin: str) -> bool:
        """A cross-origin websocket from an origin in `cors_origins`, as the HTTP API allows one."""
        return origin_allowed(self.server.settings, origin)

    def _frame_stream(self) -> tornado.iostream.IOStream | None:
        connection = self.ws_connection  # is_closing(): the stream closed, or a close sent or received
        return None if connection is None or connection.is_closing() else connection.stream


class _HttpTransport(_Droppable):
    """What the HTTP transports (streaming and polling) share."""

    request: typing.Any
    _finished: bool

    def connection_lost(self) -> bool:
        stream = getattr(self.request.connection, "stream", None)
        return self._finished or stream is None or stream.closed()

    def send_complete(self, f: typing.Any = None) -> None:
        # A write that failed means the client is gone: sockjs-tornado would write again.
        if f is not None and f.exception() is not None:
            self.drop()
            return
        super().send_complete(f)  # type: ignore[misc]


    def _send_parts(self, parts: tuple[bytes, ...]) -> None:
        """Write a data frame as bytes (sockjs-tornado's send_pack decodes and re-encodes it);
        inside a chunked response already under way, as one chunk straight to the socket."""
        self.active = False  # type: ignore[attr-defined]
        try:
            if self._streaming_idle():
                chunk = (b"%x\r\n" % sum(map(len, parts)), *parts, b"\r\n")
                future = send_now(self.request.connection.stream, chunk)
                if future is not None:
                    future.add_done_callback(self.send_complete)
                elif self.should_finish():  # type: ignore[attr-defined]
                    self.server.io_loop.add_callback(self.send_complete)  # type: ignore[attr-defined]
                else:
                    # Written: ready for the next frame at once, without a callback round (the
                    # session's write loop, or the next tick, sends what is queued).
                    self.active = True  # type: ignore[attr-defined]
                return
            for part in parts:
                self.write(part)  # type: ignore[attr-defined]
            self.flush().add_done_callback(self.send_complete)  # type: ignore[attr-defined]
        except tornado.iostream.StreamClosedError:
            self.drop()

    def _streaming_idle(self) -> bool:
        """A chunked response whose headers are out and nothing of it waits to be written: a chunk
        may go to the socket directly, bypassing Tornado's per-write machinery."""
        connection = self.request.connection
        pending = getattr(connection, "_pending_write", None)
        # Tornado internals (6.x), read defensively: if they change, the normal path is taken.
        return (getattr(self, "_headers_written", False) and not getattr(self, "_write_buffer", True)
                and getattr(connection, "_chunking_output", False)
                and getattr(connection, "_expected_content_remaining", None) is None
                and (pending is None or pending.done()))


class LiveXhrStreamingTransport(_HttpTransport, transports.XhrStreamingTransport):
    """SockJS over one long XHR response (reconnects after `response_limit` bytes)."""

    def send_frame(self, frame: bytes) -> None:
        self.notify_sent(len(frame))
        self._send_parts((frame, b"\n"))


class LiveEventSourceTransport(_HttpTransport, transports.EventSourceTransport):
    """SockJS over server-sent events."""

    def send_frame(self, frame: bytes) -> None:
        self.notify_sent(len(frame) + 10)
        self._send_parts((b"data: ", frame, b"\r\n\r\n"))


class _OneAnswerPerRequest(_HttpTransport):
    """What the polling transports (one HTTP request per answer) add: nothing more is written once
    the answer is under way.

    sockjs-tornado writes heartbeats and close frames to whatever handler is attached. A heartbeat
    (or a close) due while a poll's answer is still being written went into the same response,
    past its Content-Length: Tornado raised HTTPOutputError and dropped the connection (behind
    nginx, that failed upstream was taken out of service for everyone). The answer in flight is
    traffic enough for a heartbeat; a close frame reaches the client with its next poll, which
    finds the session closed.
    """

    active: bool

    def send_pack(self, message: str, binary: bool = False) -> None:
        if not self.active:
            log.debug("%s: answer under way; not sent: %.40s", self.request.path, message)
            return
        super().send_pack(message, binary)  # type: ignore[misc]


class LiveXhrPollingTransport(_OneAnswerPerRequest, transports.XhrPollingTransport):
    """SockJS over one XHR request per batch of messages."""

    def send_frame(self, frame: bytes) -> None:
        self.set_header("Content-Type", "application/javascript; charset=UTF-8")
        self.set_header("Content-Length", len(frame) + 1)
        self._send_parts((frame, b"\n"))


class LiveJsonpTransport(_OneAnswerPerRequest, transports.JSONPTransport):
    """SockJS over one JSONP (script) request per batch of messages."""


class _MessagesReceived(_JsonErrors):
    """What the handlers of messages from polling clients (xhr_send, jsonp_send) add: a malformed
    or oversized body, or an unknown session, gets a JSON 4xx and one log line (sockjs-tornado
    answered 500, jsonp_send with a traceback in the log, and an empty 404)."""

    request: typing.Any
    server: typing.Any

    def post(self, session_id: str) -> None:
        session = self.server.get_session(session_id)
        if session is None or session.is_closed:  # sockjs-tornado: a 404 with an empty body
            return self._refuse(404, "no such session (never opened, or ended)")
        limit = self.server.settings.get("max_message_bytes")
        if limit is not None and len(self.request.body) > limit:
            return self._refuse(413, f"message too large: at most {limit} bytes")
        payload = self._payload()
        if payload is None:
            return self._refuse(400, 'expected the messages in the form field "d"')
        if not payload:
            return self._refuse(400, "payload expected")
        try:
            messages = ujson.loads(payload)
        except ValueError:
            return self._refuse(400, "broken JSON encoding")
        if not isinstance(messages, list):
            return self._refuse(400, "expected a JSON array of messages")
        super().post(session_id)  # type: ignore[misc]

    def _payload(self) -> bytes | None:
        """The JSON text of the messages: the body."""
        return self.request.body

    def _refuse(self, status: int, error: str) -> None:
        self.preflight()  # type: ignore[attr-defined]
        self.disable_cache()  # type: ignore[attr-defined]
        log.info("%s from %s refused: %s", self.request.path.rsplit("/", 1)[-1], self.request.remote_ip, error)
        self.set_status(status)  # type: ignore[attr-defined]
        self._write_error_body(error)


class LiveXhrSendHandler(_MessagesReceived, transports.XhrSendHandler):
    """Messages from xhr-based clients."""


class LiveJsonpSendHandler(_MessagesReceived, transports.JSONPSendHandler):
    """Messages from jsonp clients: a form field d=<messages> (or the bare JSON)."""

    def _payload(self) -> bytes | None:
        body = self.request.body
        if self.request.headers.get("Content-Type", "").lower() != "application/x-www-form-urlencoded":
            return body
        if not body.startswith(b"d="):
            return None
        return urllib.parse.unquote_to_bytes(body[2:].replace(b"+", b" "))


class LiveGreetingsHandler(_JsonErrors, static.GreetingsHandler):
    """GET /live: the SockJS greeting."""


class LiveInfoHandler(_JsonErrors, static.InfoHandler):
    """GET /live/info: what the SockJS server offers."""


class LiveIFrameHandler(_JsonErrors, static.IFrameHandler):
    """GET /live/iframe.html: the iframe page of SockJS's cross-domain transports."""


class LiveChunkingTestHandler(_JsonErrors, static.ChunkingTestHandler):
    """POST /live/chunking_test: SockJS's streaming probe."""


# sockjs-tornado's handler classes → ours, applied to the router's URL list.
REPLACEMENTS: dict[type, type] = {
    static.GreetingsHandler: LiveGreetingsHandler,
    static.InfoHandler: LiveInfoHandler,
    static.IFrameHandler: LiveIFrameHandler,
    static.ChunkingTestHandler: LiveChunkingTestHandler,
    transports.WebSocketTransport: LiveWebSocketTransport,
    transports.XhrStreamingTransport: LiveXhrStreamingTransport,
    transports.EventSourceTransport: LiveEventSourceTransport,
    transports.XhrPollingTransport: LiveXhrPollingTransport,
    transports.JSONPTransport: LiveJsonpTransport,
    transports.XhrSendHandler: LiveXhrSendHandler,
    transports.JSONPSendHandler: LiveJsonpSendHandler,
}
