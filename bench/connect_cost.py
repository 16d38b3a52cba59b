"""The fast websocket upgrade's CPU per connect, in process: FastUpgrade.accept() timed alone.

A history burst's figure moves with the whole machine (load clients, broker, the host's speed);
changes of a few per cent to the connect path drown in it. This runs the proxy's application
(the shipped 13 topics, their histories loaded with synthetic Price Wars envelopes, no broker)
in this process, connects real loopback sockets one at a time and measures the thread's CPU time
of each FastUpgrade.accept(): parsing, routing, the handler, the 101, the SockJS session, the
history queued and written. The client's reads and the IOLoop's later work (the frame reader, the
close) are not counted. Compare two commits by alternating runs of each (PYTHONPATH=<a checkout>):
the medians differ by a few per cent run to run on this machine.

    PYTHONPATH=. python bench/connect_cost.py [--connects 300] [--rounds 5] [--history small|full]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.producer import realistic_values  # noqa: E402
from proxy.app import ProxyServer  # noqa: E402
from proxy.config import default_topics, parse_config  # noqa: E402
from proxy.listener import TrackedIOStream  # noqa: E402
from proxy.live import wire  # noqa: E402
from proxy.live.transports import LiveWebSocketTransport  # noqa: E402
from proxy.live.upgrade import FastUpgrade  # noqa: E402

HISTORY = 100  # envelopes per topic, as the shipped history_size


def envelopes(topic: str, values: list[bytes]) -> list[str]:
    """The proxy's envelopes of these records in the topic (simulator buyOffers, ~330 B each as
    envelopes: 13 topics x 100 are ~430 kB, as the burst's histories)."""
    prefix = wire.envelope_prefix(topic)
    return [wire.render_envelope(prefix, 0, offset, 1764669600000 + offset, value.decode())
            for offset, value in enumerate(values)]


def upgrade_request(port: int, session: str, key: str) -> bytes:
    return (f"GET /live/000/{session}/websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://127.0.0.1:{port}\r\n\r\n").encode()


async def measure(connects: int, rounds: int, per_topic: int) -> list[float]:
    """Microseconds of CPU per accept(), one figure per round."""
    topics = default_topics()
    with tempfile.TemporaryDirectory(prefix="connect-cost-") as data_dir:
        server = ProxyServer(parse_config({"topics": topics, "log_level": "WARNING", "data_dir": data_dir}))
        app = server.make_app()
        values = realistic_values(per_topic, shape="buyOffer")
        server.hub.load_history({topic: envelopes(topic, values) for topic in topics})
        fast = FastUpgrade(app, LiveWebSocketTransport)
        if not fast.enabled:
            raise RuntimeError("the fast upgrade is off in this Tornado")
        listener = socket.create_server(("127.0.0.1", 0), backlog=connects)
        port = listener.getsockname()[1]
        key = base64.b64encode(os.urandom(16)).decode()
        expected = None
        figures = []
        try:
            for number in range(rounds):
                spent = 0.0
                for connect in range(connects):
                    client = socket.create_connection(("127.0.0.1", port))
                    client.sendall(upgrade_request(port, f"r{number}c{connect:06d}", key))
                    accepted, address = listener.accept()
                    accepted.setblocking(False)
                    stream = TrackedIOStream(accepted, lambda _: None)
                    started = time.thread_time()
                    if not fast.accept(stream, address):
                        raise RuntimeError("the fast upgrade declined the request")
                    spent += time.thread_time() - started
                    received = await read_all(client, expected, len(topics))
                    expected = expected or received
                    client.close()
                    for _ in range(3):  # the IOLoop sees the close and ends the session
                        await asyncio.sleep(0)
                figures.append(1e6 * spent / connects)
        finally:
            listener.close()
            server.hub.close_all(1001, "done")
    return figures


HISTORY_MARK = b'{\\"type\\":\\"history\\"'


async def read_all(client: socket.socket, expected: int | None, topics: int) -> int:
    """Read what the upgrade sends (the 101, "o", the histories): `expected` bytes, or the first
    time until every topic's history message and the end of their frame are in."""
    client.setblocking(False)
    received, seen, tail = 0, 0, b""
    while True:
        try:
            data = client.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0)  # the IOLoop writes the rest
            continue
        if not data:
            return received
        received += len(data)
        if expected is not None:
            if received >= expected:
                return received
            continue
        window = tail + data
        seen += window.count(HISTORY_MARK)
        tail = window[-len(HISTORY_MARK) + 1:]
        if seen >= topics and data.endswith(b"]"):
            return received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--history", choices=("small", "full"), default="full",
                        help="full: 100 envelopes per topic (~430 kB); small: 1 (the Python without the big copy)")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.connects, args.rounds, HISTORY if args.history == "full" else 1))
    if args.json:
        print(json.dumps({"us_per_accept": figures, "median": statistics.median(figures), "min": min(figures)}))
    else:
        print(f"FastUpgrade.accept(): {statistics.median(figures):.0f} us of CPU per connect (median of "
              f"{len(figures)} rounds of {args.connects}; min {min(figures):.0f}; rounds: "
              f"{', '.join(f'{figure:.0f}' for figure in figures)})")


if __name__ == "__main__":
    main()
