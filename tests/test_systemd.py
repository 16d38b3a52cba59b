"""Running under systemd: the unit file, and the sd_notify readiness, stopping and watchdog messages."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import typing
import uuid

import pytest

from proxy.demo.broker import TansuBroker, free_port
from proxy.cli import parse_args
from proxy.systemd import SystemdNotifier
from proxy.testing import REPO, unique_topics, wait_until

UNIT_PATH = os.path.join(REPO, "deploy", "kafka-reverse-proxy.service")
TEMPLATE_PATH = os.path.join(REPO, "deploy", "kafka-reverse-proxy@.service")
INSTALLED_PROXY = "/opt/kafka-reverse-proxy/.venv/bin/kafka-reverse-proxy"
# Debian's systemd package; CI installs it when missing.
SYSTEMD_ANALYZE_HINT = "install it with: apt-get install -y --no-install-recommends systemd"


class NotifySocket:
    """Stands in for systemd's notify socket: a bound AF_UNIX datagram socket that records messages."""

    def __init__(self, address: str | bytes):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(address)
        # (monotonic arrival time, the datagram's KEY=VALUE assignments)
        self.received: list[tuple[float, list[str]]] = []

    @property
    def env_value(self) -> str:
        """The address as systemd writes it into $NOTIFY_SOCKET."""
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def drain(self) -> list[list[str]]:
        """Every datagram that arrived since the last drain()."""
        new = []
        while True:
            try:
                datagram = self.sock.recv(4096)
            except BlockingIOError:
                break
            new.append(datagram.decode().split("\n"))
            self.received.append((time.monotonic(), new[-1]))
        return new

    def wait_for(self, assignment: str, timeout: float = 20.0) -> None:
        """Poll until a datagram with this assignment has arrived (now or earlier)."""
        wait_until(lambda: self.count(assignment) > 0, timeout, message=f"{assignment} on the notify socket")

    def count(self, assignment: str) -> int:
        """How many datagrams so far carried this assignment (reading the pending ones first)."""
        self.drain()
        return sum(assignments.count(assignment) for _, assignments in self.received)

    def arrival_times(self, assignment: str) -> list[float]:
        return [at for at, assignments in self.received if assignment in assignments]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> typing.Iterator[NotifySocket]:
    """A notify socket at a short filesystem path (sun_path is limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdnotify-") as folder:
        listener = NotifySocket(os.path.join(folder, "notify"))
        try:
            yield listener
        finally:
            listener.close()


@pytest.fixture
def abstract_notify_socket() -> typing.Iterator[NotifySocket]:
    """A notify socket in the abstract namespace ($NOTIFY_SOCKET=@name), as systemd uses."""
    listener = NotifySocket(b"\0kafka-reverse-proxy-test-" + uuid.uuid4().hex.encode())
    try:
        yield listener
    finally:
        listener.close()


def read_unit(path: str) -> dict[str, list[str]]:
    """The unit's "Section.Key" → values (keys may repeat), comments and blank lines dropped."""
    settings: dict[str, list[str]] = {}
    section = ""
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or ("/usr/bin/systemd-analyze"
                                               if os.access("/usr/bin/systemd-analyze", os.X_OK) else None)
    if path is None:
        pytest.fail(f"systemd-analyze is not installed; {SYSTEMD_ANALYZE_HINT}")
    return path


def unit_with_runnable_exec_start(folder: str, unit_path: str = UNIT_PATH, name: str | None = None) -> str:
    """A copy of the unit (named name) whose ExecStart runs this interpreter (verify insists the binary exists)."""
    with open(unit_path) as handle:
        lines = handle.readlines()
    exec_lines = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    assert len(exec_lines) == 1, "the unit should have exactly one ExecStart="
    (index,) = exec_lines
    prefix = f"ExecStart={INSTALLED_PROXY} "
    assert lines[index].startswith(prefix), f"ExecStart should run {INSTALLED_PROXY}"
    lines[index] = f"ExecStart={sys.executable} -m proxy " + lines[index][len(prefix):]
    copy = os.path.join(folder, name or os.path.basename(unit_path))
    with open(copy, "w") as handle:
        handle.writelines(lines)
    return copy


