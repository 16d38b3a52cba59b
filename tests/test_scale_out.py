"""Scale-out: three proxy instances behind Debian's nginx (deploy/nginx.conf.example), one broker.

Each instance reads every topic itself, so any of them can serve any screen; nginx keeps a SockJS
session on one instance and spreads everything else. Export files live in one folder that every
instance serves, so a URL handed out by one instance downloads through any other.
"""

from __future__ import annotations

import collections
import http.client
import json
import socket
import threading
import time
import typing
import urllib.request
import uuid

import pandas
import pytest
import websocket

from proxy.config import ConfigError, parse_config
from proxy.demo.balancer import INSTALL_HINT, NginxBalancer, nginx_binary
from proxy.policy import merchant_id_for
from proxy.testing import ProxyProcess, produce, unique_topics, wait_until

pytestmark = pytest.mark.skipif(nginx_binary() is None, reason=f"nginx is not installed; {INSTALL_HINT}")

INSTANCES = 3
SCREENS_PER_TRANSPORT = 100
TRANSPORTS = ("websocket", "xhr_streaming", "xhr")
# Heartbeats every second keep every transport's reads short, so screens notice a stop quickly
# and an xhr poll never waits long.
LIVE = {"heartbeat_interval": 1.0}
READ_TIMEOUT = 10.0
TOKENS = ("ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7",
          "Zq3sT9vLwB2nXc8RkYh4MfJ7uPaD1eGi6oNt5rVy0bQmWzEsKlHdCxAgIjUpOF3x")


class SessionEnded(Exception):
    """The server or nginx ended the SockJS session (closed, stream ended, lost session, error status)."""


class Screen(threading.Thread):
    """One live screen through nginx: a SockJS session that is replaced by a new one when it ends,
    as the live page does. Records each session's history burst and every live message."""

    def __init__(self, port: int, transport: str):
        super().__init__(daemon=True)
        self.port = port
        self.transport = transport
        self.bursts: list[list[typing.Any]] = []  # one per session: the history's values
        self.live: list[typing.Any] = []
        self.ended: list[str] = []  # why each replaced session ended
        self.stopping = threading.Event()
        self.recent: list[tuple[float, str]] = []  # the last few (time, frame), to explain a failure

    def run(self) -> None:
        while not self.stopping.is_set():
            url = f"/live/000/{uuid.uuid4().hex[:12]}"
            try:
                for frame in self._frames(url):
                    if self.stopping.is_set():
                        return
                    self.recent.append((time.monotonic(), f"{url[-12:]}: {frame[:30]}"))
                    del self.recent[:-8]
                    self._take(frame)
            except (SessionEnded, OSError, http.client.HTTPException, websocket.WebSocketException) as exc:
                if not self.stopping.is_set():
                    self.ended.append(f"{type(exc).__name__}: {exc}")

    def describe(self) -> str:
        now = time.monotonic()
        recent = ", ".join(f"{frame} ({now - at:.1f} s ago)" for at, frame in self.recent)
        return (f"{self.transport} screen: {len(self.bursts)} histories, {len(self.live)} live messages, "
                f"sessions ended: {self.ended[-3:]}, last frames: {recent}")

    def _frames(self, url: str) -> typing.Iterator[str]:
        if self.transport == "websocket":
            ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}{url}/websocket", timeout=READ_TIMEOUT)
            try:
                while True:
                    frame = ws.recv()
                    if not frame:
                        raise SessionEnded("websocket closed")
                    yield frame
            finally:
                ws.close()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=READ_TIMEOUT)
        try:
            if self.transport == "xhr_streaming":
                connection.request("POST", f"{url}/xhr_streaming", body=b"")
                response = connection.getresponse()
                if response.status != 200:
                    raise SessionEnded(f"xhr_streaming answered {response.status}")
                while line := response.readline():
                    yield line.decode().rstrip("\n")
                raise SessionEnded("stream ended")
            opened = False
            while True:
                connection.request("POST", f"{url}/xhr", body=b"")
                response = connection.getresponse()
                frame = response.read().decode().rstrip("\n")
                if response.status != 200:
                    raise SessionEnded(f"xhr poll answered {response.status}")
                if frame == "o":
                    if opened:
                        # Another instance answered for a session it never had: sockjs-client
                        # closes with 1006 "Server lost session" here.
                        raise SessionEnded("server lost the session")
                    opened = True
                yield frame
        finally:
            connection.close()

    def _take(self, frame: str) -> None:
        if frame[:1] in ("o", "h", ""):
            return  # open, heartbeat (and the xhr-streaming prelude of h's)
        if frame[0] == "c":
            raise SessionEnded(f"closed by the server: {frame[1:]}")
        for text in json.loads(frame[1:]):
            message = json.loads(text)
            if message["type"] == "history":
                self.bursts.append([envelope["value"] for envelope in message["messages"]])
            elif message["type"] == "message":
                self.live.append(message["message"]["value"])


