"""The SockJS websocket upgrade accepted without Tornado's HTTP machinery (proxy.live.upgrade).

The fast path must be invisible: the same 101, the same frames, the same refusals (which it leaves
to Tornado), for every request Tornado's path would accept. What it declines is decided on the
request's bytes alone: those cases are unit tests on the real application's routes; the rest runs
against a real proxy over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import random
import signal
import socket
import time
import typing
import uuid

import pytest
import tornado.httputil
import tornado.iostream
import tornado.websocket
import websocket

from proxy.app import ProxyServer
from proxy.config import parse_config
from proxy.live.transports import LiveWebSocketTransport
from proxy.live.upgrade import FastUpgrade, parse_headers
from proxy.testing import produce, read_response, unique_topics, wait_until

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ADMIN = "admin-" + "a" * 26


def upgrade_request(path: str | None = None, *, method: str = "GET", version: str = "HTTP/1.1",
                    extra: str = "", drop: tuple[str, ...] = (), key: str | None = None,
                    origin: str | None = "http://127.0.0.1") -> bytes:
    """A browser-like websocket upgrade to the SockJS websocket route."""
    headers = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
               "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    if origin:
        headers["Origin"] = origin
    lines = [f"{method} {path or f'/live/000/{uuid.uuid4().hex[:8]}/websocket'} {version}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name not in drop]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


# ---- what the fast path takes and what it leaves to Tornado (the request's bytes alone) ------------

@pytest.fixture
def fast_upgrade() -> typing.Iterator[tuple[FastUpgrade, tornado.iostream.IOStream]]:
    """(FastUpgrade of the real application, a stream to hand it) inside a running IOLoop."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = ProxyServer(parse_config({"topics": ["t"], "kafka": {"bootstrap.servers": "127.0.0.1:9"},
                                       "cors_origins": ["http://127.0.0.1", "https://allowed.example"]}))
    ours, theirs = socket.socketpair()

    async def make() -> tuple[FastUpgrade, tornado.iostream.IOStream]:
        return FastUpgrade(server.make_app(), LiveWebSocketTransport), tornado.iostream.IOStream(ours)

    try:
        yield loop.run_until_complete(make())
    finally:
        theirs.close()
        ours.close()
        loop.close()
        asyncio.set_event_loop(None)


def takes(fast_upgrade, request: bytes) -> bool:
    upgrade, _ = fast_upgrade
    return upgrade._request_for(request, ("127.0.0.1", 40000)) is not None


def test_a_browsers_plain_upgrade_is_taken(fast_upgrade):
    assert fast_upgrade[0].enabled
    assert takes(fast_upgrade, upgrade_request())
    assert takes(fast_upgrade, upgrade_request(origin=None))  # a non-browser client
    assert takes(fast_upgrade, upgrade_request(origin="https://allowed.example"))
    assert takes(fast_upgrade, upgrade_request(extra="Sec-Fetch-Site: same-origin\r\n", origin="https://x.example"))


def test_without_the_tornado_internals_it_needs_the_fast_path_is_off(fast_upgrade, monkeypatch):
    """A Tornado release without them: every upgrade goes Tornado's way, none is half taken."""
    from proxy.live import upgrade as module
    upgrade, stream = fast_upgrade
    monkeypatch.setattr(module, "INTERNALS", ((tornado.websocket.WebSocketProtocol13, "_no_such_method"),))
    off = FastUpgrade(upgrade.app, LiveWebSocketTransport)
    assert not off.enabled and not off.accept(stream, ("127.0.0.1", 40000))


