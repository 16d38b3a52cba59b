"""The processes of a benchmark: the proxy, producers, load clients; CPU, memory, descriptors per process.

Every process is a child of the benchmark, on loopback only, started with a deadline and stopped
by its pid (SIGTERM, then SIGKILL) in a finally block.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)

from proxy import testing  # noqa: E402
from proxy.config import default_topics  # noqa: E402
from proxy.demo.broker import terminate  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ENV = dict(os.environ, PYTHONPATH=REPO)
# Tansu answers a fetch only when fetch.wait.max.ms has passed, even with data waiting (see
# /work/shared/test-broker.md, item 7), so every benchmark sets the short wait a live consumer on
# Tansu needs, whatever the product default is. bench/idle.py measures what it costs.
TANSU_FETCH_WAIT_MS = 10
# Tansu's in-memory log slows down with the number of batches per partition: a realistic linger
# (librdkafka's default) keeps batches few; every step uses a fresh broker as well.
LINGER_MS = 5.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """Resident set size now (VmRSS) and its peak over the process's life (VmHWM), in KiB."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split()[:2]
                    figures[name[:-1]] = int(value)
    except FileNotFoundError:
        pass
    return {"rss": figures.get("VmRSS", 0), "peak": figures.get("VmHWM", 0)}


def open_descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def log_problems(lines: typing.Iterable[str]) -> list[str]:
    """The proxy's log lines that report a problem: warnings, errors, tracebacks.

    /health answers 503 (logged as an error) until the history is loaded: that is no problem.
    """
    return [line for line in lines if (" WARNING " in line or " ERROR " in line or "Traceback" in line)
            and "path=/health " not in line]


