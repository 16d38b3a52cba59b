"""Helpers shared by the tests and the benchmarks: run the real proxy process, produce to the real
broker, speak SockJS. Test tooling, not runtime code: nothing in the proxy imports it."""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
import uuid

import websocket
import yaml
from confluent_kafka import Producer

from proxy.demo.broker import die_with_parent, free_port, terminate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded broker answers a fetch only when fetch.wait.max.ms has passed, even with data
# waiting; Apache Kafka answers at once. Tests and demo use a short wait on it.
TANSU_FETCH_WAIT_MS = 10


def wait_until(predicate: typing.Callable[[], typing.Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> typing.Any:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def unique_topics(*names: str) -> list[str]:
    """Topic names no other test uses (the broker is shared by the session)."""
    suffix = uuid.uuid4().hex[:8]
    return [f"{name}-{suffix}" for name in names]


def produce(bootstrap: str, topic: str, values: typing.Iterable[typing.Any],
            partition: int | typing.Sequence[int] | None = None, timestamps: typing.Iterable[int] | None = None,
            one_record_per_batch: bool = False) -> None:
    """Write values (dicts are JSON-encoded, bytes as they are) and wait until every one is acked.

    partition: one for all values, or one per value; timestamps: one record timestamp per value.
    one_record_per_batch: exact end offsets even on brokers whose ListOffsets misreads batches.
    """
    settings: dict[str, typing.Any] = {"bootstrap.servers": bootstrap, "linger.ms": 1}
    if one_record_per_batch:
        settings["batch.num.messages"] = 1
    producer = Producer(settings)
    partitions = iter(partition) if isinstance(partition, typing.Sequence) else None
    stamps = iter(timestamps) if timestamps is not None else None
    failures: list[typing.Any] = []
    for value in values:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        kwargs: dict[str, typing.Any] = {"on_delivery": lambda error, _: error and failures.append(error)}
        if partitions is not None:
            kwargs["partition"] = next(partitions)
        elif partition is not None:
            kwargs["partition"] = partition
        if stamps is not None:
            kwargs["timestamp"] = next(stamps)
        while True:
            try:
                producer.produce(topic, raw, **kwargs)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
    for extra in (partitions, stamps):
        assert extra is None or next(extra, None) is None, "more partitions or timestamps than values"
    assert producer.flush(30) == 0 and not failures, f"not delivered: {failures[:3]}"


class ProxyProcess:
    """The proxy as a real process (python -m proxy) on a free loopback port."""

    def __init__(self, bootstrap: str | None, config: dict[str, typing.Any], tmp_path: typing.Any,
                 extra_args: typing.Sequence[str] = (), env: dict[str, str] | None = None,
                 fetch_wait_ms: int | None = TANSU_FETCH_WAIT_MS):
        """fetch_wait_ms: the consumer's fetch.wait.max.ms unless config sets it (None: the proxy's default)."""
        self.port = free_port()
        self.config_path = os.path.join(str(tmp_path), f"config-{self.port}.yaml")
        settings = {"data_dir": os.path.join(str(tmp_path), "data"), "topic_refresh_interval": 0.5}
        settings.update(config)
        settings["listen"] = {"address": "127.0.0.1", "port": self.port, **config.get("listen", {})}
        if fetch_wait_ms is not None:
            # The test broker (Tansu) holds every fetch for the whole fetch.wait.max.ms: keep it short.
            settings["kafka"] = {"fetch.wait.max.ms": fetch_wait_ms, **config.get("kafka", {})}
        with open(self.config_path, "w") as handle:
            yaml.safe_dump(settings, handle)
        self.args = [sys.executable, "-m", "proxy", "--config", self.config_path, *extra_args]
        if bootstrap:
            self.args += ["--kafka-url", bootstrap]
        self.log_path = os.path.join(str(tmp_path), f"proxy-{self.port}.log")
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("KAFKA_URL", None)
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_healthy: bool = True) -> "ProxyProcess":
        log = open(self.log_path, "ab")
        # Its own session: only the test that started it signals it; stop() always ends it, and
        # the kernel ends it if the test process dies first (a test run killed by a timeout).
        self.process = subprocess.Popen(self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        wait_until(self._answers, 20, message="the proxy to listen")
        if wait_healthy:
            wait_until(lambda: self.get("/health")[0] == 200, 20, message="/health to be 200")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"proxy exited with {self.process.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit; returns the exit code."""
        process, self.process = self.process, None
        return terminate(process, timeout)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, typing.Any, dict[str, str]]:
        """GET path → (status, decoded JSON body or raw text, headers)."""
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body, head = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            status, body, head = error.code, error.read(), dict(error.headers)
        text = body.decode()
        if head.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(text), head
        return status, text, head


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, headers, body) read from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def parse_sockjs_frame(frame: str) -> list[typing.Any] | None:
    """The messages of one SockJS frame, decoded; None for open/heartbeat; raises on close."""
    if frame in ("o", "h") or not frame:
        return None
    if frame[0] == "c":
        raise SockJSClosed(*json.loads(frame[1:]))
    assert frame[0] == "a", f"unexpected SockJS frame {frame[:50]!r}"
    return [json.loads(message) for message in json.loads(frame[1:])]