# ---- the unit file -------------------------------------------------------------------------


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    unit = unit_with_runnable_exec_start(str(tmp_path))

    result = subprocess.run([systemd_analyze(), "verify", unit], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))

    # verify exits 0 on unknown keys and bad values, and only prints them: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_file_hardening_keeps_the_exposure_level_ok(tmp_path):
    unit = unit_with_runnable_exec_start(str(tmp_path))

    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", unit],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))

    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_runs_the_proxy_as_a_notify_service_on_its_state_and_config_directories():
    unit = read_unit(UNIT_PATH)
    service = {key.split(".", 1)[1]: values for key, values in unit.items() if key.startswith("Service.")}

    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert int(service["WatchdogSec"][0]) > 0
    assert service["DynamicUser"] == ["yes"]
    assert service["EnvironmentFile"] == ["-/etc/kafka-reverse-proxy/env"]
    assert service["CapabilityBoundingSet"] == [""]
    assert unit["Install.WantedBy"] == ["multi-user.target"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0] == INSTALLED_PROXY
    args = parse_args(argv[1:])
    assert args.data_dir == "/var/lib/" + service["StateDirectory"][0]
    assert args.config == f"/etc/{service['ConfigurationDirectory'][0]}/config.yaml"


# ---- the template unit: several instances on one host ----------------------------------------


def test_template_unit_passes_systemd_analyze_verify_as_an_instance(tmp_path):
    unit = unit_with_runnable_exec_start(str(tmp_path), TEMPLATE_PATH, "kafka-reverse-proxy@8001.service")

    result = subprocess.run([systemd_analyze(), "verify", unit], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))

    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_template_unit_hardening_keeps_the_exposure_level_ok(tmp_path):
    unit = unit_with_runnable_exec_start(str(tmp_path), TEMPLATE_PATH, "kafka-reverse-proxy@8001.service")

    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", unit],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))

    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_template_unit_is_the_single_unit_with_one_port_per_instance():
    single, template = read_unit(UNIT_PATH), read_unit(TEMPLATE_PATH)
    differs = {"Unit.Description", "Service.ExecStart", "Service.User"}

    # The same hardening, limits and directories, so the two cannot drift apart.
    assert {k: v for k, v in template.items() if k not in differs} == \
        {k: v for k, v in single.items() if k not in differs}
    # One user for all instances: they share the state directory (the export folder).
    assert template["Service.User"] == ["kafka-reverse-proxy"] and template["Service.DynamicUser"] == ["yes"]
    single_args = parse_args(shlex.split(single["Service.ExecStart"][0])[1:])
    argv = shlex.split(template["Service.ExecStart"][0].replace("%i", "8002"))
    assert argv[0] == INSTALLED_PROXY
    args = parse_args(argv[1:])
    assert args.port == 8002
    assert (args.config, args.data_dir) == (single_args.config, single_args.data_dir)


# ---- SystemdNotifier on its own ------------------------------------------------------------


def test_notifier_speaks_to_an_abstract_namespace_socket(abstract_notify_socket):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": abstract_notify_socket.env_value})
    try:
        assert notifier.ready() and notifier.status("following 3 topics") and notifier.stopping()
    finally:
        notifier.close()

    assert abstract_notify_socket.drain() == [["READY=1"], ["STATUS=following 3 topics"], ["STOPPING=1"]]


def test_notifier_speaks_to_a_socket_path(notify_socket):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value})
    try:
        assert notifier.watchdog()
    finally:
        notifier.close()

    assert notify_socket.drain() == [["WATCHDOG=1"]]


def test_status_text_stays_one_assignment(abstract_notify_socket):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": abstract_notify_socket.env_value})
    try:
        notifier.status("Kafka unreachable:\nREADY=1")
    finally:
        notifier.close()

    assert abstract_notify_socket.drain() == [["STATUS=Kafka unreachable: READY=1"]]


def test_without_notify_socket_every_call_is_a_no_op():
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})

    assert not notifier.enabled
    assert not (notifier.ready() or notifier.status("x") or notifier.watchdog() or notifier.stopping())
    assert notifier.watchdog_interval() is None
    notifier.start_watchdog(lambda: True)  # no IOLoop needed: nothing to ping
    notifier.close()


def test_a_notify_socket_that_is_gone_is_logged_not_raised(caplog):
    with tempfile.TemporaryDirectory(prefix="sdnotify-") as folder:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": os.path.join(folder, "gone")})
        with caplog.at_level(logging.DEBUG, logger="proxy.systemd"):
            assert notifier.ready() is False
        notifier.close()

    assert any("READY=1" in record.getMessage() for record in caplog.records)