class ProxyProcess(testing.ProxyProcess):
    """The tests' proxy process (python -m proxy with a YAML config), plus its Prometheus counters.

    The configuration is the shipped one (the 13 Price Wars topics, every default) except for the
    listener, a quiet log, the Tansu fetch wait and what `config` overrides.
    """

    def __init__(self, bootstrap: str, topics: list[str] | None = None, env: dict[str, str] | None = None,
                 config: dict[str, typing.Any] | None = None, fetch_wait_ms: int | None = TANSU_FETCH_WAIT_MS):
        self.workdir = tempfile.mkdtemp(prefix="bench-proxy-")
        settings: dict[str, typing.Any] = {"topics": topics or default_topics(), "log_level": "WARNING",
                                           "topic_refresh_interval": 2.0}
        settings.update(config or {})
        super().__init__(bootstrap, settings, self.workdir, env=env, fetch_wait_ms=fetch_wait_ms)
        self.problems: list[str] = []  # the log's warnings and errors, read when it stops

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

    def suspend(self) -> None:
        """SIGSTOP: the proxy reads nothing while a backlog is produced."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
        super().stop()
        # What the proxy complained about outlives its working folder: benchmarks report it.
        try:
            lines = self.log().splitlines()
        except OSError:
            lines = []
        self.problems = log_problems(lines)
        shutil.rmtree(self.workdir, ignore_errors=True)


class LineProcess:
    """A child that answers one JSON line per command on stdin (the load clients, the producer)."""

    args: list[str]
    process: subprocess.Popen
    # Scheduling priority of the child (os.nice increment); see LoadClients.
    niceness = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def launch(self) -> None:
        """Start the child without waiting for it (several load processes start together)."""
        self._buffer = b""
        niceness = self.niceness
        self.process = subprocess.Popen(self.args, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        preexec_fn=(lambda: os.nice(niceness)) if niceness else None)

    def wait_ready(self, timeout: float) -> None:
        ready = self.line(timeout)
        if not ready.startswith("READY"):
            raise RuntimeError(f"{os.path.basename(self.args[1])} said {ready!r} instead of READY")

    def _spawn(self, args: list[str], ready_timeout: float) -> None:
        self.args = args
        self.launch()
        self.wait_ready(ready_timeout)

    def send(self, command: str) -> None:
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def ask(self, command: str, timeout: float = 30.0) -> dict:
        """Send one command and return its JSON answer."""
        self.send(command)
        return json.loads(self.line(timeout))

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError(f"{self.__class__.__name__} did not answer within {timeout}s "
                                   f"(exit code {self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def stop(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            try:
                self.send("STOP")
                process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        terminate(process, 10.0)


class LoadClients(LineProcess):
    """bench/sockjs_load.py in a child process: N SockJS sessions of one transport that count what they get.

    The clients stand for browsers on other machines: they run at a lower priority (nice 10), so
    that on this 2-core host eight of them do not take the proxy's share of the CPU (the kernel
    shares it per process; a saturated machine otherwise measures the scheduler, not the proxy).
    What they could not read in time still shows: as latency, and in their own CPU figure.
    """

    niceness = 10

    def __init__(self, port: int, clients: int, sample: int = 0, prefix: str = "/live", transport: str = "websocket",
                 connect_rate: float = 0.0, histories: int = 0, wait_for_go: bool = False,
                 tokens: list[str] | None = None):
        """tokens: token mode, client i authenticates with tokens[i % len(tokens)] (websocket only)."""
        self.clients = clients
        self.transport = transport
        self.args = [sys.executable, os.path.join(BENCH, "sockjs_load.py"), "--port", str(port),
                     "--clients", str(clients), "--sample", str(sample), "--prefix", prefix,
                     "--transport", transport, "--connect-rate", str(connect_rate), "--histories", str(histories)]
        if wait_for_go:
            self.args.append("--wait-for-go")
        if tokens:
            self.args += ["--tokens", ",".join(tokens)]

    def start(self, timeout: float = 60.0) -> "LoadClients":
        self._spawn(self.args, timeout)
        return self


class ProducerProcess(LineProcess):
    """bench/producer.py in a child process; set_rate() changes its pace, result() ends it.

    topic (+ shape): every record into one topic; topics: each record into its simulator topic.
    owners: merchant ids the records get in turn (record i: owners[i % len(owners)]).
    """

    def __init__(self, bootstrap: str, topic: str | None, rate: float, duration: float = 120.0,
                 linger_ms: float = LINGER_MS, shape: str | None = None, topics: list[str] | None = None,
                 count: int | None = None, merchant_token: str | None = None, topic_suffix: str = "",
                 owners: list[str] | None = None):
        self.args = [sys.executable, os.path.join(BENCH, "producer.py"), "--bootstrap", bootstrap,
                     "--rate", str(rate), "--duration", str(duration), "--linger-ms", str(linger_ms)]
        self.args += ["--topic", topic] if topic else ["--topics", ",".join(topics or default_topics())]
        if shape:
            self.args += ["--shape", shape]
        if count is not None:
            self.args += ["--count", str(count)]
        if merchant_token:
            self.args += ["--merchant-token", merchant_token]
        if topic_suffix:
            self.args += [f"--topic-suffix={topic_suffix}"]
        if owners:
            self.args += ["--owners", ",".join(owners)]

    def start(self) -> "ProducerProcess":
        self._spawn(self.args, 60.0)
        return self

    def set_rate(self, rate: float) -> None:
        self.send(f"RATE {rate}")

    def result(self, timeout: float = 90.0, stop: bool = True) -> dict:
        """Its summary once every record is acked: after STOP, or (stop=False) once it reached its count."""
        if stop and self.process.poll() is None:
            try:
                self.send("STOP")
            except OSError:
                pass  # it finished its count and exited meanwhile
        return json.loads(self.line(timeout))


class CpuMeter:
    """CPU seconds per named process between start() and stop(), as a share of the wall time."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def start(self) -> "CpuMeter":
        self._started = time.monotonic()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def seconds(self) -> dict[str, float]:
        """CPU seconds used by each process since start()."""
        return {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._started
        return {name: used / wall for name, used in self.seconds().items()}


class Profiler:
    """py-spy on a process while a step is measured, when BENCH_PROFILE names a folder (else nothing).

    Writes collapsed stacks (py-spy's raw format) to BENCH_PROFILE/<name>.txt; py-spy must be
    installed (`.venv/bin/pip install py-spy`) and allowed to read the process (root, or ptrace).
    """

    def __init__(self, pid: int, name: str):
        folder = os.environ.get("BENCH_PROFILE")
        self.path = os.path.join(folder, f"{name}.txt") if folder else None
        self.pid = pid
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Profiler":
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            # BENCH_PROFILE_GIL=1: only samples that hold the GIL (Python CPU, not waits).
            gil = ["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else []
            self.process = subprocess.Popen([spy, "record", "--pid", str(self.pid), "--rate", "200", "--threads", *gil,
                                             "--nonblocking", "--format", "raw", "-o", self.path],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc_info: typing.Any) -> None:
        if self.process is not None:
            # py-spy writes its output on SIGINT.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                terminate(self.process)
            print(f"  profile: {self.path}")


def machine_speed(repeats: int = 5, operations: int = 20_000) -> float:
    """CPU µs per reference operation (decode a simulator buyOffer record, read a field, encode
    it), the fastest of `repeats` rounds: how fast this machine is at the moment. This shared
    host's speed varies by up to 2 x from hour to hour, every process's alike; figures from runs at
    different speeds compare only through it (or through ratios measured in the same run)."""
    import orjson

    from bench.producer import realistic_values

    record, best = realistic_values(1, shape="buyOffer")[0], float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        for _ in range(operations):
            value = orjson.loads(record)
            if value["http_code"] == 200:
                orjson.dumps(value)
        best = min(best, time.thread_time() - started)
    return 1e6 * best / operations


class MachineCpu:
    """The whole machine's busy CPU between start() and stop(), in cores (others' work included)."""

    @staticmethod
    def _ticks() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def start(self) -> "MachineCpu":
        self._busy, self._total = self._ticks()
        return self

    def stop(self) -> float:
        busy, total = self._ticks()
        return (os.cpu_count() or 1) * (busy - self._busy) / max(total - self._total, 1)


class ResourceSampler:
    """Samples a process's RSS and open descriptors in a thread: before, peak and now."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.interval = interval
        self.before = {"rss_kib": memory_kib(pid)["rss"], "fds": open_descriptors(pid)}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> "ResourceSampler":
        self._thread.start()
        return self

    def now(self) -> dict[str, int]:
        return {"rss_kib": memory_kib(self.pid)["rss"], "fds": open_descriptors(self.pid)}

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for name, value in self.now().items():
                self.peak[name] = max(self.peak[name], value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def group_cpu(cpu: dict[str, float], prefix: str) -> dict[str, float]:
    """CPU shares with the processes whose name starts with prefix summed into one entry."""
    merged: dict[str, float] = {}
    for name, share in cpu.items():
        key = prefix if name.startswith(prefix) else name
        merged[key] = merged.get(key, 0.0) + share
    return merged


def cpu_summary(shares: dict[str, float], machine: float | None = None) -> dict[str, float]:
    """Our processes' CPU shares plus, when the machine's busy time is known, what everything else
    on it (other people's work) used meanwhile: a figure taken on a busy machine says so."""
    summary = dict(shares)
    if machine is not None:
        summary["others"] = max(0.0, machine - sum(shares.values()))
    return summary


def format_cpu(shares: dict[str, float]) -> str:
    return ", ".join(f"{name} {share * 100:.0f}%" for name, share in shares.items()) + \
        f" (of {os.cpu_count()} cores = {os.cpu_count() * 100}%)"
