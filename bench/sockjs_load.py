"""Many SockJS websocket clients in one process, kept cheap: raw sockets, epoll, bytes.count.

Counts live messages (the byte pattern {\\"type\\":\\"message\\" in the raw stream, so nothing is
decoded), websocket frames, bytes and closed sessions. The first `--sample` clients also take the
Kafka record timestamp of every message they get (a regex on the raw bytes) and compare it with
the time of receipt: the latency of that message from producer to screen.

Run by bench/delivery.py and bench/latency.py as a child process. It prints "READY <clients>"
once every handshake is done, then answers commands on stdin with one JSON line each:

    COUNT      {"time", "messages", "frames", "bytes", "closed", "per_client"} so far
    TIME ON    {} and start collecting latencies
    TIME OFF   {"count", "p50", "p90", "p99", "p999", "max"} of the latencies since TIME ON (ms)
    STOP       (no answer) close everything and exit
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import socket
import sys
import time

PATTERN = b'{\\"type\\":\\"message\\"'
# The envelope's timestamp is followed by ,\"value\": ; the value's own "timestamp" is an ISO
# string, so this matches only the envelope's. The comma makes a number cut by a recv boundary
# unmatchable until its rest arrives. History frames carry envelopes too, but they come on connect,
# before anyone turns timing on.
TIMESTAMP = re.compile(rb'\\"timestamp\\":(\d+),')
TIMESTAMP_PREFIX = b'\\"timestamp\\":'
RECV_BYTES = 1 << 18


class Client:
    """One websocket connection: counts messages and walks the frame headers."""

    __slots__ = ("sock", "tail", "messages", "frames", "bytes", "remaining", "header", "carry",
                 "sampled", "closed")

    def __init__(self, sock: socket.socket, sampled: bool):
        self.sock = sock
        self.tail = b""  # last len(PATTERN) - 1 bytes, for patterns cut by a recv boundary
        self.messages = 0
        self.frames = 0
        self.bytes = 0
        self.remaining = 0  # payload bytes of the current frame still to come
        self.header = b""  # a frame header cut by a recv boundary
        self.carry = b""  # unmatched end of the previous recv, for TIMESTAMP
        self.sampled = sampled
        self.closed = False

    def feed(self, data: bytes) -> None:
        keep = len(PATTERN) - 1
        self.bytes += len(data)
        self.messages += data.count(PATTERN) + (self.tail + data[:keep]).count(PATTERN)
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        self._walk_frames(data)

    def _walk_frames(self, data: bytes) -> None:
        """Skip payloads, count frames; notice a close frame."""
        if self.header:
            data, self.header = self.header + data, b""
        end, position, remaining = len(data), 0, self.remaining
        while remaining < end - position:
            position += remaining
            if end - position < 2:
                self.header = data[position:]
                remaining = 0
                break
            opcode, length = data[position] & 0x0F, data[position + 1] & 0x7F
            size = 2 if length < 126 else 4 if length == 126 else 10
            if end - position < size:
                self.header = data[position:]
                remaining = 0
                break
            if length >= 126:
                length = int.from_bytes(data[position + 2:position + size], "big")
            if opcode == 8:
                self.closed = True
            self.frames += 1
            position += size
            remaining = length
        else:
            remaining -= end - position
        self.remaining = remaining

    def timestamps(self, data: bytes) -> list[bytes]:
        """Envelope timestamps in data; an occurrence cut at the end waits for the next recv."""
        text = self.carry + data
        found = TIMESTAMP.findall(text)
        last = text.rfind(TIMESTAMP_PREFIX)
        match = TIMESTAMP.match(text, last) if last >= 0 else None
        self.carry = text[match.end() if match else max(last, 0):][-64:]
        return found


def connect(port: int, path: str) -> tuple[socket.socket, bytes]:
    """Websocket handshake by hand; returns the socket and any bytes that followed the headers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Origin: http://127.0.0.1:{port}\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"handshake on {path}: connection closed")
        response += chunk
    head, rest = response.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake on {path}: {head.splitlines()[0]!r}")
    sock.setblocking(False)
    return sock, rest


def counts(clients: list[Client]) -> dict:
    return {"time": time.monotonic(), "messages": sum(c.messages for c in clients),
            "frames": sum(c.frames for c in clients), "bytes": sum(c.bytes for c in clients),
            "closed": sum(c.closed for c in clients), "per_client": [c.messages for c in clients]}


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    if not ordered:
        return {"count": 0}

    def at(quantile: float) -> float:
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    return {"count": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999),
            "max": ordered[-1]}


def run(port: int, count: int, prefix: str, sample: int) -> None:
    clients: list[Client] = []
    poller = select.epoll()
    by_fd: dict[int, Client] = {}
    for number in range(count):
        sock, rest = connect(port, f"{prefix}/000/bench{number:05d}/websocket")
        client = Client(sock, number < sample)
        clients.append(client)
        by_fd[sock.fileno()] = client
        poller.register(sock.fileno(), select.EPOLLIN)
        client.feed(rest)
    print(f"READY {count}", flush=True)

    stdin = sys.stdin.fileno()
    poller.register(stdin, select.EPOLLIN)
    commands = b""
    latencies: list[float] = []
    timing = False
    while True:
        for fd, _ in poller.poll(0.05):
            if fd == stdin:
                commands += os.read(stdin, 4096) or b"STOP\n"
                while b"\n" in commands:
                    command, commands = commands.split(b"\n", 1)
                    if command == b"COUNT":
                        print(json.dumps(counts(clients)), flush=True)
                    elif command == b"TIME ON":
                        latencies, timing = [], True
                        print("{}", flush=True)
                    elif command == b"TIME OFF":
                        timing = False
                        print(json.dumps(percentiles(latencies)), flush=True)
                    elif command == b"STOP":
                        for client in clients:
                            client.sock.close()
                        return
                continue
            client = by_fd[fd]
            try:
                data = client.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                client.closed = True
                poller.unregister(fd)
                continue
            client.feed(data)
            if client.sampled:
                stamps = client.timestamps(data)
                if timing and stamps:
                    received = time.time() * 1000.0
                    latencies.extend([received - int(stamp) for stamp in stamps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--prefix", default="/live")
    parser.add_argument("--sample", type=int, default=0, help="clients that time every message")
    args = parser.parse_args()
    run(args.port, args.clients, args.prefix, args.sample)


if __name__ == "__main__":
    main()