def start_instances(start_proxy: typing.Callable[..., ProxyProcess], bootstrap: str,
                    config: dict[str, typing.Any], tmp_path: typing.Any) -> list[ProxyProcess]:
    """INSTANCES proxies on their own ports, all on the same (shared) data folder."""
    shared = dict(config, data_dir=str(tmp_path / "shared-data"), live=LIVE)
    proxies = [start_proxy(bootstrap, shared, wait_healthy=False) for _ in range(INSTANCES)]
    for proxy in proxies:
        wait_until(lambda: proxy.get("/health")[0] == 200, 30, message=f"/health 200 on {proxy.base}")
    return proxies


@pytest.fixture
def balancer(tmp_path: typing.Any) -> typing.Iterator[typing.Callable[[list[ProxyProcess]], NginxBalancer]]:
    """balancer(proxies) starts nginx in front of them; stopped at teardown."""
    started: list[NginxBalancer] = []

    def start(proxies: list[ProxyProcess]) -> NginxBalancer:
        nginx = NginxBalancer([proxy.port for proxy in proxies], str(tmp_path / f"nginx-{len(started)}"))
        started.append(nginx)
        return nginx.start()

    yield start
    for nginx in started:
        nginx.stop()


def session_counts(proxies: list[ProxyProcess]) -> list[int]:
    return [proxy.get("/status")[1]["sessions"] for proxy in proxies]


@pytest.mark.timeout(120)
def test_300_screens_over_three_transports_get_every_message_and_only_a_killed_instances_reconnect(
        broker, start_proxy, balancer, tmp_path):
    (topic,) = unique_topics("scaled")
    broker.create_topics([topic])
    earlier = [{"n": n, "phase": "history"} for n in range(5)]
    produce(broker.bootstrap_servers, topic, earlier)
    proxies = start_instances(start_proxy, broker.bootstrap_servers, {"topics": [topic]}, tmp_path)
    nginx = balancer(proxies)
    screens = [Screen(nginx.port, transport) for transport in TRANSPORTS for _ in range(SCREENS_PER_TRANSPORT)]
    try:
        for screen in screens:
            screen.start()
        wait_until(lambda: all(screen.bursts for screen in screens), 30, message="every screen's history burst")
        assert all(screen.bursts == [earlier] for screen in screens), "a screen got a wrong or second history"
        counts = wait_until(lambda: sum(counts := session_counts(proxies)) == len(screens) and counts, 15,
                            message="300 sessions on the instances")
        assert min(counts) >= len(screens) // 10, f"sessions are not spread over the instances: {counts}"

        live = [{"n": n, "phase": "live"} for n in range(20)]
        produce(broker.bootstrap_servers, topic, live)
        wait_until(lambda: all(len(screen.live) >= len(live) for screen in screens), 30,
                   message="every screen to get every live message")
        assert all(screen.live == live for screen in screens)

        # Kill one instance outright: its sessions end, the others' must not notice.
        killed = proxies[0]
        on_killed = session_counts([killed])[0]
        killed.process.kill()
        killed.process.wait(10)
        wait_until(lambda: sum(len(screen.bursts) == 2 for screen in screens) == on_killed, 30, interval=0.2,
                   message=f"the {on_killed} screens of the killed instance to reconnect and get the history again")
        reconnected = [screen for screen in screens if len(screen.bursts) == 2]
        assert all(len(screen.bursts) <= 2 for screen in screens)
        assert all(screen.bursts[1] == earlier + live for screen in reconnected), "a reconnect got a wrong history"
        assert {screen.transport for screen in reconnected} == set(TRANSPORTS)
        survivors = [screen for screen in screens if len(screen.bursts) == 1]
        assert all(not screen.ended for screen in survivors), [s.ended for s in survivors if s.ended][:3]
        # Sessions nginx sent to a survivor for a moment, before it knew the instance was gone,
        # expire there by themselves.
        wait_until(lambda: sum(session_counts(proxies[1:])) == len(screens), 30, interval=0.2,
                   message="every screen to have exactly one session on the surviving instances")

        later = [{"n": n, "phase": "after the kill"} for n in range(5)]
        produce(broker.bootstrap_servers, topic, later)
        try:
            wait_until(lambda: all(len(screen.live) >= len(live) + len(later) for screen in screens), 30,
                       message="every screen to get the messages produced after the kill")
        except AssertionError as missed:
            short = [screen.describe() for screen in screens if len(screen.live) < len(live) + len(later)]
            raise AssertionError(f"{missed}: {len(short)} short, e.g. {short[:3]}") from None
        assert all(screen.live == live + later for screen in survivors)
        assert all(screen.live[-len(later):] == later for screen in reconnected)
        for proxy in proxies[1:]:
            assert "Traceback" not in proxy.log(), proxy.log()[-3000:]
    finally:
        for screen in screens:
            screen.stopping.set()
        for screen in screens:
            screen.join(READ_TIMEOUT + 5)