@pytest.mark.timeout(20)
def test_a_full_notify_queue_drops_messages_instead_of_blocking(abstract_notify_socket):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": abstract_notify_socket.env_value})
    try:
        # Nobody reads the socket: the queue fills, and then sends fail at once.
        sent = 0
        while notifier.watchdog():
            sent += 1
            assert sent < 1_000_000, "the notify queue never filled up"
    finally:
        notifier.close()

    assert sent > 0


@pytest.mark.parametrize("environ, interval", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_watched_process(environ, interval):
    notifier = SystemdNotifier(dict(environ, NOTIFY_SOCKET="@kafka-reverse-proxy-test"))

    assert notifier.watchdog_interval() == interval


def test_watchdog_pings_stop_while_unhealthy_and_resume_after(abstract_notify_socket):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": abstract_notify_socket.env_value, "WATCHDOG_USEC": "20000"})
    state = {"healthy": True, "checks": 0}

    def is_healthy() -> bool:
        state["checks"] += 1
        return state["healthy"]

    async def poll(predicate: typing.Callable[[], bool], message: str) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {message}"
            await asyncio.sleep(0.005)

    def pings() -> int:
        return abstract_notify_socket.count("WATCHDOG=1")

    async def scenario() -> None:
        notifier.start_watchdog(is_healthy)
        await poll(lambda: pings() >= 3, "three pings while healthy")
        state["healthy"] = False
        before, checks = pings(), state["checks"]
        await poll(lambda: state["checks"] >= checks + 5, "five health checks while unhealthy")
        assert pings() == before, "pinged the watchdog while unhealthy"
        state["healthy"] = True
        await poll(lambda: pings() > before, "pings to resume")

    try:
        asyncio.run(scenario())
    finally:
        notifier.close()


# ---- the proxy under a notify socket, against the real broker ----------------------------------


def test_notify_protocol_ready_then_stopping(broker, start_proxy, notify_socket):
    (topic,) = unique_topics("notified")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]}, wait_healthy=False,
                        env={"NOTIFY_SOCKET": notify_socket.env_value})

    notify_socket.wait_for("READY=1")
    status, body, _ = proxy.get("/health")
    assert (status, body["status"]) == (200, "ok"), "READY=1 before the history was loaded"

    exit_code = proxy.stop()
    notify_socket.wait_for("STOPPING=1", timeout=5)
    assert exit_code == 0
    assert notify_socket.count("READY=1") == 1
    assert notify_socket.arrival_times("READY=1")[0] < notify_socket.arrival_times("STOPPING=1")[0]


def test_ready_waits_for_the_initial_history_while_kafka_is_down(start_proxy, notify_socket):
    port = free_port()
    (topic,) = unique_topics("late")
    proxy = start_proxy(f"127.0.0.1:{port}", {"topics": [topic]}, wait_healthy=False,
                        env={"NOTIFY_SOCKET": notify_socket.env_value})
    # Listening, and it has tried Kafka and failed: a too-early READY=1 would be here by now.
    wait_until(lambda: "Kafka unreachable" in proxy.log(), 30, message="a failed attempt to reach Kafka")
    assert proxy.get("/health")[0] == 503
    assert notify_socket.count("READY=1") == 0, "READY=1 while Kafka was down"

    with TansuBroker(port=port):
        notify_socket.wait_for("READY=1", timeout=40)
        # Right after a reconnect, librdkafka may still report the outage for a moment ("degraded").
        assert proxy.get("/health")[1]["status"] != "starting", "READY=1 before the history was loaded"
        wait_until(lambda: proxy.get("/health")[0] == 200, 10, message="/health 200 after READY=1")
        assert proxy.stop() == 0


def test_watchdog_pings_when_watchdog_usec_is_set(broker, start_proxy, notify_socket):
    (topic,) = unique_topics("watched")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]},
                        env={"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "400000"})
    already = notify_socket.count("WATCHDOG=1")
    healthy_since = time.monotonic()

    # Every 0.2 s: wait for six more, which must be spread out, not one burst.
    wait_until(lambda: notify_socket.count("WATCHDOG=1") >= already + 6, 15, message="six watchdog pings after startup")
    times = [at for at in notify_socket.arrival_times("WATCHDOG=1") if at >= healthy_since]
    assert times[-1] - times[0] >= 0.6, times
    assert proxy.stop() == 0
