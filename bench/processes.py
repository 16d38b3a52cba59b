"""The processes of a fan-out benchmark: the proxy, a producer, the load clients; CPU per process.

Every process is a child of the benchmark, on loopback only, started with a deadline and stopped
by its pid (SIGTERM, then SIGKILL) in a finally block.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)

from proxy import testing  # noqa: E402
from proxy.demo.broker import terminate  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ENV = dict(os.environ, PYTHONPATH=REPO)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ProxyProcess(testing.ProxyProcess):
    """The tests' proxy process (python -m proxy with a YAML config), plus its Prometheus counters."""

    def __init__(self, bootstrap: str, topics: list[str], env: dict[str, str] | None = None):
        self.workdir = tempfile.mkdtemp(prefix="bench-proxy-")
        # The production defaults, except for the topics and a quiet log.
        super().__init__(bootstrap, {"topics": topics, "log_level": "WARNING", "topic_refresh_interval": 2.0},
                         self.workdir, env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {name: value}, labelled samples summed by name."""
        values: dict[str, float] = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                name = name.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
        return values

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class LoadClients:
    """bench/sockjs_load.py in a child process: N websocket clients that count what they get."""

    def __init__(self, port: int, clients: int, sample: int = 0, prefix: str = "/live"):
        self.args = [sys.executable, os.path.join(BENCH, "sockjs_load.py"), "--port", str(port),
                     "--clients", str(clients), "--sample", str(sample), "--prefix", prefix]
        self.process: subprocess.Popen | None = None
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "LoadClients":
        self.process = subprocess.Popen(self.args, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._line(60)
        return self

    def ask(self, command: str, timeout: float = 30.0) -> dict:
        """Send one command and return its JSON answer."""
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return json.loads(self._line(timeout))

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError(f"load clients did not answer within {timeout}s (exit code {self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.write(b"STOP\n")
                self.process.stdin.flush()
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        terminate(self.process, 10.0)


class ProducerProcess:
    """bench/producer.py in a child process; set_rate() changes its pace."""

    def __init__(self, bootstrap: str, topic: str, rate: float, duration: float = 120.0, linger_ms: float = 2.0):
        self.args = [sys.executable, os.path.join(BENCH, "producer.py"), "--bootstrap", bootstrap, "--topic", topic,
                     "--rate", str(rate), "--duration", str(duration), "--linger-ms", str(linger_ms)]
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "ProducerProcess":
        self.process = subprocess.Popen(self.args, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def set_rate(self, rate: float) -> None:
        self.process.stdin.write(f"RATE {rate}\n")
        self.process.stdin.flush()

    def result(self) -> dict:
        """Stop producing and return {"produced", "seconds"}."""
        self.process.stdin.write("STOP\n")
        self.process.stdin.flush()
        out, _ = self.process.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        terminate(self.process, 10.0)


class CpuMeter:
    """CPU seconds per named process between start() and stop(), as a share of the wall time."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def start(self) -> None:
        self._started = time.monotonic()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._started
        return {name: (cpu_seconds(pid) - self._before[name]) / wall for name, pid in self.pids.items()}


def format_cpu(shares: dict[str, float]) -> str:
    return ", ".join(f"{name} {share * 100:.0f}%" for name, share in shares.items()) + \
        f" (of {os.cpu_count()} cores = {os.cpu_count() * 100}%)"
