"""The SockJS websocket upgrade, accepted without Tornado's HTTP machinery when it is the plain one.

A burst of screens connecting at once is served one connect after another on the IOLoop. Tornado
spends ~0.6 ms of CPU on each websocket connect (its stream reads the request through futures and
coroutines, the request gate and router delegates, the handler's coroutine, finish() and its header
writing, the handshake), several times what the upgrade itself needs (bench/history_burst.py: a
lean server spends 0.15-0.40 ms). So once a new connection's first bytes are in (the listener
waits for them, proxy.listener.FirstBytes), `FastUpgrade` peeks at what is in the socket. When that
is one complete, plain upgrade to the SockJS websocket route, it is accepted here, with Tornado's
own pieces and checks in Tornado's order:

- the request line is parsed by Tornado's parser, the headers by `parse_headers` (Tornado's
  rules in one match per line; what it does not take goes to Tornado), and the request is routed
  by the application's own rules (the first rule that matches must be the websocket route's);
- the route's handler is made as Tornado makes it, and the checks of sockjs-tornado's and Tornado's
  websocket handlers are made on it: GET, HTTP/1.1, `Upgrade: websocket`, `Connection: Upgrade`,
  Host and Sec-WebSocket-Key present, version 13, the cross-origin check (`check_origin`);
- the 101 carries the handler's own headers, the request is logged and counted as Tornado's
  finish() would, and the connection goes to Tornado's websocket protocol: its frame reader
  (message size limit, control frames, close handshake), then the handler's open() (the SockJS
  session, the history), as after Tornado's own handshake.

Everything else is left to Tornado, untouched (peeking consumes nothing): a request not complete
yet or followed by more bytes, another route, another method or version, a query string or an
escaped path, a header given twice, a body, a subprotocol or extension offer Tornado would
negotiate, a refused origin (Tornado answers 403), a listener that trusts X-Forwarded-For
(Tornado's context reads it). If the
Tornado internals used here (`_check_cross_origin`, `_detach_stream`, the protocol's
`_receive_frame_loop`, `_parse_extensions_header` and `_abort`) are missing in an upgraded Tornado,
the fast path is off; a handler without `_headers` (the headers its 101 would carry) leaves each
request to Tornado.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import typing

import tornado.httputil
import tornado.iostream
import tornado.web
import tornado.websocket

from proxy import metrics
from proxy.live.transports import send_now

log = logging.getLogger("proxy.live")

# A browser's upgrade request is about 0.5 kB; with cookies of its site a few kB. Longer ones take
# Tornado's path (which allows up to max_header_size).
PEEK_BYTES = 16 * 1024
# Tornado internals the fast path relies on; without any of them it stays off.
INTERNALS = ((tornado.web.RequestHandler, "_check_cross_origin"), (tornado.websocket.WebSocketHandler, "_detach_stream"),
             (tornado.websocket.WebSocketProtocol13, "_receive_frame_loop"),
             (tornado.websocket.WebSocketProtocol13, "_parse_extensions_header"),
             (tornado.websocket.WebSocketProtocol13, "_abort"))


# One header line as Tornado (6.6) accepts it, RFC 9110: a token, a colon, optional whitespace, a
# field value (visible characters or obs-text, with spaces or tabs only between them), optional
# whitespace. Tornado parses line by line with several regular expressions and checks per line
# (~7 us a line; a browser's upgrade has a dozen); this is one match per line, and what it does
# not match (or a header given twice) goes to Tornado's path, which answers it as it would.
HEADER_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
                         r"((?:[\x21-\x7e\x80-\xff](?:[\x21-\x7e\x80-\xff \t]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")


def parse_headers(lines: str) -> tornado.httputil.HTTPHeaders | None:
    """The headers of CRLF-separated header lines, equal to tornado.httputil.HTTPHeaders.parse's;
    None for anything it would refuse and for a header given more than once (Tornado joins those)."""
    headers = tornado.httputil.HTTPHeaders()
    for line in lines.split("\r\n"):
        match = HEADER_LINE.fullmatch(line)
        if match is None:
            return None
        name, value = match.groups()
        if name in headers:
            return None
        headers[name] = value
    return headers


class _Context:
    """What an HTTPServerRequest reads from its connection's context (tornado.httpserver's, without
    the X-Forwarded-For handling: the fast path is off when that is trusted)."""

    protocol = "http"

    def __init__(self, address: typing.Any):
        self.address = address
        self.remote_ip = address[0] if isinstance(address, tuple) and address else "0.0.0.0"

    def __str__(self) -> str:
        return self.remote_ip


class _UpgradedConnection(tornado.httputil.HTTPConnection):
    """The request's connection: the handler detaches the stream from it at once, as it does from
    Tornado's HTTP1Connection after the 101."""

    def __init__(self, stream: tornado.iostream.IOStream, address: typing.Any):
        self.stream = stream
        self.context = _Context(address)

    def set_close_callback(self, callback: typing.Any) -> None:
        """Not needed: the stream is detached before the IOLoop runs anything else, and from then
        on the websocket's frame reader notices a close (as after Tornado's own handshake)."""

    def detach(self) -> tornado.iostream.IOStream:
        return self.stream


