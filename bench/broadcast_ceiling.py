"""The delivery ceiling: a bare Tornado websocket server that streams pre-encoded SockJS frames.

No Kafka, no JSON work, no queues: each connection gets "o", then the same kind of frames the
proxy sends (real envelopes, SockJS-quoted, `--per-frame` messages each) back to back, one write
in flight at a time. What the load clients count from it is what Tornado, loopback and the
clients can move on this machine; the proxy cannot deliver more.

    python bench/broadcast_ceiling.py --port PORT --per-frame 100

With --replay FILE (a JSON list of SockJS frames, e.g. the 13 history frames a proxy sent one
client), each connection gets "o" and those frames, and nothing more: the ceiling of a connect
burst (bench/history_burst.py). With --replay and --lean, the same without Tornado: an asyncio
protocol that finds the Sec-WebSocket-Key, answers the upgrade and writes the frames in one call,
and reads nothing else (no HTTP parsing, no handler, no websocket reader). That is about the least
a Python server can spend per connect: what the burst would cost if only the handshake were lean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import typing

import tornado.web
import tornado.websocket

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.producer import realistic_values  # noqa: E402
from proxy.live.transports import websocket_frame  # noqa: E402
from proxy.live.wire import sockjs_quote  # noqa: E402

FRAME_VARIANTS = 16


def sockjs_frames(per_frame: int, topic: str = "bench-live") -> list[str]:
    """SockJS frames of per_frame live messages, in the shape LiveHub's flush tick writes them."""
    values = realistic_values(per_frame * FRAME_VARIANTS)
    messages = [sockjs_quote('{"type":"message","topic":"%s","message":{"topic":"%s","partition":0,"offset":%d,'
                             '"timestamp":%d,"value":%s}}' % (topic, topic, offset, 1_700_000_000_000 + offset,
                                                               value.decode()))
                for offset, value in enumerate(values)]
    return ["a[" + ",".join(messages[i:i + per_frame]) + "]" for i in range(0, len(messages), per_frame)]


class BroadcastHandler(tornado.websocket.WebSocketHandler):
    """Writes the next frame as soon as the previous one is in the socket."""

    frames: list[str] = []

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args: str) -> None:
        self.sent = 0
        self.write_message("o")
        self.pump()

    def pump(self, future: asyncio.Future | None = None) -> None:
        if future is not None and future.exception() is not None:
            return
        try:
            written = self.write_message(self.frames[self.sent % len(self.frames)])
        except tornado.websocket.WebSocketClosedError:
            return
        self.sent += 1
        written.add_done_callback(self.pump)


class ReplayHandler(tornado.websocket.WebSocketHandler):
    """Sends "o" and the recorded frames on open, then nothing (a client's history, say)."""

    frames: list[str] = []

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args: str) -> None:
        self.write_message("o")
        for frame in self.frames:
            self.write_message(frame)


KEY_HEADER = b"\r\nsec-websocket-key:"


class LeanReplay(asyncio.Protocol):
    """Answers a websocket upgrade and writes "o" and the recorded frames with one call, nothing more."""

    frames: list[bytes] = []  # "o" and the recorded frames, encoded as websocket frames

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.request: bytes | None = b""

    def data_received(self, data: bytes) -> None:
        if self.request is None:
            return  # what the client sends after its upgrade is not read
        self.request += data
        end = self.request.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.request = self.request[:end + 2], None
        start = head.lower().find(KEY_HEADER)
        if start < 0:  # not a websocket upgrade: the load clients never send one
            self.transport.close()
            return
        start += len(KEY_HEADER)
        key = head[start:head.index(b"\r\n", start)].strip()
        accept = tornado.websocket.WebSocketProtocol13.compute_accept_value(key).encode()
        self.transport.writelines([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                   b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n",
                                   *self.frames])


async def serve(port: int, per_frame: int, replay: str | None = None, lean: bool = False) -> None:
    if replay and lean:
        with open(replay, encoding="utf-8") as recorded:
            frames = ["o", *json.load(recorded)]
        LeanReplay.frames = [b"".join(websocket_frame(frame.encode())) for frame in frames]
        server = await asyncio.get_running_loop().create_server(LeanReplay, "127.0.0.1", port, backlog=1024)
        await _serve_until_sigterm()
        server.close()
        return
    if replay:
        with open(replay, encoding="utf-8") as recorded:
            ReplayHandler.frames = json.load(recorded)
        handler: type = ReplayHandler
    else:
        BroadcastHandler.frames = sockjs_frames(per_frame)
        handler = BroadcastHandler
    app = tornado.web.Application([(r"/live/([^/]+)/([^/]+)/websocket", handler)])
    server = app.listen(port, "127.0.0.1", backlog=1024)  # as the proxy (listen.backlog): a burst is not lost SYNs
    await _serve_until_sigterm()
    server.stop()


async def _serve_until_sigterm() -> None:
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print("READY", flush=True)
    await stopped.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--per-frame", type=int, default=100, help="messages per SockJS frame")
    parser.add_argument("--replay", help="JSON list of SockJS frames each connection gets after 'o'")
    parser.add_argument("--lean", action="store_true", help="with --replay: an asyncio protocol instead of Tornado")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.per_frame, args.replay, args.lean))


if __name__ == "__main__":
    main()