class SockJSClosed(Exception):
    """The server closed the SockJS session (code, reason)."""


class SockJSClient:
    """A SockJS client over any of the proxy's transports (websocket, xhr_streaming, eventsource,
    xhr polling), decoding JSON messages."""

    TRANSPORTS = ("websocket", "xhr_streaming", "eventsource", "xhr")

    def __init__(self, base: str, transport: str = "websocket", prefix: str = "/live",
                 session: str | None = None):
        self.transport = transport
        self.session_id = session or uuid.uuid4().hex[:12]
        host_port = base.split("//", 1)[1]
        self.host, port = host_port.split(":")
        self.port = int(port)
        self.url = f"{prefix}/000/{self.session_id}"
        self.pending: list[typing.Any] = []
        self.frames: list[str] = []  # frames read but not yet parsed (polling reads one per request)
        self.reconnects = 0  # streaming responses the server ended, after which this client reconnected
        self.http: http.client.HTTPConnection | None = None
        if transport == "websocket":
            self.ws = websocket.create_connection(f"ws://{host_port}{self.url}/websocket", timeout=10)
            self.ws.settimeout(1)
        elif transport in ("xhr_streaming", "eventsource"):
            self._open_stream()
        elif transport != "xhr":
            raise ValueError(transport)
        self._send_url = f"{base}{self.url}/xhr_send"

    def _open_stream(self) -> None:
        self.http = http.client.HTTPConnection(self.host, self.port, timeout=10)
        if self.transport == "xhr_streaming":
            self.http.request("POST", f"{self.url}/xhr_streaming", body=b"")
        else:
            self.http.request("GET", f"{self.url}/eventsource")
        self.response = self.http.getresponse()
        assert self.response.status == 200, self.response.status
        prelude = self.response.readline()
        assert prelude.strip() in (b"h" * 2048, b""), prelude[:50]
        # A reader thread with blocking reads: a socket file that once timed out cannot be read
        # again, so the 1-second waits happen on the queue instead.
        self.http.sock.settimeout(None)
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read_lines, args=(self.response, self.lines), daemon=True).start()

    @staticmethod
    def _read_lines(response: typing.Any, lines: queue.Queue) -> None:
        try:
            while line := response.readline():
                lines.put(line)
        except Exception:  # noqa: BLE001 - closed under it by close(): whatever the read raises, it ends
            pass
        lines.put(None)

    def _frame(self) -> str:
        """The next SockJS frame, or "" if none came within a second."""
        if self.frames:
            return self.frames.pop(0)
        if self.transport == "websocket":
            try:
                return self.ws.recv()
            except websocket.WebSocketTimeoutException:
                return ""
            except websocket.WebSocketConnectionClosedException:
                raise SockJSClosed(0, "connection closed") from None
        if self.transport == "xhr":
            return self._poll()
        try:
            line = self.lines.get(timeout=1)
        except queue.Empty:
            return ""
        if not line:
            # The server ends a streaming response after its response limit: reconnect, as
            # SockJS clients do, to the same session.
            self.close()
            self.reconnects += 1
            self._open_stream()
            return ""
        text = line.decode().rstrip("\r\n")
        if self.transport == "eventsource":
            return text[len("data: "):] if text.startswith("data: ") else ""
        return text

    def _poll(self) -> str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=40)
        try:
            connection.request("POST", f"{self.url}/xhr", body=b"")
            response = connection.getresponse()
            assert response.status == 200, response.status
            return response.read().decode().rstrip("\n")
        finally:
            connection.close()

    def receive(self, count: int = 1, timeout: float = 10.0) -> list[typing.Any]:
        """Exactly `count` decoded messages (more stay pending), waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while len(self.pending) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.pending)} of {count} messages within {timeout}s: {self.pending!r}")
            messages = parse_sockjs_frame(self._frame())
            if messages:
                self.pending.extend(messages)
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken

    def receive_until(self, predicate: typing.Callable[[typing.Any], bool], timeout: float = 10.0) -> list[typing.Any]:
        """Messages up to and including the first for which predicate is true."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching message within {timeout}s; saw {seen!r}")
            (message,) = self.receive(1, timeout=max(0.1, deadline - time.monotonic()))
            seen.append(message)
            if predicate(message):
                return seen

    def send(self, message: typing.Any) -> None:
        payload = json.dumps([json.dumps(message) if not isinstance(message, str) else message])
        if self.transport == "websocket":
            self.ws.send(payload)
        else:
            request = urllib.request.Request(self._send_url, data=payload.encode(), method="POST",
                                             headers={"Content-Type": "text/plain"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 204, response.status

    def close(self) -> None:
        try:
            if self.transport == "websocket":
                self.ws.close()
            elif self.http is not None:
                # Wake the reader thread first: closing a file another thread reads blocks.
                if self.http.sock is not None:
                    self.http.sock.shutdown(socket.SHUT_RDWR)
                self.http.close()
        except OSError:
            pass
