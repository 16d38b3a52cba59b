"""The SockJS websocket upgrade, accepted without Tornado's HTTP and websocket machinery when it is the plain one.

A burst of screens connecting at once is served one connect after another on the IOLoop. Tornado
spends ~0.6 ms of CPU on each websocket connect (its stream reads the request through futures and
coroutines, the request gate and router delegates, the request and handler objects, finish() and
its header writing, the handshake, the websocket protocol and its frame-reading coroutine), several
times what the upgrade itself needs (bench/history_burst.py: a lean server spends 0.25-0.40 ms,
the kernel's copy of the history included). So once a new connection's first bytes are in,
`FastUpgrade` peeks at what is in the socket. When that is one complete, plain upgrade to the
SockJS websocket route, it is accepted here, with Tornado's rules in Tornado's order:

- the request line is parsed by Tornado's parser, the headers by `parse_headers` (Tornado's
  rules in one match per line; what it does not take goes to Tornado), the Host header checked
  as Tornado checks it, and the path routed by the application's own rules (the first rule that
  matches must be the websocket route's);
- the checks of sockjs-tornado's and Tornado's websocket handlers: GET, HTTP/1.1,
  `Upgrade: websocket`, `Connection: Upgrade`, Host and Sec-WebSocket-Key present, version 13,
  Tornado's own cross-origin check (`_check_cross_origin`, with the route's `check_origin`), the
  extension offer parsed by Tornado's parser (and declined, as the route does);
- the 101 carries the headers Tornado's would (Server, Date, Upgrade, Connection,
  Sec-WebSocket-Accept), the request is logged and counted as Tornado's finish() would, and the
  connection becomes a `proxy.live.websocket.SockJSWebSocket`: the SockJS session, the history,
  the client's frames, as LiveWebSocketTransport after Tornado's own handshake.

Everything else is left to Tornado, untouched (peeking consumes nothing): a request not complete
yet or followed by more bytes, another route, another method or version, a query string, an
escaped or non-ASCII path, a header given twice, an invalid Host, a body, a subprotocol offer, a
refused origin (Tornado answers 403), a listener that trusts X-Forwarded-For (Tornado's request
context reads it). If the Tornado internals used here (INTERNALS) are missing in an upgraded
Tornado, or the application's routes are not what the fast path can read, the fast path is off.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import typing

import tornado
import tornado.httputil
import tornado.iostream
import tornado.routing
import tornado.web
import tornado.websocket

from proxy import httpdate, metrics
from proxy.live.transports import origin_allowed
from proxy.live.websocket import Headers, SockJSWebSocket, UpgradeRequest

log = logging.getLogger("proxy.live")

# A browser's upgrade request is about 0.5 kB; with cookies of its site a few kB. Longer ones take
# Tornado's path (which allows up to max_header_size).
PEEK_BYTES = 16 * 1024
# Tornado internals the fast path relies on; without any of them it stays off.
INTERNALS = ((tornado.web.RequestHandler, "_check_cross_origin"), (tornado.web.RequestHandler, "_origin_matches_host"),
             (tornado.websocket.WebSocketProtocol13, "_parse_extensions_header"), (tornado.httputil, "_ABNF"))
# What Tornado's websocket handlers allow when websocket_max_message_size is not set (10 MiB).
TORNADO_MAX_MESSAGE_SIZE = 10 * 1024 * 1024
# Headers the fast path leaves to Tornado: a subprotocol to negotiate, a body.
UNNEGOTIATED = frozenset({"sec-websocket-protocol", "content-length", "transfer-encoding", "expect"})
# The request line the fast path takes: GET, an ASCII path without a query or escapes, HTTP/1.1.
REQUEST_LINE = re.compile(r"GET (/[!-~]*) HTTP/1\.1")


# One header line as Tornado (6.6) accepts it, RFC 9110: a token, a colon, optional whitespace, a
# field value (visible characters or obs-text, with spaces or tabs only between them), optional
# whitespace. Tornado parses line by line with several regular expressions and checks per line
# (~7 us a line; a browser's upgrade has a dozen); this is one match per line, and what it does
# not match (or a header given twice) goes to Tornado's path, which answers it as it would.
HEADER_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
                         r"((?:[\x21-\x7e\x80-\xff](?:[\x21-\x7e\x80-\xff \t]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")


def parse_headers(lines: str) -> Headers | None:
    """The headers of CRLF-separated header lines, as tornado.httputil.HTTPHeaders.parse's (by
    lower-case name); None for anything it would refuse and for a header given more than once
    (Tornado joins those)."""
    headers = Headers()
    for line in lines.split("\r\n"):
        match = HEADER_LINE.fullmatch(line)
        if match is None:
            return None
        name, value = match.groups()
        name = name.lower()
        if dict.__contains__(headers, name):
            return None
        dict.__setitem__(headers, name, value)
    return headers




class _OriginCheck:
    """What Tornado's cross-origin check reads of a handler: its request's headers."""

    _check_cross_origin = getattr(tornado.web.RequestHandler, "_check_cross_origin", None)
    _origin_matches_host = getattr(tornado.web.RequestHandler, "_origin_matches_host", None)

    def __init__(self, request: UpgradeRequest, check_origin: typing.Callable[[str], bool]):
        self.request = request
        self.check_origin = check_origin


class FastUpgrade:
    """accept(stream, address): True when the connection's plain websocket upgrade was accepted here."""

    def __init__(self, app: tornado.web.Application, transport: type[tornado.websocket.WebSocketHandler]):
        """transport: the websocket route's handler class; no such route, no fast path."""
        self.app = app
        self.router: typing.Any = None
        self._rules: list[typing.Any] = []  # the application's rules, up to the websocket route's
        for rule in app.wildcard_router.rules:
            self._rules.append(rule)
            if rule.target is transport:
                self.router = rule.target_kwargs.get("server")
                break
        self.enabled = (
            self.router is not None and all(hasattr(owner, name) for owner, name in INTERNALS)
            # Routes read as Tornado reads them: paths only, no host-specific rules
            # (Application.add_handlers) before the wildcard ones.
            and all(type(rule.matcher) is tornado.routing.PathMatches for rule in self._rules)
            and len(app.default_router.rules) == 1
            # No prepare() of the handler's own (it would run before the upgrade); the access log.
            and transport.prepare is tornado.web.RequestHandler.prepare and "log_function" in app.settings)
        if not self.enabled:
            log.info("websocket upgrades take Tornado's path only (the fast path's assumptions do not hold)")
            return
        self._transport = transport
        self._max_message_size = app.settings.get("websocket_max_message_size", TORNADO_MAX_MESSAGE_SIZE)
        self._nodelay = bool(self.router.settings.get("disable_nagle"))
        self._server_header = f"Server: TornadoServer/{tornado.version}\r\n"

    def accept(self, stream: tornado.iostream.IOStream, address: typing.Any) -> bool:
        if not self.enabled:
            return False
        sock = stream.socket
        try:
            peeked = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except OSError:  # nothing there yet (BlockingIOError), or the connection is already gone
            return False
        taken = self._request_for(peeked, address)
        if taken is None:
            return False
        try:
            consumed = len(sock.recv(len(peeked)))
        except OSError:
            consumed = 0
        if consumed != len(peeked):  # cannot happen with TCP (the bytes were there): do not guess
            stream.close()
            return True
        metrics.FAST_UPGRADES.inc()
        self._upgrade(stream, *taken)
        return True

    def _request_for(self, peeked: bytes, address: typing.Any) -> tuple[UpgradeRequest, tuple[str, ...]] | None:
        """(the request, the route's path arguments) when peeked is a plain upgrade to the
        websocket route that Tornado's path would accept; else None."""
        end = peeked.find(b"\r\n\r\n")
        if end <= 0 or end + 4 != len(peeked):
            return None
        head = peeked[:end + 2]
        if head.count(b"\n") != head.count(b"\r\n"):
            return None  # a bare LF: Tornado may end the head, or a line, elsewhere
        text = head.decode("latin1")
        first_end = text.find("\r\n")
        start_line = REQUEST_LINE.fullmatch(text, 0, first_end)
        if start_line is None or "?" in start_line[1] or "%" in start_line[1]:
            return None
        headers = parse_headers(text[first_end + 2:-2])
        if headers is None:
            return None
        get = dict.get  # the names are lower-case: Headers.get would lower them again
        host = get(headers, "host")
        if (not host or "," in host or not tornado.httputil._ABNF.host.fullmatch(host)
                or get(headers, "upgrade", "").lower() != "websocket"
                or "upgrade" not in (token.strip().lower() for token in get(headers, "connection", "").split(","))
                or get(headers, "sec-websocket-version") != "13" or not get(headers, "sec-websocket-key")
                or not UNNEGOTIATED.isdisjoint(headers)):
            return None
        path = start_line[1]
        for rule in self._rules:
            match = rule.matcher.regex.match(path)
            if match is not None:
                break
        if match is None or rule.target is not self._transport:
            return None
        args = match.groups()
        if None in args:
            return None  # an optional group Tornado would pass as None
        request = UpgradeRequest(path, headers, address[0] if isinstance(address, tuple) and address else "0.0.0.0")
        if _OriginCheck(request, self._check_origin)._check_cross_origin(self._check_origin) is not None:
            return None  # Tornado's path answers 403
        if dict.__contains__(headers, "sec-websocket-extensions"):
            try:  # Tornado parses the offer (and declines it: the route asks for no compression)
                tornado.websocket.WebSocketProtocol13._parse_extensions_header(typing.cast(typing.Any, None), headers)
            except ValueError:
                return None
        return request, args

    def _check_origin(self, origin: str) -> bool:
        """The route's check_origin (LiveWebSocketTransport's)."""
        return origin_allowed(self.router.settings, origin)

    def _upgrade(self, stream: tornado.iostream.IOStream, request: UpgradeRequest, args: tuple[str, ...]) -> None:
        """The 101, then the SockJS session over the stream."""
        accept = tornado.websocket.WebSocketProtocol13.compute_accept_value(dict.__getitem__(request.headers,
                                                                                           "sec-websocket-key"))
        head = (f"HTTP/1.1 101 Switching Protocols\r\n{self._server_header}"
                f"Date: {httpdate.format_timestamp(time.time())}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n")
        if self._nodelay:
            stream.set_nodelay(True)  # as sockjs-tornado's open() does (TrackedIOStream: once)
        # The 101 is sent with the first frames open() writes ("o", the histories): one sendmsg.
        websocket = SockJSWebSocket(self.router, stream, request, self._max_message_size, head.encode("latin1"))
        self.app.log_request(typing.cast(typing.Any, websocket))
        try:
            websocket.open(*args)
        except Exception:
            log.exception("websocket from %s: opening its session failed", request.remote_ip)
            websocket.end()
