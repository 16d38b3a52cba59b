"""--demo as a new user runs it: broker, market and proxy in one process tree, gone after Ctrl-C."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import typing

from proxy.demo.broker import free_port, terminate
from proxy.config import default_topics
from proxy.testing import REPO, SockJSClient, wait_until


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as handle:
            found.update(int(child) for child in handle.read().split())
    return found


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_demo_streams_13_histories_then_live_messages_and_ctrl_c_leaves_nothing(tmp_path):
    port = free_port()
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        demo = subprocess.Popen([sys.executable, "-m", "proxy", "--demo", "--port", str(port),
                                 "--data-dir", str(tmp_path / "data")],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=REPO),
                                # Only this test signals it (not whatever signals pytest's group).
                                start_new_session=True)
    try:
        try:
            run_demo_checks(demo, port, log_path)
        except BaseException as exc:
            raise AssertionError(f"demo check failed: {exc!r}\n--- demo log ---\n{log_path.read_text()}") from exc
    finally:
        terminate(demo)


def run_demo_checks(demo: subprocess.Popen, port: int, log_path: typing.Any) -> None:
    client = None
    try:
        wait_until(lambda: "Press Ctrl-C to stop." in log_path.read_text() or demo.poll() is not None, 30,
                   message="the demo banner")
        banner = log_path.read_text()
        assert f"http://127.0.0.1:{port}/" in banner and banner.count(": token ") == 3
        broker_pids = children_of(demo.pid)
        assert broker_pids, "the embedded broker runs as a child process"

        client = SockJSClient(f"http://127.0.0.1:{port}")
        histories = client.receive(13, timeout=20)
        assert [(m["type"], m["topic"]) for m in histories] == [("history", t) for t in default_topics()]
        live = client.receive(10, timeout=20)
        assert all(m["type"] == "message" for m in live)

        demo.send_signal(signal.SIGINT)
        assert demo.wait(10) == 0
        wait_until(lambda: not any(is_running(pid) for pid in broker_pids), 10, message="the broker to exit")
    finally:
        if client is not None:
            client.close()