@pytest.mark.parametrize("request_bytes", [
    upgrade_request()[:-2],  # not complete yet
    upgrade_request()[:40],
    upgrade_request() + b"\x81\x85",  # a frame right behind it
    upgrade_request().replace(b"\r\nHost", b"\nHost"),  # a bare LF
    b"\r\n" + upgrade_request(),
    upgrade_request(method="POST"),
    upgrade_request(version="HTTP/1.0"),
    upgrade_request("/live/000/abc/websocket?x=1"),
    upgrade_request("/live/000/a%62c/websocket"),
    upgrade_request("/live/000/abc/xhr_streaming"),
    upgrade_request("/status"),
    upgrade_request("/live/websocket"),  # the raw websocket endpoint, not routed
    upgrade_request(drop=("Upgrade",)),
    upgrade_request(drop=("Connection",)),
    upgrade_request(drop=("Host",)),
    upgrade_request().replace(b"Host: 127.0.0.1", b"Host: a b"),  # Tornado answers 400
    upgrade_request().replace(b"Host: 127.0.0.1", b"Host: a,b"),
    upgrade_request("/live/000/caf\xe9/websocket"),  # not ASCII
    upgrade_request(drop=("Sec-WebSocket-Key",)),
    upgrade_request(drop=("Sec-WebSocket-Version",)),
    upgrade_request().replace(b"Version: 13", b"Version: 8"),
    upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: h2c"),
    upgrade_request(extra="Sec-WebSocket-Protocol: chat\r\n"),
    upgrade_request(extra="Content-Length: 5\r\n"),
    upgrade_request(extra="Transfer-Encoding: chunked\r\n"),
    upgrade_request(extra="Expect: 100-continue\r\n"),
    upgrade_request(extra="Bad Header Name: x\r\n"),
    upgrade_request(origin="https://evil.example"),  # Tornado's path answers 403
    upgrade_request(extra="Sec-Fetch-Site: cross-site\r\n", origin="https://evil.example"),
], ids=lambda r: r[:60].decode("latin1").replace("\r\n", " | "))
def test_anything_but_a_plain_complete_upgrade_is_left_to_tornado(fast_upgrade, request_bytes):
    assert not takes(fast_upgrade, request_bytes)


def tornados_headers(block: str) -> list[tuple[str, str]] | None:
    """Tornado's parse of the header lines, by lower-case name (as parse_headers gives them)."""
    try:
        return [(name.lower(), value)
                for name, value in tornado.httputil.HTTPHeaders.parse("\r\n" + block + "\r\n").get_all()]
    except tornado.httputil.HTTPInputError:
        return None


BROWSER_HEADERS = ("Host: 127.0.0.1:8001\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   "User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept-Language: en-US,en;q=0.9\r\n"
                   "Cookie: a=1; b=\"x y\"\r\nX-Empty:\r\nX-Tabs:\t v \t w\t\r\nX-Obs: caf\xe9\r\n"
                   "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")


@pytest.mark.parametrize("block", [
    BROWSER_HEADERS, "Host: a", "host:a", "X-A: 1\r\nx-b: 2", "!#$%&'*+-.^_`|~09az: v",
    "X:  padded value  ", "X: \x80\xff", "X:", "X: \t", "X: a\x00b", "X: a\x7fb", "X: a\rb", "X\x00: v",
    " X: folded", "\tX: folded", "X: a\r\n continued", "No colon", ": empty name", "X Y: space in name",
    "X : space before colon", "X: a\r\nX: b", "X: a\r\nx: b", "X: a\r\n\r\nY: b", "X: \xe9t\xe9",
])
def test_headers_are_tornados_or_left_to_it(block):
    """The fast path's header parsing accepts only what Tornado accepts, into the same headers; a
    header given twice is left to Tornado (which joins the values)."""
    ours, theirs = parse_headers(block), tornados_headers(block)
    if ours is not None:
        assert theirs is not None and list(ours.items()) == theirs
    # (An empty line cannot be inside a request's head: the first one ends it. Tornado skips it.)
    lines = block.split("\r\n")
    names = [line.split(":", 1)[0].lower() for line in lines]
    if theirs is not None and len(set(names)) == len(names) and all(lines):
        assert ours is not None, "Tornado accepts it: so must the fast path"


