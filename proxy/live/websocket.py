"""The SockJS websocket transport of a fast-upgraded connection, on the bare stream.

What LiveWebSocketTransport (a Tornado WebSocketHandler) is to a SockJS session, without Tornado's
request, handler and websocket protocol objects: a history burst paid for those once per connect
(a fifth of the proxy's CPU per connect, bench/ab_burst.py). Frames to the client are built by
proxy.live.transports (websocket_frame) and written with send_now, as the handler's are; frames
from the client are parsed by wsproto's FrameProtocol (RFC 6455: masking, control frames,
fragments, UTF-8 of text and close reasons), created with the first bytes the client sends (a
screen sends none, or one subscription).

Behaviour as Tornado's websocket protocol (6.6), which the other upgrades keep:
- a message over `max_message_size` (live.max_message_bytes) is answered with close 1009 and the
  connection closed;
- a client's close is echoed with its code, then the connection closed; a close the server starts
  (the session ended) waits up to CLOSE_TIMEOUT for the client's, then closes the connection;
- a ping is answered with a pong of its payload.
A frame that breaks the protocol (unmasked, a reserved bit, a fragmented control frame, invalid
UTF-8...) fails the connection as RFC 6455 asks: a close with wsproto's code (1002, 1007), then the
connection closed (Tornado closes it without a close frame).
"""

from __future__ import annotations

import http.cookies
import logging
import struct
import time
import typing

import tornado.httputil
import tornado.iostream
import tornado.websocket
from sockjs.tornado.session import ConnectionInfo
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from proxy.live.transports import FIXED_FRAMES, WebSocketFrames, send_now, websocket_frame

log = logging.getLogger("proxy.live")

# As Tornado: how long a close the server started waits for the client's before the connection is closed.
CLOSE_TIMEOUT = 5.0
# Bytes asked of the stream per read (what the client sends is small: subscriptions, auth).
READ_BYTES = 64 * 1024


class Headers(dict):
    """A request's headers by lower-case name; get() and `in` take any case, as HTTPHeaders does."""

    def get(self, name: str, default: typing.Any = None) -> typing.Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())


class UpgradeRequest:
    """What the session, the cross-origin check and the access log read of the upgrade request."""

    method = "GET"

    def __init__(self, path: str, headers: Headers, remote_ip: str):
        self.path = path
        self.headers = headers
        self.remote_ip = remote_ip
        self._start = time.time()

    def request_time(self) -> float:
        return time.time() - self._start


class _ConnectionInfo(ConnectionInfo):
    """sockjs-tornado's ConnectionInfo of the upgrade request (no query string: no arguments). Its
    cookies and headers are a Tornado request's, made when one of them is first read (the live
    view reads neither)."""

    def __init__(self, request: UpgradeRequest):
        super().__init__(request.remote_ip, None, {}, None, request.path)
        self._upgrade = request
        self._tornado_request: tornado.httputil.HTTPServerRequest | None = None

    def _request(self) -> tornado.httputil.HTTPServerRequest:
        if self._tornado_request is None:
            self._tornado_request = tornado.httputil.HTTPServerRequest(
                start_line=tornado.httputil.RequestStartLine("GET", self._upgrade.path, "HTTP/1.1"),
                headers=tornado.httputil.HTTPHeaders(dict(self._upgrade.headers)))
        return self._tornado_request

    @property  # type: ignore[override]
    def cookies(self) -> http.cookies.SimpleCookie:
        return self._request().cookies

    @cookies.setter
    def cookies(self, value: typing.Any) -> None:
        pass

    @property  # type: ignore[override]
    def headers(self) -> tornado.httputil.HTTPHeaders:
        return self._request().headers

    @headers.setter
    def headers(self, value: typing.Any) -> None:
        pass