@pytest.mark.timeout(90)
def test_exports_through_nginx_download_through_nginx_whichever_instance_answers(
        broker, start_proxy, balancer, tmp_path):
    (topic,) = unique_topics("sales")
    broker.create_topics([topic], partitions=2)
    merchants = [merchant_id_for(token) for token in TOKENS]
    sales = [{"offer_id": n, "price": 10.0 + n, "amount": 1, "merchant_id": merchants[n % 2], "http_code": 200,
              "timestamp": f"2018-03-16T10:{n:02d}:00.000Z"} for n in range(40)]
    # Distinct record timestamps: exports are ordered by them across partitions.
    produce(broker.bootstrap_servers, topic, sales, timestamps=[1_521_194_400_000 + 60_000 * n for n in range(40)])
    columns = ["offer_id", "price", "amount", "merchant_id", "http_code", "timestamp"]
    export = {"topics": {topic: {"policy": "owner", "columns": columns}}}
    proxies = start_instances(start_proxy, broker.bootstrap_servers, {"topics": [topic], "export": export}, tmp_path)
    nginx = balancer(proxies)
    host = nginx.base

    # The merchant SDK's way, verbatim, through the balancer: no token on the file GET, no stickiness.
    downloads = []
    for round_ in range(2 * INSTANCES):
        token = TOKENS[round_ % 2]
        request = urllib.request.Request(host + f"/export/data/{topic}", headers={"Authorization": "Token " + token})
        with urllib.request.urlopen(request, timeout=30) as response:
            url = json.loads(response.read())["url"]
        assert url.startswith("data/") and url.endswith(".csv")
        frame = pandas.read_csv(host + "/" + url, parse_dates=["timestamp"])
        downloads.append((token, url, frame))

    for token, _, frame in downloads:
        own = [sale for sale in sales if sale["merchant_id"] == merchant_id_for(token)]
        assert list(frame.columns) == columns
        assert frame["offer_id"].tolist() == [sale["offer_id"] for sale in own]
        assert set(frame["merchant_id"]) == {merchant_id_for(token)}
    # Exports were answered by more than one instance, and each file is there for every instance.
    exported_by = [_metric(proxy, "proxy_export_requests_total", f'topic="{topic}"') for proxy in proxies]
    assert sum(count > 0 for count in exported_by) >= 2, f"every export went to one instance: {exported_by}"
    for _, url, _ in downloads:
        assert all(proxy.get("/" + url)[0] == 200 for proxy in proxies), f"{url} is not served by every instance"


def _metric(proxy: ProxyProcess, name: str, label: str) -> float:
    """Sum of a Prometheus metric's samples whose labels contain label."""
    total = 0.0
    for line in proxy.get("/metrics")[1].splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_and_status_name_the_instance_that_answered(broker, start_proxy, balancer, tmp_path):
    (topic,) = unique_topics("named")
    broker.create_topics([topic])
    proxies = start_instances(start_proxy, broker.bootstrap_servers, {"topics": [topic]}, tmp_path)
    named = start_proxy(broker.bootstrap_servers, {"topics": [topic], "instance_id": "web-3.example:proxy-a"})
    nginx = balancer(proxies)

    expected = {f"{socket.gethostname()}:{proxy.port}" for proxy in proxies}
    assert {proxy.get("/health")[1]["instance"] for proxy in proxies} == expected
    assert {proxy.get("/status")[1]["instance"] for proxy in proxies} == expected
    assert named.get("/health")[1]["instance"] == named.get("/status")[1]["instance"] == "web-3.example:proxy-a"
    # Through the balancer, requests other than live sessions go to every instance in turn.
    answers = collections.Counter()
    for _ in range(3 * INSTANCES):
        with urllib.request.urlopen(nginx.base + "/health", timeout=10) as response:
            answers[json.loads(response.read())["instance"]] += 1
    assert set(answers) == expected


@pytest.mark.parametrize("value", ["", "has space", "x" * 65, "a/b", 42])
def test_a_bad_instance_id_is_a_configuration_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="'instance_id'"):
        parse_config({"instance_id": value}, source="config.yaml")
