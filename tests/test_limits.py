"""What a client on the open network cannot do to the proxy: run it out of descriptors, hold
connections with slow or idle headers, or make it buffer large bodies."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import sys
import time
import typing
import urllib.error
import urllib.request

import pytest
import tornado.netutil
import tornado.web
import websocket
import yaml

from bench.processes import cpu_seconds, open_descriptors
from proxy.config import ConfigError, parse_config
from proxy.listener import CLOSE_TIMEOUT, ProxyHTTPServer
from proxy.testing import ProxyProcess, SockJSClient, read_response, unique_topics, wait_until

# Runs the proxy with a descriptor limit of the test's choosing, as `ulimit -n` in a unit would.
LAUNCHER = ("import resource, sys; soft, hard = map(int, sys.argv.pop(1).split(':')); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)); "
            "from proxy.cli import main; sys.exit(main(sys.argv[1:]))")
MIB = 1024 * 1024


@pytest.fixture
def limited_proxy(broker, tmp_path) -> typing.Iterator[typing.Callable[..., ProxyProcess]]:
    """limited_proxy(config, soft=None, hard=soft): a real proxy process; `listen` settings are
    merged into the loopback listener, soft/hard set its RLIMIT_NOFILE before it starts."""
    started: list[ProxyProcess] = []

    def start(config: dict[str, typing.Any], soft: int | None = None, hard: int | None = None) -> ProxyProcess:
        settings = dict({"topics": unique_topics("limits")}, **config)
        proxy = ProxyProcess(broker.bootstrap_servers, {k: v for k, v in settings.items() if k != "listen"},
                             tmp_path)
        with open(proxy.config_path) as handle:
            written = yaml.safe_load(handle)
        written["listen"].update(settings.get("listen", {}))
        with open(proxy.config_path, "w") as handle:
            yaml.safe_dump(written, handle)
        if soft is not None:
            assert proxy.args[1:3] == ["-m", "proxy"]
            proxy.args = [sys.executable, "-c", LAUNCHER, f"{soft}:{hard or soft}", *proxy.args[3:]]
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def client_sockets() -> typing.Iterator[list[socket.socket]]:
    """Raw client connections; all closed at teardown."""
    sockets: list[socket.socket] = []
    yield sockets
    close_all(sockets)


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    sockets.clear()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def open_idle(port: int, count: int, into: list[socket.socket]) -> None:
    """count connections that never send a byte (connects complete in the kernel's backlog)."""
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        into.append(sock)


def health_within(proxy: ProxyProcess, seconds: float) -> int:
    """The status of GET /health, or 0 if it took longer than seconds."""
    try:
        with urllib.request.urlopen(proxy.base + "/health", timeout=seconds) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def metric(proxy: ProxyProcess, name: str, labels: str = "") -> float:
    """A value from /metrics; 0 while /metrics is refused (503 at the connection cap)."""
    status, text, _ = proxy.get("/metrics")
    if status != 200:
        return 0.0
    match = re.search(rf"^{name}{re.escape(labels)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure, in bytes for memory (kB in the file)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed sock, or None if it is still open after `within`."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < within:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


# ---- descriptors and the connection cap ---------------------------------------------------------


def test_start_up_raises_the_soft_descriptor_limit_to_the_hard_one(limited_proxy):
    proxy = limited_proxy({}, soft=256, hard=4096)

    with open(f"/proc/{proxy.process.pid}/limits") as handle:
        (line,) = [line for line in handle if line.startswith("Max open files")]
    assert line.split()[3:5] == ["4096", "4096"]
    # The connection cap follows from the raised limit, less what the process keeps back.
    assert "at most 3840 connections (descriptor limit 4096)" in proxy.log()


def test_idle_connections_beyond_the_cap_cannot_lock_out_health(limited_proxy, client_sockets):
    # 256 descriptors: the cap is 192. The attack: more idle connections than descriptors.
    proxy = limited_proxy({}, soft=256)
    pid = proxy.process.pid
    baseline = open_descriptors(pid)

    open_idle(proxy.port, 400, client_sockets)
    wait_until(lambda: metric(proxy, "proxy_idle_connections_closed_total", '{reason="limit"}') > 0,
               message="idle connections to be closed at the cap")

    answers = [health_within(proxy, 1.0) for _ in range(5)]
    assert answers == [200] * 5
    assert open_descriptors(pid) <= 256
    close_all(client_sockets)
    wait_until(lambda: open_descriptors(pid) <= baseline + 2, message="descriptors back to baseline")
    log = proxy.log()
    assert "Traceback" not in log
    assert "out of file descriptors" not in log  # the cap kept them from running out


def test_descriptor_exhaustion_closes_idle_connections_quietly(limited_proxy, client_sockets):
    # A cap above what the descriptors allow: they run out first (EMFILE on accept).
    proxy = limited_proxy({"listen": {"max_connections": 100000}}, soft=200)

    open_idle(proxy.port, 400, client_sockets)
    wait_until(lambda: metric(proxy, "proxy_idle_connections_closed_total", '{reason="descriptors"}') > 0,
               message="idle connections to be closed for descriptors")

    # 3 s: while the flood still fills the kernel's accept queue, a new connection's SYN is dropped
    # and retried after 1 s (TCP, not the proxy); the proxy takes the queue in as it closes idle ones.
    answers = [health_within(proxy, 3.0) for _ in range(5)]
    assert answers == [200] * 5
    log = proxy.log()
    assert "Traceback" not in log
    # One line per 10 s, however many accepts failed.
    assert log.count("closed the longest idle one") <= 2  # one line per 10 s, not one per accept()
    assert "descriptors may run out first" in log  # the start-up warning about this configuration


def test_when_every_descriptor_is_busy_accepting_pauses_without_spinning(limited_proxy, client_sockets):
    proxy = limited_proxy({"listen": {"max_connections": 100000, "body_timeout": 60}}, soft=160)
    pid = proxy.process.pid
    baseline = open_descriptors(pid)

    # Requests waiting for a body that never comes: busy connections, nothing idle to close.
    for _ in range(220):
        sock = connect(proxy.port)
        sock.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        client_sockets.append(sock)
    wait_until(lambda: open_descriptors(pid) >= 158, message="the proxy to run out of descriptors")

    cpu_before = cpu_seconds(pid)
    time.sleep(2.0)  # a measurement window, not a wait for a condition
    cpu_used = cpu_seconds(pid) - cpu_before
    log = proxy.log()
    assert "Traceback" not in log
    assert 1 <= log.count("accepting paused") <= 2  # one line per 10 s, not one per accept()
    assert cpu_used < 0.5, f"the proxy used {cpu_used:.2f} s of CPU in 2 s while out of descriptors"

    close_all(client_sockets)
    wait_until(lambda: health_within(proxy, 1.0) == 200, message="/health once the connections are gone")
    wait_until(lambda: open_descriptors(pid) <= baseline + 2, message="descriptors back to baseline")
    assert metric(proxy, "proxy_accept_pauses_total") > 0


def test_new_connection_beyond_the_cap_gets_503_when_none_is_idle(limited_proxy):
    proxy = limited_proxy({"listen": {"max_connections": 5}}, soft=1024)
    # Websockets are busy for as long as they are open: nothing idle to close.
    sessions = [SockJSClient(proxy.base, "websocket") for _ in range(5)]
    try:
        probe = connect(proxy.port)
        probe.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(probe)
        probe.close()
        assert (status, json.loads(body)) == (503, {"error": "too many connections"})
        assert headers["retry-after"] == "1"
    finally:
        for session in sessions:
            session.close()

    wait_until(lambda: health_within(proxy, 1.0) == 200, message="/health once sessions closed")
    assert metric(proxy, "proxy_connections_refused_total") >= 1
    assert "Traceback" not in proxy.log()


# ---- slow and idle clients --------------------------------------------------------------------


def handshakes_completed(sockets: list[socket.socket], within: float) -> int:
    """How many of these non-blocking connects the kernel completed within `within` seconds (a
    connect the listen backlog had no room for waits for its SYN retransmit, 1 s later)."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLOUT)
    done: set[int] = set()
    deadline = time.monotonic() + within
    while len(done) < len(sockets) and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(1, int(1000 * (deadline - time.monotonic())))):
            poller.unregister(fd)
            done.add(fd)
    return sum(sock.fileno() in done and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
               for sock in sockets)


@pytest.mark.parametrize("backlog, completed", [(None, 400), (32, 33)])
def test_a_burst_of_connects_waits_in_the_listen_backlog_not_for_syn_retransmits(
        limited_proxy, client_sockets, backlog, completed):
    """Hundreds of screens reconnecting at once (a restart, a failover) while the proxy is busy:
    the kernel completes every handshake and holds it until the proxy accepts. Tornado's default
    backlog (128) dropped the rest, which waited 1 s for their SYN retransmit. (Connects that
    send nothing: without defer_accept, which holds those in the kernel's SYN queue instead.)"""
    proxy = limited_proxy({"listen": {"backlog": backlog, "defer_accept": 0} if backlog else {"defer_accept": 0}})
    proxy.process.send_signal(signal.SIGSTOP)  # busy: accepting nothing
    try:
        open_idle(proxy.port, 400, client_sockets)
        # Within 0.8 s: no retransmit (1 s) can have helped.
        assert handshakes_completed(client_sockets, 0.8) == completed  # the backlog, plus one (Linux)
    finally:
        proxy.process.send_signal(signal.SIGCONT)
    close_all(client_sockets)
    assert health_within(proxy, 10) == 200


def test_connects_that_send_nothing_are_held_by_the_kernel_until_defer_accept_has_passed(
        limited_proxy, client_sockets):
    """TCP_DEFER_ACCEPT: a connect is accepted when its first bytes arrive (served at once), one
    that sends nothing only after defer_accept (then counted, and idle like any other)."""
    proxy = limited_proxy({"listen": {"defer_accept": 4}})
    wait_until(lambda: metric(proxy, "proxy_open_connections") == 1, message="only /metrics's own connection open")
    started = time.monotonic()
    open_idle(proxy.port, 3, client_sockets)
    assert handshakes_completed(client_sockets, 2.0) == 3  # the clients see their connects complete
    for _ in range(3):
        assert health_within(proxy, 2.0) == 200  # served, while the silent three wait in the kernel
        assert metric(proxy, "proxy_open_connections") == 1
    assert time.monotonic() - started < 3.5, "too slow to tell held from accepted"
    wait_until(lambda: metric(proxy, "proxy_open_connections") == 4, timeout=15,
               message="the silent connects accepted once defer_accept passed")
    assert time.monotonic() - started >= 4


def test_client_trickling_headers_is_cut_off_at_the_idle_timeout(limited_proxy, client_sockets):
    proxy = limited_proxy({"listen": {"idle_connection_timeout": 1}})
    sock = connect(proxy.port)
    client_sockets.append(sock)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")

    start = time.monotonic()
    sock.settimeout(0.2)
    closed_after = None
    while time.monotonic() - start < 5:
        try:
            sock.sendall(b"X-Slow: 1\r\n")  # one header line every 0.2 s, never the blank line
            if sock.recv(4096) == b"":
                closed_after = time.monotonic() - start
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - start
            break
    assert closed_after is not None, "a client trickling headers was still connected after 5 s"
    assert closed_after < 2.5
    assert health_within(proxy, 1.0) == 200


def test_idle_connection_is_closed_after_the_idle_timeout(limited_proxy, client_sockets):
    proxy = limited_proxy({"listen": {"idle_connection_timeout": 1}})
    silent = connect(proxy.port)
    keep_alive = connect(proxy.port)
    client_sockets.extend([silent, keep_alive])
    keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(keep_alive)[0] == 200

    assert closed_by_peer(silent, within=4) is not None
    assert closed_by_peer(keep_alive, within=4) is not None


def test_slow_body_is_cut_off_at_the_body_timeout(limited_proxy, client_sockets):
    proxy = limited_proxy({"listen": {"body_timeout": 1}})
    sock = connect(proxy.port)
    client_sockets.append(sock)
    sock.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly a part")

    closed_after = closed_by_peer(sock, within=5)
    assert closed_after is not None and closed_after < 3


# ---- bodies -------------------------------------------------------------------------------------


def test_large_bodies_are_refused_before_they_are_read(limited_proxy, client_sockets):
    proxy = limited_proxy({})
    pid = proxy.process.pid
    rss_before = proc_status(pid, "VmRSS")
    size = 95 * MIB

    # The attack: four 95 MiB POST /status at once.
    for _ in range(4):
        sock = connect(proxy.port)
        sock.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        client_sockets.append(sock)
    answers = [read_response(sock) for sock in client_sockets]
    # One client sends its whole body anyway: it is read and thrown away, never kept.
    sender = connect(proxy.port, timeout=30)
    client_sockets.append(sender)
    sender.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    chunk = b"x" * MIB
    try:
        for _ in range(95):
            sender.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the proxy stops reading after a while and closes: the sender is told so

    for status, headers, body in answers:
        assert status == 413
        assert headers["content-type"] == "application/json"
        assert "too large" in json.loads(body)["error"]
    peak_growth = proc_status(pid, "VmHWM") - rss_before
    assert peak_growth < 20 * MIB, f"RSS peak grew by {peak_growth / MIB:.0f} MiB"
    assert health_within(proxy, 2.0) == 200
    assert "Traceback" not in proxy.log()


def test_small_body_on_a_route_without_one_still_gets_405(limited_proxy):
    proxy = limited_proxy({})
    request = urllib.request.Request(proxy.base + "/status", data=b"x" * 100, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405
    assert "error" in json.loads(refused.value.read())


def test_oversized_xhr_send_gets_413_before_it_is_read_and_the_session_goes_on(limited_proxy, sockjs,
                                                                             client_sockets):
    (topic,) = unique_topics("xhrsend")
    proxy = limited_proxy({"topics": [topic], "live": {"max_message_bytes": 4096}})
    client = sockjs(proxy.base, "xhr_streaming")
    client.receive(1)  # the history
    send_path = client._send_url.removeprefix(proxy.base)

    # Only the headers: the answer must not wait for the body.
    sock = connect(proxy.port)
    client_sockets.append(sock)
    sock.sendall(f"POST {send_path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: 5000\r\n\r\n".encode())
    status, _, body = read_response(sock)
    assert status == 413
    assert "4096" in json.loads(body)["error"]

    client.send({"type": "subscribe", "topics": [topic]})
    (history,) = client.receive(1)
    assert (history["type"], history["topic"]) == ("history", topic)


def test_oversized_websocket_message_closes_the_websocket_with_1009(limited_proxy):
    proxy = limited_proxy({"live": {"max_message_bytes": 4096}})
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/live/000/{os.urandom(4).hex()}/websocket",
                                     timeout=5)
    try:
        assert ws.recv() == "o"
        ws.send(json.dumps([json.dumps({"type": "subscribe", "topics": [], "pad": "x" * 5000})]))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                assert int.from_bytes(data[:2], "big") == 1009
                break
        else:
            raise AssertionError("the websocket stayed open")
    finally:
        ws.close()


# ---- shutdown ---------------------------------------------------------------------------------


@tornado.web.stream_request_body
class StuckBeforeTheBody(tornado.web.RequestHandler):
    """A request that never finishes, and that closing its connection does not end either."""

    entered: asyncio.Event

    async def prepare(self) -> None:
        self.entered.set()
        await asyncio.Event().wait()


def test_closing_all_connections_is_not_held_by_a_request_that_never_finishes():
    async def close_with_a_stuck_request() -> float:
        server = ProxyHTTPServer(tornado.web.Application([(r"/", StuckBeforeTheBody)]),
                                 max_connections=10, max_body_size=1024)
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        StuckBeforeTheBody.entered = asyncio.Event()
        _, writer = await asyncio.open_connection("127.0.0.1", sockets[0].getsockname()[1])
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(StuckBeforeTheBody.entered.wait(), 5)
        server.stop()
        start = time.monotonic()
        try:
            await asyncio.wait_for(server.close_all_connections(), 10)
        except asyncio.TimeoutError:
            pass
        writer.close()
        return time.monotonic() - start

    assert asyncio.run(close_with_a_stuck_request()) < CLOSE_TIMEOUT + 1


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("max_connections", 0), ("backlog", 0), ("idle_connection_timeout", 0), ("body_timeout", -1), ("max_body_size", 0),
    ("defer_accept", -1), ("defer_accept", 1.5),
    ("max_connections", "many"),
])
def test_bad_listener_limits_are_configuration_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"'listen\.{key}'"):
        parse_config({"listen": {key: value}}, source="config.yaml")
