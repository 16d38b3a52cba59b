"""Debian's nginx in front of several proxy instances, configured by deploy/nginx.conf.example.

For the scale-out test and benchmark: the shipped example is what runs, with only its ports
replaced, so a broken example fails them. nginx runs in the foreground as our child, with its pid,
logs and temporary files in a folder of its own, on loopback only.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import typing

from proxy.demo.broker import die_with_parent, free_port, terminate

EXAMPLE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "deploy", "nginx.conf.example")
INSTALL_HINT = "install Debian's nginx: apt-get install -y --no-install-recommends nginx"
# The instance lines of an upstream block, e.g. "    server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;".
UPSTREAM_SERVERS = re.compile(r"^(?P<indent>[ \t]*)server 127\.0\.0\.1:\d+(?P<options>[^;\n]*);\n"
                              r"(?:[ \t]*server 127\.0\.0\.1:\d+[^;\n]*;\n)*", re.MULTILINE)
LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen 80;", re.MULTILINE)


class BalancerError(RuntimeError):
    """nginx is missing, or did not start."""


def nginx_binary() -> str | None:
    """Path of the nginx binary; Debian puts it in /usr/sbin, which is not on every PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def site_config(listen_port: int, instance_ports: typing.Sequence[int], example: str = EXAMPLE_CONFIG) -> str:
    """The example's http-context configuration, listening on listen_port in front of instance_ports."""
    with open(example, encoding="utf-8") as handle:
        text = handle.read()

    def servers(match: re.Match[str]) -> str:
        return "".join(f"{match['indent']}server 127.0.0.1:{port}{match['options']};\n" for port in instance_ports)

    text, upstreams = UPSTREAM_SERVERS.subn(servers, text)
    text, listens = LISTEN.subn(lambda match: f"{match['indent']}listen 127.0.0.1:{listen_port};", text)
    if (upstreams, listens) != (2, 1):
        raise BalancerError(f"{example}: expected 2 upstream blocks of 127.0.0.1 servers and one 'listen 80;', "
                            f"found {upstreams} and {listens}")
    return text


class NginxBalancer:
    """nginx (master and workers) on a free loopback port, balancing over the given proxy ports."""

    def __init__(self, instance_ports: typing.Sequence[int], workdir: str, worker_processes: int = 1):
        self.instance_ports = list(instance_ports)
        self.workdir = workdir
        self.worker_processes = worker_processes
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> str:
        return os.path.join(self.workdir, "error.log")

    def main_config(self) -> str:
        """nginx.conf around the site: foreground, everything under workdir, no access log."""
        folder = self.workdir
        # As root the workers would run as "nobody", who cannot enter a private temporary folder.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(f"    {kind}_temp_path {os.path.join(folder, kind)};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"daemon off;\nmaster_process on;\n{user}worker_processes {self.worker_processes};\n"
                f"worker_rlimit_nofile 16384;\npid {os.path.join(folder, 'nginx.pid')};\n"
                f"error_log {self.error_log} warn;\n"
                "events {\n    worker_connections 8192;\n}\n"
                "http {\n    access_log off;\n" + temp_paths +
                f"    include {os.path.join(folder, 'kafka-reverse-proxy.conf')};\n}}\n")

    def start(self, timeout: float = 10.0) -> "NginxBalancer":
        binary = nginx_binary()
        if binary is None:
            raise BalancerError(f"nginx is not installed; {INSTALL_HINT}")
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, "kafka-reverse-proxy.conf"), "w", encoding="utf-8") as handle:
            handle.write(site_config(self.port, self.instance_ports))
        config = os.path.join(self.workdir, "nginx.conf")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(self.main_config())
        # -e: nginx opens its error log before reading the configuration; keep that one here too.
        with open(os.path.join(self.workdir, "nginx.out"), "ab") as output:
            self.process = subprocess.Popen([binary, "-p", self.workdir, "-c", config, "-e", self.error_log],
                                            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent)
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BalancerError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise BalancerError(f"nginx not listening on {self.port} after {timeout}s:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        text = ""
        for name in ("nginx.out", "error.log"):
            try:
                with open(os.path.join(self.workdir, name), errors="replace") as handle:
                    text += handle.read()
            except FileNotFoundError:
                pass
        return text

    def pids(self) -> list[int]:
        """The master's pid, then its workers' (for CPU accounting)."""
        if self.process is None:
            return []
        master = self.process.pid
        try:
            with open(f"/proc/{master}/task/{master}/children") as handle:
                workers = [int(pid) for pid in handle.read().split()]
        except FileNotFoundError:
            workers = []
        return [master, *workers]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (nginx's fast shutdown: the workers end too), SIGKILL if it lingers."""
        process, self.process = self.process, None
        terminate(process, timeout)

    def __enter__(self) -> "NginxBalancer":
        return self.start()

    def __exit__(self, *exc_info: typing.Any) -> None:
        self.stop()
