"""A normal (non-editable) install works from any directory: the page, its scripts, the defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from proxy.demo.broker import free_port, terminate
from proxy.testing import REPO, wait_until


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """The proxy's wheel, built from this checkout and unpacked into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), REPO], check=True, cwd=str(root))
    (wheel,) = (root / "dist").iterdir()
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, cwd=str(root))
    return str(site)


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def test_wheel_started_from_another_directory_serves_the_page_sockjs_and_shipped_defaults(
        installed, broker, tmp_path):
    port = free_port()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    log_path = tmp_path / "proxy.log"
    # -P keeps the working directory off sys.path; PYTHONPATH puts the installed copy first.
    env = dict(os.environ, PYTHONPATH=installed)
    env.pop("KAFKA_URL", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "proxy", "--kafka-url", broker.bootstrap_servers, "--port", str(port),
             "--data-dir", str(tmp_path / "data")],
            cwd=str(workdir), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return fetch(base + "/topics")[0] == 200
            except OSError:
                return False

        wait_until(answers, 20, message="the installed proxy to answer")
        status, page = fetch(base + "/")
        assert status == 200 and b"<html" in page.lower()
        status, script = fetch(base + "/static/vendor/sockjs.min.js")
        assert status == 200 and b"SockJS" in script
        status, info = fetch(base + "/live/info")
        assert status == 200 and b"websocket" in info
        status, topics = fetch(base + "/topics")
        assert b"marketSituation" in topics and topics.count(b",") == 12  # the 13 shipped topics
        text = log_path.read_text()
        assert "using the shipped defaults" in text
        assert installed in subprocess.run(
            [sys.executable, "-P", "-c", "import proxy; print(proxy.__file__)"], env=env, cwd=str(workdir),
            capture_output=True, text=True, check=True).stdout
    finally:
        terminate(process)
