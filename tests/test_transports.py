"""Every SockJS transport the proxy offers speaks the same protocol, and no broken connection or
malformed client input leaves anything behind (sessions, heartbeats, tracebacks, 5xx)."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import websocket

from confluent_kafka import Producer

from proxy.live.fanout import POLL_INTERVAL_MIN
from proxy.testing import (SockJSClient, SockJSClosed, parse_sockjs_frame, produce, read_response, unique_topics,
                           wait_until)

TRANSPORTS = SockJSClient.TRANSPORTS


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_gets_history_live_messages_subscribe_and_errors(broker, start_proxy, sockjs, transport):
    first, second = unique_topics("buyOffer", "profit")
    broker.create_topics([first, second])
    produce(broker.bootstrap_servers, first, [{"n": n} for n in range(3)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [first, second]})
    client = sockjs(proxy.base, transport)

    histories = client.receive(2, timeout=30)
    assert [(h["type"], h["topic"]) for h in histories] == [("history", first), ("history", second)]
    assert [e["value"]["n"] for e in histories[0]["messages"]] == [0, 1, 2]

    produce(broker.bootstrap_servers, second, [{"profit": 1.5}])
    (live,) = client.receive(1, timeout=30)
    assert live["type"] == "message" and live["topic"] == second and live["message"]["value"] == {"profit": 1.5}

    client.send({"type": "subscribe", "topics": [first]})
    (history,) = client.receive(1, timeout=30)
    assert history["type"] == "history" and history["topic"] == first
    produce(broker.bootstrap_servers, second, [{"profit": 2.5}])
    produce(broker.bootstrap_servers, first, [{"n": 3}])
    (live,) = client.receive(1, timeout=30)
    assert live["topic"] == first and live["message"]["value"] == {"n": 3}

    client.send({"type": "subscribe", "topics": ["nope"]})
    (error,) = client.receive(1, timeout=30)
    assert error == {"type": "error", "error": "unknown topics: nope"}


@pytest.mark.parametrize("transport", ["websocket", "xhr_streaming", "eventsource"])
def test_every_streaming_transport_gets_the_shutdown_close_code(broker, start_proxy, sockjs, transport):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base, transport)
    client.receive(1, timeout=30)
    proxy.process.terminate()
    frames = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(f.startswith("c") for f in frames):
        try:
            frames.append(client._frame())
        except Exception:  # the connection ended after the close frame
            break
    assert 'c[3000,"server shutting down"]' in frames


def _status(proxy) -> dict:
    return proxy.get("/status")[1]


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashing client or a dropped network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def _read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break  # an xhr poll answers one frame per request: the marker may be in the next one
        if not chunk:
            break
        data += chunk
    return data


def _websocket_request(session: str) -> bytes:
    return (f"GET /live/000/{session}/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def _streaming_request(session: str, transport: str) -> bytes:
    method = "GET" if transport == "eventsource" else "POST"
    return (f"{method} /live/000/{session}/{transport} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Length: 0\r\n\r\n").encode()


# Where in the exchange the client resets: after sending the request, after the first bytes of
# the answer, after the open frame, and in the middle of the history burst.
STAGES = {
    "request sent": None,
    "answer started": b"HTTP/1.1",
    "session open": b"o",
    "history streaming": b'"type\\":\\"history',
}


@pytest.mark.parametrize("transport", ["websocket", "xhr_streaming", "eventsource", "xhr"])
def test_connections_reset_at_any_stage_leave_no_session_heartbeat_or_traceback(broker, start_proxy, transport):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"n": n, "pad": "x" * 2000} for n in range(100)])
    # Short heartbeats and disconnect delay, so a heartbeat on a dead connection would show quickly.
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {"heartbeat_interval": 0.5}})
    sessions = []
    for round_ in range(10):
        for stage, marker in STAGES.items():
            session = f"{round_}{uuid.uuid4().hex[:8]}"
            sessions.append(session)
            sock = _connect(proxy)
            if transport == "websocket":
                sock.sendall(_websocket_request(session))
            else:
                sock.sendall(_streaming_request(session, transport))
            if marker is not None:
                _read_until(sock, marker)
            _reset(sock)

    # Every session ends within the disconnect delay (5 s) plus a sweep; heartbeats stop with them.
    wait_until(lambda: _status(proxy)["sessions"] == 0, 15, message="every session to end")
    metrics = proxy.get("/metrics")[1]
    assert re.search(r'proxy_live_sessions\{transport="[a-z_]+"\} [1-9]', metrics) is None
    log = proxy.log()
    assert "Traceback" not in log and "Error in periodic callback" not in log, log[-3000:]
    assert not re.search(r'proxy_http_requests_total\{route="Live[A-Za-z]+",status="5\d\d"\}', metrics)

    # A reset session's id is free again once the disconnect delay (5 s) is over: reusing it
    # opens a fresh session instead of being refused with 2010 "Another connection still open".
    def reopens() -> bool:
        client = SockJSClient(proxy.base, "xhr_streaming" if transport == "xhr" else transport, session=sessions[-1])
        try:
            return client.receive(1, timeout=10)[0]["type"] == "history"
        except SockJSClosed as closed:
            assert closed.args[0] != 2010, closed.args
            return False
        finally:
            client.close()

    wait_until(reopens, 15, interval=0.5, message="the session id to be free again")


def test_malformed_websocket_frames_are_the_clients_error(broker, start_proxy):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    for payload, opcode in (("hello, not SockJS", websocket.ABNF.OPCODE_TEXT),
                            (b"\xff\xfe\xfd", websocket.ABNF.OPCODE_TEXT),
                            ('["unterminated', websocket.ABNF.OPCODE_TEXT)):
        ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/live/000/{uuid.uuid4().hex[:8]}/websocket",
                                         timeout=5)
        assert ws.recv() == "o"
        ws.send(payload, opcode=opcode)
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            for _ in range(50):  # the history, then the close
                ws.recv()
        ws.close()
    wait_until(lambda: _status(proxy)["sessions"] == 0, 15, message="the sessions to end")
    log = proxy.log()
    assert "Traceback" not in log and not re.search(r"ERROR (tornado|asyncio|proxy\.live)", log), log[-3000:]
    assert "not a SockJS message" in log


@pytest.mark.parametrize("endpoint", ["xhr_send", "jsonp_send"])
@pytest.mark.parametrize("body, status", [(b"", 400), (b"[not json", 400), (b'["\xff"]', 400), (b'{"a": 1}', 400),
                                          (b"x" * (70 * 1024), 413)])
def test_malformed_or_oversized_messages_from_polling_clients_get_a_json_4xx(broker, start_proxy, sockjs, endpoint,
                                                                            body, status):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {
        "transports": ["websocket", "xhr_streaming", "xhr", "jsonp"]}})
    client = sockjs(proxy.base, "xhr_streaming")
    client.receive(1, timeout=30)
    url = f"{proxy.base}/live/000/{client.session_id}/{endpoint}"
    requests = [urllib.request.Request(url, data=body, method="POST")]
    if endpoint == "jsonp_send":  # sockjs-client's way: a form field d=<messages>
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        requests.append(urllib.request.Request(url, data=b"d=" + urllib.parse.quote_plus(body).encode(), headers=form))
        if not body:
            requests.append(urllib.request.Request(url, data=b"x=1", headers=form))  # no field d
    for request in requests:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == status
        assert "error" in json.loads(refused.value.read())
    client.send({"type": "subscribe", "topics": [topic]})  # the session is still fine
    assert client.receive(1, timeout=30)[0]["type"] == "history"
    log = proxy.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_a_flood_of_xhr_sessions_that_never_poll_costs_a_few_kib_each(broker, start_proxy):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"n": n, "pad": "x" * 4000} for n in range(100)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    history_bytes = len(json.dumps(proxy.get("/status")[1]["topics"][topic]["last_message"])) * 100
    assert history_bytes > 400_000
    before = _rss_mib(proxy.process.pid)

    # Each opens its session (the answer is the open frame) and never polls again; its history
    # waits in its queue for a poll that never comes.
    sessions = 800
    for _ in range(sessions):
        sock = _connect(proxy)
        sock.sendall(_streaming_request(uuid.uuid4().hex[:12], "xhr"))
        _read_until(sock, b"o\n")
        sock.close()
    assert _status(proxy)["sessions"] == sessions

    # A private copy of the history each would be 800 x 0.4 MB = 320 MiB.
    grown = _rss_mib(proxy.process.pid) - before
    assert grown < 40, f"RSS grew {grown:.0f} MiB for {sessions} sessions"
    # Unpolled sessions end after the disconnect delay (5 s).
    wait_until(lambda: _status(proxy)["sessions"] == 0, 20, message="the unpolled sessions to expire")


@pytest.mark.parametrize("limit, reconnects", [(None, 0), (200_000, 2)])
def test_a_streaming_client_is_not_sent_into_a_reconnect_cycle(broker, start_proxy, sockjs, limit, reconnects):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"n": n, "pad": "x" * 5000} for n in range(100)])  # 0.5 MB history
    live = {"streaming_response_limit": limit} if limit else {}
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": live})
    client = sockjs(proxy.base, "xhr_streaming")
    assert len(client.receive(1, timeout=30)[0]["messages"]) == 100
    # Then 1.5 MB of live traffic: the default limit (8 MiB) holds the history and all of it.
    for step in range(3):
        produce(broker.bootstrap_servers, topic, [{"n": n, "pad": "y" * 5000} for n in range(step * 100, step * 100 + 100)])
        assert [m["message"]["value"]["n"] for m in client.receive(100, timeout=30)] == list(range(step * 100, step * 100 + 100))
    if reconnects:
        assert client.reconnects >= reconnects  # the setting is what decides (a response carries whole frames)
    else:
        assert client.reconnects == 0


def test_polling_clients_are_answered_at_most_every_poll_interval_and_miss_nothing(broker, start_proxy, sockjs):
    """Each poll answer costs a whole HTTP exchange: under a steady stream, answers are spaced by
    the hub's poll interval and carry what gathered meanwhile, all of it, in order."""
    (topic,) = unique_topics("buyOffer")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base, "xhr")
    assert client.receive(1, timeout=30)[0]["type"] == "history"
    total = 150
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 0})

    def trickle() -> None:
        for n in range(total):
            producer.produce(topic, json.dumps({"n": n}).encode())
            producer.poll(0)
            time.sleep(0.01)  # pacing the producer: a steady stream, not a wait for a condition
        producer.flush(30)

    writer = threading.Thread(target=trickle)
    writer.start()
    answers: list[float] = []
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while len(seen) < total and time.monotonic() < deadline:
        messages = [m for m in (parse_sockjs_frame(client._frame()) or []) if m.get("type") == "message"]
        if messages:
            answers.append(time.monotonic())
            seen.extend(m["message"]["value"]["n"] for m in messages)
    writer.join()
    assert seen == list(range(total))
    gaps = [later - earlier for earlier, later in zip(answers, answers[1:])]
    assert len(answers) >= 5, answers
    assert min(gaps) >= POLL_INTERVAL_MIN * 0.9, sorted(gaps)[:5]