def test_headers_random_lines_are_tornados_or_left_to_it():
    """Random lines over the characters that matter (separators, whitespace, controls, obs-text)."""
    alphabet = "aZ9-_!~:; \t\x00\x01\x1f\x7f\x80\xe9\xff\r\",="
    generator = random.Random(10)

    def text(characters: str, longest: int) -> str:
        return "".join(generator.choice(characters) for _ in range(generator.randint(0, longest)))

    def line() -> str:
        if generator.random() < 0.2:  # anything
            return text(alphabet, 12)
        # name: value, the name mostly a token, the value anything
        name = text("aZ9-_!~" if generator.random() < 0.8 else alphabet, 6)
        return f"{name}:{text(alphabet, 10)}"

    accepted = 0
    for _ in range(3000):
        lines = [line() for _ in range(generator.randint(1, 3))]
        block = "\r\n".join(lines)
        ours, theirs = parse_headers(block), tornados_headers(block)
        if ours is not None:
            accepted += 1
            assert theirs is not None and list(ours.items()) == theirs, block
        elif theirs is not None and all(lines):
            names = [line.split(":", 1)[0].lower() for line in lines]
            assert len(set(names)) < len(names), f"Tornado accepts {block!r}, the fast path does not"
    assert accepted > 100  # the comparison was made often enough to mean something


# ---- a real proxy ---------------------------------------------------------------------------------

def fast_upgrades(proxy) -> float:
    status, text, _ = proxy.get("/metrics")
    assert status == 200
    values = [line.split()[-1] for line in text.splitlines() if line.startswith("proxy_websocket_fast_upgrades_total")]
    return float(values[0])


def read_frames(sock: socket.socket, rest: bytes, count: int) -> list[bytes]:
    """count unmasked websocket frames' payloads."""
    frames, data = [], rest
    while len(frames) < count:
        while True:
            if len(data) >= 2:
                length, start = data[1] & 0x7F, 2
                if length == 126:
                    length, start = int.from_bytes(data[2:4], "big"), 4
                elif length == 127:
                    length, start = int.from_bytes(data[2:10], "big"), 10
                if len(data) >= start + length:
                    frames.append(data[start:start + length])
                    data = data[start + length:]
                    break
            chunk = sock.recv(1 << 20)
            assert chunk, "closed before every frame came"
            data += chunk
    return frames