class SockJSWebSocket(WebSocketFrames):
    """One fast-upgraded SockJS websocket: the session's handler (the interface of
    LiveWebSocketTransport that sockjs-tornado's session and proxy.live use)."""

    name = "websocket"
    # The route the access log and proxy_http_requests_total name, as for Tornado's path.
    access_log_route = "LiveWebSocketTransport"

    def __init__(self, server: typing.Any, stream: tornado.iostream.IOStream, request: UpgradeRequest,
                 max_message_size: int | None, head: bytes):
        """head: the 101 (not sent yet)."""
        self.server = server
        self.stream = stream
        self.request = request
        self.session: typing.Any = None
        self.active = True
        self._max_message_size = max_message_size
        self._frames: FrameProtocol | None = None  # made with the client's first bytes
        self._message: list[typing.Any] = []  # the pieces of a fragmented message (str for text)
        self._message_size = 0
        self._client_closed = False
        self._server_closed = False
        self._close_timer: object | None = None
        self._ended = False
        # Bytes to send before any frame: the 101, and while open() runs the SockJS open frame. They
        # leave with the first frame written (the histories, usually), in one sendmsg: each send
        # on its own is a packet through the stack and a wake-up of the client.
        self._held: tuple[bytes, ...] = (head,)
        self._opening = False

    # ---- as Tornado's RequestHandler, for the access log -------------------------------------------

    def get_status(self) -> int:
        return 101

    # ---- the SockJS session's handler ------------------------------------------------------------

    def get_conn_info(self) -> ConnectionInfo:
        return _ConnectionInfo(self.request)

    def open(self, session_id: str) -> None:
        """As sockjs-tornado's WebSocketTransport.open (TCP_NODELAY is set before the 101), then
        reading the client's frames."""
        server = self.server
        server.stats.on_conn_opened()
        self.session = server.create_session(session_id, register=False)
        self._opening = True
        try:
            if not self.session.set_handler(self):
                self.close()
                return
            self.session.verify_state()
            if self.session:
                self.session.flush()
        finally:
            self._opening = False
        if self._held:  # no frame was written (no history to send): the 101 and "o" alone
            try:
                self._send(self.stream, ())
            except tornado.iostream.StreamClosedError:
                pass  # the read below finds the stream closed
        self._read()

    def send_pack(self, message: str, binary: bool = False) -> None:
        if self._opening and self._frame_stream() is not None:
            self._held += FIXED_FRAMES.get(message) or websocket_frame(message.encode())  # "o": with the histories
            return
        super().send_pack(message, binary)

    def _frame_stream(self) -> tornado.iostream.IOStream | None:
        return None if self._server_closed or self._client_closed or self.stream.closed() else self.stream

    def _send(self, stream: tornado.iostream.IOStream, parts: tuple[bytes, ...]) -> typing.Any:
        """send_now, after what is held back (the 101, "o")."""
        if self._held:
            parts, self._held = self._held + parts, ()
        return send_now(stream, parts)

    def session_closed(self) -> None:
        """The session ended (closed by the proxy): close the websocket too."""
        self.close()
        self._detach()

    def on_close(self) -> None:
        """The connection is gone: end the session (as sockjs-tornado's transport does)."""
        session = self.session
        if session is not None:
            self.server.stats.on_conn_closed()
            self._detach()
            session.close()

    def _detach(self) -> None:
        if self.session is not None:
            self.session.remove_handler(self)
            self.session = None

    # ---- the websocket ---------------------------------------------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start (or finish) the closing handshake, as Tornado's WebSocketProtocol13.close."""
        if not self._server_closed:
            if not self.stream.closed():
                # A control frame's payload is at most 125 bytes: the code and 123 of the reason.
                payload = b"" if code is None else struct.pack("!H", code) + (reason or "").encode()[:123]
                try:
                    self._send(self.stream, (bytes([0x88, len(payload)]) + payload,))
                except tornado.iostream.StreamClosedError:
                    pass
            self._server_closed = True
        if self._client_closed:
            self.end()
        elif self._close_timer is None:
            self._close_timer = self.stream.io_loop.call_later(CLOSE_TIMEOUT, self.end)

    def end(self) -> None:
        """Close the connection; the session ends with it (on_close)."""
        if self._close_timer is not None:
            self.stream.io_loop.remove_timeout(self._close_timer)
            self._close_timer = None
        self.stream.close()
        if not self._ended:
            self._ended = True
            self.on_close()

    def _read(self) -> None:
        if self.stream.closed():
            self.end()
            return
        try:
            future = self.stream.read_bytes(READ_BYTES, partial=True)
        except tornado.iostream.StreamClosedError:
            self.end()
            return
        future.add_done_callback(self._received)

    def _received(self, future: typing.Any) -> None:
        try:
            data = future.result()
        except tornado.iostream.StreamClosedError:
            self.end()
            return
        if self._take(data):
            self._read()

    def _take(self, data: bytes) -> bool:
        """Handle the frames in data; False when reading is over (the connection closes)."""
        frames = self._frames
        if frames is None:
            frames = self._frames = FrameProtocol(client=False, extensions=[])
        frames.receive_bytes(data)
        try:
            for frame in frames.received_frames():
                opcode = frame.opcode
                if opcode is Opcode.PING:
                    self._control(0x8A, frame.payload)
                elif opcode is Opcode.CLOSE:
                    self._client_closed = True
                    code, _ = frame.payload
                    self.close(None if code == 1005 else int(code))  # echoed (1005: it had none)
                    return False
                elif opcode is not Opcode.PONG:
                    if not self._data(frame.payload, frame.message_finished, opcode):
                        return False
        except ParseFailed as failure:
            log.info("closing websocket from %s: %s", self.request.remote_ip, failure)
            self._fail(int(failure.code), failure.args[0] if failure.args else "")
            return False
        return not self.stream.closed()

    def _data(self, payload: str | bytes, finished: bool, opcode: Opcode) -> bool:
        """A piece of a message (wsproto gives every piece the message's opcode, and text decoded
        and validated); the message once finished."""
        # Tornado's limit counts bytes.
        self._message_size += len(payload.encode()) if isinstance(payload, str) else len(payload)
        if self._max_message_size is not None and self._message_size > self._max_message_size:
            self._fail(1009, "message too big")
            return False
        self._message.append(payload)
        if not finished:
            return True
        message = ("" if opcode is Opcode.TEXT else b"").join(self._message)  # type: ignore[attr-defined]
        self._message, self._message_size = [], 0
        if self._server_closed:
            return True  # closing: what comes until the client's close is dropped, as Tornado does
        try:
            self.on_message(message)
        except Exception:
            log.exception("websocket from %s: message not handled", self.request.remote_ip)
            self._fail(1011, "")
            return False
        return True

    def _control(self, first_byte: int, payload: bytes) -> None:
        try:
            self._send(self.stream, (bytes([first_byte, len(payload)]) + payload,))
        except tornado.iostream.StreamClosedError:
            pass

    def _fail(self, code: int, reason: str) -> None:
        """Send a close with code, then close the connection without waiting for the client's."""
        self.close(code, reason)
        self.end()