def _poll_request(transport: str, session: str) -> bytes:
    if transport == "jsonp":
        return f"GET /live/000/{session}/jsonp?c=cb HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    return f"POST /live/000/{session}/xhr HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """One answer of a keep-alive connection: (status, body), nothing beyond its Content-Length."""
    status, headers, body = read_response(sock, timeout=10)
    assert len(body) == int(headers["content-length"]), "more bytes than the Content-Length"
    return status, body


def _frame_of(transport: str, body: bytes) -> str:
    text = body.decode()
    if transport == "jsonp":
        assert text.startswith("cb(") and text.endswith(");\r\n"), text[:100]
        return json.loads(text[3:-4])
    return text.rstrip("\n")


def _send(proxy, transport: str, session: str, message: dict) -> None:
    """A message from the client, the way the polling transport sends it."""
    payload = json.dumps([json.dumps(message)])
    if transport == "jsonp":
        body, kind = urllib.parse.urlencode({"d": payload}).encode(), "application/x-www-form-urlencoded"
    else:
        body, kind = payload.encode(), "application/json"
    request = urllib.request.Request(f"{proxy.base}/live/000/{session}/{transport}_send", data=body, method="POST",
                                     headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status in (200, 204)


@pytest.mark.parametrize("transport", ["xhr", "jsonp"])
def test_a_heartbeat_or_close_due_while_a_poll_is_answered_waits_for_the_next_poll(broker, start_proxy, transport):
    """A polling transport answers one frame per request. A heartbeat or a shutdown that comes while
    a big answer is still being written must not be written into the same response (it overran the
    Content-Length: the connection was dropped, and nginx took the instance out of service)."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    # A 6 MB history: more than the kernel buffers between the proxy and a client that does not
    # read (at most 4 MB for the proxy's socket, and the 64 KiB receive buffer the client asks for).
    records = [{"n": n, "pad": "x" * 60_000} for n in range(100)]
    produce(broker.bootstrap_servers, topic, records)
    heartbeat = 1.0
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {
        "heartbeat_interval": heartbeat, "transports": ["websocket", "xhr_streaming", "xhr", "jsonp"]}})

    def answered_while_a_heartbeat_is_due() -> tuple[socket.socket, str]:
        """A session whose poll, waiting with nothing queued (so its heartbeat runs), gets a 6 MB
        answer that the client does not read yet."""
        session = uuid.uuid4().hex[:12]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(_poll_request(transport, session))
        assert _frame_of(transport, _read_answer(sock)[1]) == "o"
        sock.sendall(_poll_request(transport, session))
        assert _frame_of(transport, _read_answer(sock)[1]).startswith("a[")  # the first history
        sock.sendall(_poll_request(transport, session))  # waits: nothing is queued
        _send(proxy, transport, session, {"type": "subscribe", "topics": [topic]})  # the history again
        assert sock.recv(1, socket.MSG_PEEK)  # the answer has started (and is far from done)
        return sock, session

    sock, session = answered_while_a_heartbeat_is_due()
    time.sleep(2.5 * heartbeat)  # a client that reads slowly: heartbeats fall due meanwhile
    status, body = _read_answer(sock)
    frame = _frame_of(transport, body)
    assert status == 200 and frame.startswith("a[")
    (history,) = [json.loads(text) for text in json.loads(frame[1:])]
    assert [envelope["value"]["n"] for envelope in history["messages"]] == list(range(100))
    # The same connection takes the next poll, which waits for the next heartbeat.
    sock.sendall(_poll_request(transport, session))
    status, body = _read_answer(sock)
    assert status == 200 and _frame_of(transport, body) == "h"
    sock.close()

    # Shutdown while an answer is in flight: the close frame is not forced into it either.
    sock, _ = answered_while_a_heartbeat_is_due()
    proxy.process.terminate()
    assert proxy.process.wait(20) == 0
    sock.close()
    log = proxy.log()
    assert "Traceback" not in log and "Content-Length" not in log, log[-3000:]


@pytest.mark.parametrize("method, path", [
    ("GET", "/live/000/{session}/xhr"), ("PUT", "/live/000/{session}/xhr_send"),
    ("DELETE", "/live/000/{session}/xhr_streaming"), ("POST", "/live/000/{session}/websocket"),
    ("POST", "/live/info"), ("PUT", "/live"), ("POST", "/live/000/{session}/eventsource")])
def test_wrong_methods_on_sockjs_urls_get_a_json_error(broker, start_proxy, method, path):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    url = proxy.base + path.format(session=uuid.uuid4().hex[:8])
    request = urllib.request.Request(url, data=b"" if method in ("POST", "PUT") else None, method=method)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    assert refused.value.headers["Content-Type"].startswith("application/json")
    assert "error" in json.loads(refused.value.read())
    log = proxy.log()
    assert "Traceback" not in log, log[-3000:]


def test_a_plain_get_of_the_websocket_url_gets_a_json_400(broker, start_proxy):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    status, body, headers = proxy.get(f"/live/000/{uuid.uuid4().hex[:8]}/websocket")
    assert status == 400 and headers["Content-Type"].startswith("application/json") and "Upgrade" in body["error"]


@pytest.mark.parametrize("endpoint", ["xhr_send", "jsonp_send"])
def test_messages_to_a_session_that_does_not_exist_get_a_json_404(broker, start_proxy, endpoint):
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {
        "transports": ["websocket", "xhr_streaming", "xhr", "jsonp"]}})
    request = urllib.request.Request(f"{proxy.base}/live/000/{uuid.uuid4().hex[:8]}/{endpoint}",
                                     data=b'["{}"]', method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 404
    assert "session" in json.loads(refused.value.read())["error"]