def upgrade(port: int, request: bytes) -> tuple[int, dict[str, str], list[bytes]]:
    """The answer's status and headers and the first two frames ("o" and the history), over a raw socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        status, headers, rest = read_response(sock)  # no Content-Length: rest is what followed the head
        return status, headers, read_frames(sock, rest, 2)


def test_the_fast_101_and_frames_are_tornados(broker, start_proxy):
    """The same request over both paths (a query string sends it Tornado's way): the same headers
    (but Date's value), a valid accept key, the same "o" and history frames."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic], partitions=1)
    produce(broker.bootstrap_servers, topic, [{"n": n} for n in range(5)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    key = base64.b64encode(os.urandom(16)).decode()
    accept = base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()
    wait_until(lambda: len(upgrade(proxy.port, upgrade_request(key=key))[2][1]) > 100, 15,
               message="the history to be loaded")
    before = fast_upgrades(proxy)
    fast_status, fast_headers, fast_frames = upgrade(proxy.port, upgrade_request("/live/000/fastpath/websocket", key=key))
    assert fast_upgrades(proxy) == before + 1
    slow_status, slow_headers, slow_frames = upgrade(proxy.port,
                                                     upgrade_request("/live/000/tornado/websocket?path=tornado", key=key))
    assert fast_upgrades(proxy) == before + 1

    assert fast_status == slow_status == 101
    assert fast_headers.pop("date") and slow_headers.pop("date")
    assert fast_headers == slow_headers
    assert fast_headers["sec-websocket-accept"] == accept
    assert "sec-websocket-extensions" not in fast_headers  # the deflate offer declined, as Tornado does
    assert fast_frames == slow_frames and fast_frames[0] == b"o" and b'{\\"n\\": 4}' in fast_frames[1]


def test_requests_already_there_at_accept_are_served_without_waiting_for_them(broker, start_proxy):
    """A busy proxy accepts connections whose request has arrived already (the clients sent it while
    it was busy; here while it is stopped): the upgrade goes the fast path, anything else (a plain
    GET, a request not complete yet) to Tornado, as when the bytes come after the accept."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic], partitions=1)
    produce(broker.bootstrap_servers, topic, [{"n": n} for n in range(3)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    wait_until(lambda: b'{\\"n\\": 2}' in upgrade(proxy.port, upgrade_request())[2][1], 15,
               message="the history to be loaded")
    before = fast_upgrades(proxy)
    half = upgrade_request()
    sockets = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(3)]
    try:
        os.kill(proxy.process.pid, signal.SIGSTOP)
        try:
            sockets[0].sendall(upgrade_request())
            sockets[1].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sockets[2].sendall(half[:40])
        finally:
            os.kill(proxy.process.pid, signal.SIGCONT)
        status, _, rest = read_response(sockets[0])
        assert status == 101 and read_frames(sockets[0], rest, 2)[1].count(b'{\\"n\\":') == 3
        assert read_response(sockets[1])[0] == 200
        sockets[2].sendall(half[40:])
        status, _, rest = read_response(sockets[2])
        assert status == 101 and read_frames(sockets[2], rest, 2)[0] == b"o"
    finally:
        for sock in sockets:
            sock.close()
    assert fast_upgrades(proxy) == before + 1


def status_of(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return read_response(sock)[0]


def test_refusals_are_tornados_and_count_nothing(broker, start_proxy):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "cors_origins": ["https://allowed.example"]})
    before = fast_upgrades(proxy)
    for request, status in ((upgrade_request().replace(b"Host: 127.0.0.1", b"Host: a b"), 400),
                            (upgrade_request(origin="https://evil.example"), 403),
                            (upgrade_request(origin="http://allowed.example"), 403),  # another scheme
                            (upgrade_request().replace(b"Version: 13", b"Version: 8"), 426),
                            (upgrade_request(method="POST"), 405)):
        assert status_of(proxy.port, request) == status
    assert fast_upgrades(proxy) == before
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("query", ["", "?path=tornado"])
def test_a_websocket_from_an_origin_in_cors_origins_is_accepted(broker, start_proxy, query):
    """Both paths; sockjs-tornado's own check refused every listed origin (it compared hosts with origins)."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "cors_origins": ["https://allowed.example"]})
    before = fast_upgrades(proxy)
    path = f"/live/000/{uuid.uuid4().hex[:8]}/websocket{query}"
    assert status_of(proxy.port, upgrade_request(path, origin="https://allowed.example")) == 101
    assert fast_upgrades(proxy) == before + (0 if query else 1)


def test_a_fast_upgraded_session_is_a_whole_sockjs_session(broker, start_proxy):
    """Live messages, a message from the client (an unknown type gets its error), the close: as any."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "kafka": {"fetch.wait.max.ms": 10}})
    before = fast_upgrades(proxy)
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/live/000/{uuid.uuid4().hex[:8]}/websocket",
                                     timeout=10)
    try:
        assert ws.recv() == "o"
        assert fast_upgrades(proxy) == before + 1
        produce(broker.bootstrap_servers, topic, [{"live": 1}])
        wait_until(lambda: '{\\"live\\": 1}' in ws.recv(), 15, message="the live message")
        ws.send('["{\\"type\\": \\"no such type\\"}"]')
        wait_until(lambda: "error" in ws.recv(), 15, message="the answer to the client's message")
    finally:
        ws.close()
    wait_until(lambda: proxy.get("/status")[1]["sessions"] == 0, 15, message="the session to end")
    assert "Traceback" not in proxy.log()


def test_behind_a_trusted_forwarder_every_upgrade_takes_tornados_path(broker, start_proxy):
    """X-Forwarded-For is read by Tornado's request context only."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "listen": {"trust_forwarded_headers": True}})
    status, _, frames = upgrade(proxy.port, upgrade_request(extra="X-Forwarded-For: 203.0.113.7\r\n"))
    assert status == 101 and frames[0] == b"o"
    assert fast_upgrades(proxy) == 0


def test_nodelay_is_set_once_so_the_101_leaves_with_the_first_frames(monkeypatch):
    """The fast path sets TCP_NODELAY before the 101 (sent with MSG_MORE); the handler's open()
    sets it again, and setting it pushes out what is corked: the 101 would go in a packet of its
    own. The listener's streams set it only when it changes."""
    from proxy.listener import TrackedIOStream

    calls: list[bool] = []
    monkeypatch.setattr(tornado.iostream.IOStream, "set_nodelay", lambda stream, value: calls.append(value))
    left, right = socket.socketpair()

    async def main() -> None:
        stream = TrackedIOStream(left, lambda _: None)
        stream.set_nodelay(True)
        stream.set_nodelay(True)
        stream.set_nodelay(False)
        stream.set_nodelay(False)
        stream.set_nodelay(True)
        stream.close()

    try:
        asyncio.run(main())
    finally:
        right.close()
    assert calls == [True, False, True]


# ---- the websocket protocol on both paths -----------------------------------------------------------
# The fast path's connections speak the websocket protocol without Tornado's (proxy.live.websocket,
# frames from the client parsed by wsproto): what a client sees must be what Tornado's path shows it.

PATHS = {"fast": "", "tornado": "?path=tornado"}  # a query string sends the upgrade Tornado's way


def open_websocket(proxy, path: str, **options: typing.Any) -> websocket.WebSocket:
    before = fast_upgrades(proxy)
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/live/000/{uuid.uuid4().hex[:8]}/websocket"
                                     f"{PATHS[path]}", timeout=10, **options)
    assert ws.recv() == "o"
    assert fast_upgrades(proxy) == before + (path == "fast")
    return ws


def next_control(ws: websocket.WebSocket, opcode: int) -> bytes:
    """The payload of the next control frame of this kind (data frames before it are skipped)."""
    for _ in range(100):
        got, data = ws.recv_data(control_frame=True)
        if got == opcode:
            return data
    raise AssertionError(f"no frame with opcode {opcode}")


def closed_by_server(ws: websocket.WebSocket) -> bool:
    """Whether the server closed the TCP connection (read to its end)."""
    ws.sock.settimeout(10)
    try:
        while ws.sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def live_proxy(broker, start_proxy):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"n": n} for n in range(3)])
    return start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {"max_message_bytes": 4096}})