class FastUpgrade:
    """accept(stream, address): True when the connection's plain websocket upgrade was accepted here."""

    def __init__(self, app: tornado.web.Application, transport: type[tornado.websocket.WebSocketHandler]):
        """transport: the websocket route's handler class (or a base of it); no such route, no fast path."""
        self.app = app
        self.handler_class: typing.Any = None
        self._rules: list[typing.Any] = []  # the application's rules, up to the websocket route's
        self._handler_kwargs: dict[str, typing.Any] = {}
        for rule in app.wildcard_router.rules:
            self._rules.append(rule)
            if isinstance(rule.target, type) and issubclass(rule.target, transport):
                self.handler_class, self._handler_kwargs = rule.target, rule.target_kwargs
                break
        self._readers: set[asyncio.Future] = set()
        self.enabled = self.handler_class is not None
        if not self.enabled:
            return
        # Tornado internals as expected; no host-specific rules (Application.add_handlers) before
        # the wildcard ones; no prepare() of the handler's own (it would run before the upgrade).
        self.enabled = (all(hasattr(owner, name) for owner, name in INTERNALS) and len(app.default_router.rules) == 1
                        and self.handler_class.prepare is tornado.web.RequestHandler.prepare)
        if not self.enabled:
            log.info("websocket upgrades take Tornado's path only (the fast path's assumptions do not hold)")

    def accept(self, stream: tornado.iostream.IOStream, address: typing.Any) -> bool:
        if not self.enabled:
            return False
        sock = stream.socket
        try:
            peeked = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except OSError:  # nothing there yet (BlockingIOError), or the connection is already gone
            return False
        handler = self._handler_for(peeked, stream, address)
        if handler is None:
            return False
        try:
            consumed = len(sock.recv(len(peeked)))
        except OSError:
            consumed = 0
        if consumed != len(peeked):  # cannot happen with TCP (the bytes were there): do not guess
            stream.close()
            return True
        metrics.FAST_UPGRADES.inc()
        self._upgrade(handler)
        return True

    def _handler_for(self, peeked: bytes, stream: tornado.iostream.IOStream,
                     address: typing.Any) -> tornado.websocket.WebSocketHandler | None:
        """The route's handler, made and checked, when peeked is a plain upgrade to it; else None."""
        end = peeked.find(b"\r\n\r\n")
        if end <= 0 or end + 4 != len(peeked):
            return None
        head = peeked[:end + 2]
        if head.count(b"\n") != head.count(b"\r\n"):
            return None  # a bare LF: Tornado may end the head, or a line, elsewhere
        text = head.decode("latin1")
        first_end = text.find("\r\n")
        try:
            start_line = tornado.httputil.parse_request_start_line(text[:first_end])
        except tornado.httputil.HTTPInputError:
            return None
        headers = parse_headers(text[first_end + 2:-2])
        if headers is None:
            return None
        if (start_line.method != "GET" or start_line.version != "HTTP/1.1" or "?" in start_line.path
                or "%" in start_line.path):
            return None
        if (headers.get("Upgrade", "").lower() != "websocket"
                or "upgrade" not in (token.strip().lower() for token in headers.get("Connection", "").split(","))
                or headers.get("Sec-WebSocket-Version") != "13" or not headers.get("Host")
                or not headers.get("Sec-WebSocket-Key") or "Sec-WebSocket-Protocol" in headers
                or "Content-Length" in headers or "Transfer-Encoding" in headers or "Expect" in headers):
            return None
        request = tornado.httputil.HTTPServerRequest(
            headers=headers, connection=_UpgradedConnection(stream, address), start_line=start_line)
        match = None
        for rule in self._rules:
            match = rule.matcher.match(request)
            if match is not None:
                break
        if match is None or rule.target is not self.handler_class:
            return None
        handler = self.handler_class(self.app, request, **self._handler_kwargs)
        if not isinstance(getattr(handler, "_headers", None), tornado.httputil.HTTPHeaders):
            return None
        # As RequestHandler._execute passes them on to get(), and get() to open().
        args = [handler.decode_argument(arg) for arg in match["path_args"]]
        kwargs = {name: handler.decode_argument(value, name=name) for name, value in match["path_kwargs"].items()}
        if handler._check_cross_origin(handler.check_origin) is not None:
            return None  # Tornado's path answers 403
        protocol = handler.get_websocket_protocol()
        if protocol is None:
            return None
        if "Sec-WebSocket-Extensions" in headers:
            if protocol.params.compression_options is not None:
                return None  # Tornado would negotiate permessage-deflate
            try:
                protocol._parse_extensions_header(headers)  # Tornado parses (and drops) the offer
            except ValueError:
                return None
        handler.ws_connection = protocol
        handler.path_args, handler.path_kwargs = args, kwargs
        return handler

    def _upgrade(self, handler: tornado.websocket.WebSocketHandler) -> None:
        """What WebSocketProtocol13._accept_connection does after the checks, for a plain upgrade."""
        protocol = typing.cast(tornado.websocket.WebSocketProtocol13, handler.ws_connection)
        protocol.selected_subprotocol = None
        handler.clear_header("Content-Type")
        handler.set_status(101)
        handler.set_header("Upgrade", "websocket")
        handler.set_header("Connection", "Upgrade")
        handler.set_header("Sec-WebSocket-Accept",
                           protocol.compute_accept_value(typing.cast(str, handler.request.headers["Sec-WebSocket-Key"])))
        head = "".join(["HTTP/1.1 101 Switching Protocols\r\n",
                        *(f"{name}: {value}\r\n" for name, value in handler._headers.get_all()), "\r\n"])
        stream = protocol.stream = handler._detach_stream()
        if getattr(handler, "server", None) is not None and handler.server.settings.get("disable_nagle"):
            # Before the 101, as open() would after it: setting it pushes out what MSG_MORE corks.
            stream.set_nodelay(True)
        try:
            # MSG_MORE: the 101 leaves with the first SockJS frames open() sends, in one packet.
            send_now(stream, (head.encode("latin1"),), socket.MSG_MORE)
        except tornado.iostream.StreamClosedError:
            pass  # the frame reader below finds the stream closed and ends the handler
        self.app.log_request(handler)
        protocol.start_pinging()
        handler.open_args, handler.open_kwargs = tuple(handler.path_args), handler.path_kwargs
        try:
            opened = handler.open(*handler.open_args, **handler.open_kwargs)
        except Exception:
            handler.log_exception(*sys.exc_info())
            protocol._abort()
            return
        reader = asyncio.ensure_future(self._read(handler, protocol, opened))
        self._readers.add(reader)  # the event loop keeps only a weak reference to a task
        reader.add_done_callback(self._readers.discard)

    @staticmethod
    async def _read(handler: tornado.websocket.WebSocketHandler, protocol: tornado.websocket.WebSocketProtocol13,
                    opened: typing.Awaitable[None] | None) -> None:
        """The rest of Tornado's _accept_connection: an open() that is a coroutine, then the frames."""
        if opened is not None:
            try:
                await opened
            except Exception:
                handler.log_exception(*sys.exc_info())
                protocol._abort()
                return
        await protocol._receive_frame_loop()