def sessions(proxy) -> int:
    return proxy.get("/status")[1]["sessions"]


@pytest.mark.parametrize("path", PATHS)
def test_a_ping_is_answered_with_its_payload(live_proxy, path):
    ws = open_websocket(live_proxy, path)
    try:
        ws.ping(b"are you there")
        assert next_control(ws, websocket.ABNF.OPCODE_PONG) == b"are you there"
    finally:
        ws.close()


@pytest.mark.parametrize("opcode", [websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("path", PATHS)
def test_a_fragmented_message_is_one_message(live_proxy, path, opcode):
    ws = open_websocket(live_proxy, path)
    try:
        data = json.dumps([json.dumps({"type": "no such type", "pad": "é" * 300}, ensure_ascii=False)],
                          ensure_ascii=False).encode()
        thirds = [data[:101], data[101:401], data[401:]]  # cut inside two-byte characters
        ws.send_frame(websocket.ABNF.create_frame(thirds[0], opcode, fin=0))
        ws.ping(b"between")  # a control frame may come between the fragments
        ws.send_frame(websocket.ABNF.create_frame(thirds[1], websocket.ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame(thirds[2], websocket.ABNF.OPCODE_CONT, fin=1))
        # The answer to a message of an unknown type (the history comes first).
        wait_until(lambda: "expected" in ws.recv(), 15, message="the error answer")
    finally:
        ws.close()


@pytest.mark.parametrize("path", PATHS)
def test_a_clients_close_is_echoed_then_the_connection_and_session_end(live_proxy, path):
    ws = open_websocket(live_proxy, path)
    wait_until(lambda: sessions(live_proxy) == 1, 15, message="the session")
    ws.send_close(status=4000, reason=b"bye")
    assert next_control(ws, websocket.ABNF.OPCODE_CLOSE)[:2] == (4000).to_bytes(2, "big")
    assert closed_by_server(ws)
    ws.shutdown()
    wait_until(lambda: sessions(live_proxy) == 0, 15, message="the session to end")


@pytest.mark.parametrize("path", PATHS)
def test_fragments_over_max_message_bytes_together_close_with_1009(live_proxy, path):
    ws = open_websocket(live_proxy, path)
    for opcode, fin in ((websocket.ABNF.OPCODE_TEXT, 0), (websocket.ABNF.OPCODE_CONT, 0), (websocket.ABNF.OPCODE_CONT, 1)):
        try:
            ws.send_frame(websocket.ABNF.create_frame("x" * 2000, opcode, fin=fin))
        except (BrokenPipeError, ConnectionResetError):
            break  # the third may find the connection closed already
    assert next_control(ws, websocket.ABNF.OPCODE_CLOSE)[:2] == (1009).to_bytes(2, "big")
    assert closed_by_server(ws)
    ws.shutdown()
    wait_until(lambda: sessions(live_proxy) == 0, 15, message="the session to end")


def raw_frame(first_byte: int, payload: bytes, mask: bool = True) -> bytes:
    """One client frame with a payload under 126 bytes, masked or (against RFC 6455) not."""
    if not mask:
        return bytes([first_byte, len(payload)]) + payload
    key = os.urandom(4)
    return bytes([first_byte, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("violation, code", [
    (raw_frame(0x81, b'["{}"]', mask=False), 1002),  # not masked
    (raw_frame(0xC1, b'["{}"]'), 1002),  # a reserved bit (no extension was agreed)
    (raw_frame(0x81, b'["\xff\xfe"]'), 1007),  # text that is not UTF-8
    (raw_frame(0x09, b"x" * 2), 1002),  # a ping that is not final (control frames cannot be fragmented)
    (raw_frame(0x80, b"x"), 1002),  # a continuation of nothing
], ids=["unmasked", "reserved-bit", "invalid-utf8", "fragmented-ping", "lone-continuation"])
def test_a_frame_that_breaks_the_protocol_fails_the_connection(live_proxy, violation, code):
    """RFC 6455's "fail the connection": a close with the reason's code, then the connection closed
    (Tornado's path closes it without a close frame); the session ends, nothing else happens."""
    ws = open_websocket(live_proxy, "fast")
    wait_until(lambda: sessions(live_proxy) == 1, 15, message="the session")
    ws.sock.sendall(violation)
    assert next_control(ws, websocket.ABNF.OPCODE_CLOSE)[:2] == code.to_bytes(2, "big")
    assert closed_by_server(ws)
    ws.shutdown()
    wait_until(lambda: sessions(live_proxy) == 0, 15, message="the session to end")
    assert "Traceback" not in live_proxy.log()


@pytest.mark.parametrize("path", PATHS)
def test_a_session_the_proxy_ends_closes_the_websocket_after_its_close_frame(broker, start_proxy, path):
    """The SockJS close frame, then the websocket's close; the client's answer ends the connection."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {"access": "token", "auth_timeout": 1,
                                                                               "admin_tokens": ["${ADMIN}"]}},
                        env={"ADMIN": ADMIN})
    ws = open_websocket(proxy, path)
    # Silence: an error, then the session is closed after auth_timeout.
    assert wait_until(lambda: ws.recv().startswith("c[3401,"), 15, message="the SockJS close frame")
    assert next_control(ws, websocket.ABNF.OPCODE_CLOSE) == b""  # sockjs-tornado closes without a code
    ws.send_close()
    assert closed_by_server(ws)
    ws.shutdown()
    wait_until(lambda: sessions_with_token(proxy) == 0, 15, message="the session to end")


def sessions_with_token(proxy) -> int:
    return proxy.get("/status", {"Authorization": f"Token {ADMIN}"})[1]["sessions"]


def test_what_start_up_made_is_out_of_the_cyclic_collectors_reach(tmp_path):
    """A full collection walked everything start-up made (~35k objects, ~30 ms here): a burst of
    connects, which makes many objects that live on, set one off in its middle. start() freezes
    them (gc.freeze), so a full collection walks only what came since."""
    loop = asyncio.new_event_loop()
    server = ProxyServer(parse_config({"topics": ["t"], "kafka": {"bootstrap.servers": "127.0.0.1:9"},
                                       "listen": {"address": "127.0.0.1", "port": 0}, "data_dir": str(tmp_path)}))
    try:
        gc.unfreeze()
        loop.run_until_complete(server.start())
        assert gc.get_freeze_count() > 10_000
        assert not any(found is server.hub for found in gc.get_objects())
        loop.run_until_complete(server.stop())
    finally:
        gc.unfreeze()  # the rest of the test session is collected as usual
        loop.close()
        asyncio.set_event_loop(None)


@pytest.mark.parametrize("path", PATHS)
def test_an_idle_websocket_gets_a_heartbeat_every_heartbeat_interval(broker, start_proxy, path):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {"heartbeat_interval": 0.5}})
    ws = open_websocket(proxy, path)
    try:
        beats: list[float] = []
        deadline = time.monotonic() + 15
        while len(beats) < 4 and time.monotonic() < deadline:
            if ws.recv() == "h":
                beats.append(time.monotonic())
        assert len(beats) == 4, "heartbeats stopped"
        gaps = [later - earlier for earlier, later in zip(beats, beats[1:])]
        assert all(gap >= 0.4 for gap in gaps), gaps  # one per interval, not more
    finally:
        ws.close()
    wait_until(lambda: sessions(proxy) == 0, 15, message="the session to end")
    assert "Traceback" not in proxy.log()


def test_a_fast_upgraded_sessions_connection_info_is_tornados():
    """sockjs-tornado hands the connection's info (ip, path, cookies, headers) to the session: the
    same as a Tornado request of those headers gives."""
    from proxy.live.websocket import Headers, SockJSWebSocket, UpgradeRequest

    raw = {"Host": "127.0.0.1:8001", "Cookie": 'a=1; b="x y"; c', "Referer": "http://127.0.0.1:8001/"}
    headers = Headers({name.lower(): value for name, value in raw.items()})
    websocket = SockJSWebSocket(None, None, UpgradeRequest("/live/000/abc/websocket", headers, "10.0.0.7"), None, b"")
    info = websocket.get_conn_info()
    tornados = tornado.httputil.HTTPServerRequest(
        start_line=tornado.httputil.RequestStartLine("GET", "/live/000/abc/websocket", "HTTP/1.1"),
        headers=tornado.httputil.HTTPHeaders(raw))
    assert (info.ip, info.path, info.arguments) == ("10.0.0.7", "/live/000/abc/websocket", {})
    assert {name: morsel.value for name, morsel in info.cookies.items()} == {"a": "1", "b": "x y"}
    assert {name: morsel.value for name, morsel in info.cookies.items()} == \
        {name: morsel.value for name, morsel in tornados.cookies.items()}
    assert info.get_cookie("a").value == "1" and info.get_header("referer") == "http://127.0.0.1:8001/"
    assert sorted(info.headers.get_all()) == sorted(tornados.headers.get_all())
