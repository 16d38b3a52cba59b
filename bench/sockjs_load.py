"""Many SockJS clients in one process, kept cheap: raw sockets, epoll, bytes.count.

One process runs --clients sessions of one --transport: websocket, xhr_streaming or xhr
(polling). Nothing is decoded: live messages are counted by the byte pattern {\\"type\\":\\"message\\"
in the raw stream (history messages by {\\"type\\":\\"history\\"), websocket frames by walking the frame
headers, SockJS close frames by their c[ prefix. The first --sample clients also take the Kafka
record timestamp of every message they get (a regex on the raw bytes) and compare it with the
time of receipt: the latency of that message from producer to screen.

Clients connect at --connect-rate sessions/s (0: all at once, non-blocking) when the process
starts, or only on "GO" with --wait-for-go (a history burst started in several processes at the
same moment). Each client also notes when its history was complete: --histories history messages
and the end of the SockJS frame that carried the last one. With --tokens (token mode, websocket
only) client i sends {"type": "auth", "token": <the i-th token, cycled>} right after its handshake.

It prints "READY <clients>" once every session is open (with --wait-for-go: at once), then
answers commands on stdin with one JSON line each:

    GO                 connect now; answers once every history is complete (or 60 s passed):
                       {"history_ms": [per client], "delivered_ms": [per client], "open": N, "failed": N}
                       (history_ms: until this process read the end of the history; delivered_ms:
                       until it reached the socket, the kernel's receive time of that read)
    COUNT              {"time", "messages", "histories", "frames", "bytes", "closed", "close_codes",
                        "errors", "reconnects", "per_client"} so far
    UNTIL <n> <secs>   answers COUNT once the clients got n live messages in total (or secs passed)
    TIME ON            {} and start collecting latencies
    TIME OFF           {"count", "p50", "p90", "p99", "p999", "max", "read": {...}} of the latencies
                       since TIME ON (ms): record timestamp -> the bytes reached the client's socket
                       (kernel receive timestamp: the proxy's delivery, whatever this process's own
                       scheduling); "read": -> this process read them
    STOP               (no answer) close everything and exit
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import re
import select
import socket
import struct
import sys
import time

MESSAGE = b'{\\"type\\":\\"message\\"'
HISTORY = b'{\\"type\\":\\"history\\"'
KEEP = len(MESSAGE) - 1  # bytes kept from the previous read, for a pattern cut by a recv boundary
# The envelope's timestamp is followed by ,\"value\": ; the value's own "timestamp" is an ISO
# string, so this matches only the envelope's. The comma makes a number cut by a recv boundary
# unmatchable until its rest arrives. History messages carry envelopes too, but they come on
# connect, before anyone turns timing on.
TIMESTAMP = re.compile(rb'\\"timestamp\\":(\d+),')
TIMESTAMP_PREFIX = b'\\"timestamp\\":'
CLOSE_FRAME = re.compile(rb'\nc\[(\d+)')
# A SockJS close frame: c[<code>,"<reason>"], its own websocket frame; enough of its start to read the code.
CLOSE_START = re.compile(rb'c\[(\d+)')
CLOSE_PREFIX = 12
RECV_BYTES = 1 << 18
GO_TIMEOUT = 60.0


class Session:
    """One SockJS session: what it received, whatever the transport."""

    def __init__(self, port: int, path: str, sampled: bool):
        self.port = port
        self.path = path  # /prefix/server/session
        self.sampled = sampled
        self.sock: socket.socket | None = None
        self.messages = 0
        self.histories = 0
        self.frames = 0
        self.bytes = 0
        self.reconnects = 0
        self.errors = 0  # HTTP answers other than 101/200/204, connections refused or cut
        self.closed = False
        self.close_code: int | None = None
        self.started = 0.0  # monotonic time the connection was begun
        self.started_ms = 0.0  # the same moment, CLOCK_REALTIME ms (the kernel's receive timestamps' clock)
        self.history_done: float | None = None
        # The kernel's receive time (ms) of the read that completed the history: when the server's
        # last byte of it reached this socket, however late this process got to read it.
        self.history_delivered: float | None = None
        self.arrived: float | None = None  # the kernel's receive time of the read being fed
        self.opened = False  # the handshake or the first HTTP answer came back
        self.tail = b""
        self.carry = b""  # unmatched end of the previous read, for TIMESTAMP
        self.stamps: list[bytes] = []  # envelope timestamps of the last read (sampled sessions)
        self.expected_histories = 0

    def begin(self) -> socket.socket:
        """Open a non-blocking connection; the request goes out once it is writable."""
        if not self.started:
            self.started, self.started_ms = time.monotonic(), time.time() * 1000.0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.stamped():  # the kernel stamps when data reached the socket (read with recvmsg)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        error = sock.connect_ex(("127.0.0.1", self.port))
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            raise ConnectionError(os.strerror(error))
        self.sock = sock
        return sock

    def stamped(self) -> bool:
        """Whether reads take the kernel's receive timestamp: sampled sessions, and a history being timed."""
        return self.sampled or (self.expected_histories > 0 and self.history_done is None)

    def history_completed(self) -> None:
        self.history_done = time.monotonic()
        self.history_delivered = self.arrived

    def request(self) -> bytes:
        raise NotImplementedError

    def count(self, payload: bytes) -> None:
        """Count SockJS messages in payload bytes (free of transport framing); sample timestamps.

        Patterns cut by a read boundary are found in the tail of the last read plus the start of
        this one, without copying the whole read. Histories are counted until they are complete.
        """
        tail = self.tail
        counting_histories = self.history_done is None
        if tail:
            edge = tail + payload[:KEEP]
            self.messages += edge.count(MESSAGE)
            if counting_histories:
                self.histories += edge.count(HISTORY)
        self.messages += payload.count(MESSAGE)
        if counting_histories:
            self.histories += payload.count(HISTORY)
        self.tail = payload[-KEEP:] if len(payload) >= KEEP else (tail + payload)[-KEEP:]
        if self.sampled:
            text = self.carry + payload
            last = text.rfind(TIMESTAMP_PREFIX)
            match = TIMESTAMP.match(text, last) if last >= 0 else None
            self.carry = text[match.end() if match else max(last, 0):][-64:]
            self.stamps = TIMESTAMP.findall(text)

    def feed(self, data: bytes) -> bool:
        """Take received bytes; False when the connection is finished with (closed session)."""
        raise NotImplementedError

    def lost(self) -> bool:
        """The server closed the connection; True if the session goes on over a new one."""
        return False


def auth_frame(token: str) -> bytes:
    """A masked websocket text frame (clients must mask) carrying the SockJS message {"type": "auth", ...}."""
    payload = json.dumps([json.dumps({"type": "auth", "token": token})]).encode()
    if len(payload) >= 65536:
        raise ValueError("token too long for this load client")
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    mask = os.urandom(4)
    return b"\x81" + length + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


class WebSocketSession(Session):
    """SockJS over a raw websocket: walks frame headers, skips payloads."""

    def __init__(self, port: int, path: str, sampled: bool, token: str | None = None):
        super().__init__(port, path, sampled)
        self.auth = auth_frame(token) if token is not None else b""  # sent once the handshake is answered
        self.handshaken = False
        self.head = b""
        self.remaining = 0  # payload bytes of the current frame still to come
        self.header = b""  # a frame header cut by a recv boundary
        self.frame_start: bytes | None = None  # the first bytes of a frame's payload cut by a recv boundary
        self.frame_start_needed = 0

    def request(self) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (f"GET {self.path}/websocket HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: http://127.0.0.1:{self.port}\r\n\r\n").encode()

    def feed(self, data: bytes) -> bool:
        if not self.handshaken:
            # The 101 leaves with the first frames (the whole history, often): not copied around.
            if self.head:
                data, self.head = self.head + data, b""
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.head = data
                return True
            head, data = data[:end], data[end + 4:]
            if not head.startswith(b"HTTP/1.1 101"):
                self.errors += 1
                self.closed = True
                return False
            self.handshaken = self.opened = True
            if self.auth:
                self.sock.sendall(self.auth)
        self.bytes += len(data)
        self.count(data)
        self._walk_frames(data)
        # Complete once the frame that carried the last history message has fully arrived.
        if (self.expected_histories and self.history_done is None and self.histories >= self.expected_histories
                and self.remaining == 0 and not self.header):
            self.history_completed()
        return not self.closed

    def _walk_frames(self, data: bytes) -> None:
        """Skip payloads, count frames; notice websocket and SockJS close frames."""
        if self.frame_start is not None:
            self._frame_started(self.frame_start + data[:self.frame_start_needed - len(self.frame_start)])
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
            self.frames += 1
            position += size
            if opcode == 8:
                self.closed = True
            elif length:
                self.frame_start_needed = min(length, CLOSE_PREFIX)
                self._frame_started(data[position:position + self.frame_start_needed])
            remaining = length
        else:
            remaining -= end - position
        self.remaining = remaining

    def _frame_started(self, start: bytes) -> None:
        """Read a frame's first bytes (once enough of them came): a SockJS close frame ends the session."""
        if len(start) < self.frame_start_needed:
            self.frame_start = start
            return
        self.frame_start = None
        close = CLOSE_START.match(start)
        if close:
            self.closed = True
            self.close_code = int(close.group(1))


class HttpSession(Session):
    """SockJS over xhr_streaming or xhr polling: POST after POST on one keep-alive connection.

    Parses just enough HTTP/1.1: the status line, Content-Length or chunked bodies. Every SockJS
    frame ends with a newline, which never occurs inside one (JSON escapes it).
    """

    def __init__(self, port: int, path: str, sampled: bool, transport: str):
        super().__init__(port, path, sampled)
        self.transport = transport
        self._reset_response()
        self.frame_tail = b"\n"  # the last byte of the body so far: a frame starts after "\n"

    def _reset_response(self) -> None:
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.length = 0  # bytes left of the body (Content-Length) or of the current chunk
        self.chunk_line = b""
        self.state = "size"  # chunked: size, data, crlf, end

    def request(self) -> bytes:
        return (f"POST {self.path}/{self.transport} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Length: 0\r\n\r\n").encode()

    def feed(self, data: bytes) -> bool:
        while data:
            if not self.in_body:
                self.head += data
                if b"\r\n\r\n" not in self.head:
                    return True
                head, data = self.head.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                if not lines[0].startswith(b"HTTP/1.1 200"):
                    self.errors += 1
                    self.closed = True
                    return False
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
                self.chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
                self.length = 0 if self.chunked else int(headers.get(b"content-length", b"0"))
                self.in_body = self.opened = True
                if not self.chunked and self.length == 0:
                    return self._response_done()
                continue
            if not self.chunked:
                piece, data = data[:self.length], data[self.length:]
                self.length -= len(piece)
                self._payload(piece)
                if self.length == 0:
                    if not self._response_done():
                        return False
                continue
            if self.state == "size":
                self.chunk_line += data
                if b"\r\n" not in self.chunk_line:
                    return True
                line, data = self.chunk_line.split(b"\r\n", 1)
                self.chunk_line = b""
                self.length = int(line.split(b";")[0], 16)
                self.state = "data" if self.length else "end"
            elif self.state == "data":
                piece, data = data[:self.length], data[self.length:]
                self.length -= len(piece)
                self._payload(piece)
                if self.length == 0:
                    self.state, self.length = "crlf", 2
            elif self.state == "crlf":
                skipped = data[:self.length]
                data = data[len(skipped):]
                self.length -= len(skipped)
                if self.length == 0:
                    self.state = "size"
            else:  # "end": the final CRLF after the zero-size chunk (Tornado sends no trailers)
                self.chunk_line += data
                if len(self.chunk_line) < 2:
                    return True
                data, self.chunk_line = self.chunk_line[2:], b""
                if not self._response_done():
                    return False
        return True

    def _payload(self, piece: bytes) -> None:
        self.bytes += len(piece)
        self.count(piece)
        text = self.frame_tail + piece
        self.frames += piece.count(b"\n")
        for match in CLOSE_FRAME.finditer(text):
            self.closed = True
            self.close_code = int(match.group(1))
        self.frame_tail = text[-16:]
        if (self.expected_histories and self.history_done is None and self.histories >= self.expected_histories
                and piece.endswith(b"\n")):
            self.history_completed()

    def _response_done(self) -> bool:
        """One answer is complete: poll again on the same connection, unless the session closed."""
        self._reset_response()
        if self.closed:
            return False
        self.reconnects += 1
        self.sock.sendall(self.request())
        return True

    def lost(self) -> bool:
        # A keep-alive connection the server dropped between answers: carry on over a new one.
        return not self.closed and not self.in_body and not self.head


class LoadProcess:
    """The sessions of this process, their epoll loop and the stdin commands."""

    def __init__(self, port: int, count: int, transport: str, prefix: str, sample: int, histories: int,
                 tokens: list[str] | None = None):
        if tokens and transport != "websocket":
            raise ValueError("--tokens: websocket only")
        make = {"websocket": lambda path, sampled, token: WebSocketSession(port, path, sampled, token),
                "xhr_streaming": lambda path, sampled, _: HttpSession(port, path, sampled, "xhr_streaming"),
                "xhr": lambda path, sampled, _: HttpSession(port, path, sampled, "xhr")}[transport]
        tag = os.urandom(4).hex()
        self.sessions = [make(f"{prefix}/000/{tag}{number:05d}", number < sample,
                              tokens[number % len(tokens)] if tokens else None) for number in range(count)]
        for session in self.sessions:
            session.expected_histories = histories
        self.poller = select.epoll()
        self.by_fd: dict[int, Session] = {}
        self.connecting: dict[int, Session] = {}
        self.latencies: list[float] = []  # to the kernel's receive timestamp
        self.read_latencies: list[float] = []  # to this process's read
        self.timing = False
        self.next_to_open = 0
        self.open_started = 0.0
        self.connect_rate = 0.0

    def start_opening(self, rate: float) -> None:
        self.open_started = time.monotonic()
        self.connect_rate = rate
        self._open_due()

    def _open_due(self) -> None:
        due = len(self.sessions) if not self.connect_rate else \
            min(len(self.sessions), int((time.monotonic() - self.open_started) * self.connect_rate) + 1)
        while self.next_to_open < due:
            self._open(self.sessions[self.next_to_open])
            self.next_to_open += 1

    def _open(self, session: Session) -> None:
        try:
            sock = session.begin()
        except OSError:
            session.errors += 1
            session.closed = True
            return
        self.connecting[sock.fileno()] = session
        self.poller.register(sock.fileno(), select.EPOLLOUT)

    def all_opened(self) -> bool:
        return self.next_to_open == len(self.sessions) and all(s.opened or s.closed for s in self.sessions)

    def histories_done(self) -> bool:
        return self.all_opened() and all(s.history_done is not None or s.closed for s in self.sessions)

    def counts(self) -> dict:
        sessions = self.sessions
        return {"time": time.monotonic(), "messages": sum(s.messages for s in sessions),
                "histories": sum(s.histories for s in sessions), "frames": sum(s.frames for s in sessions),
                "bytes": sum(s.bytes for s in sessions), "closed": sum(s.closed for s in sessions),
                "close_codes": sorted({s.close_code for s in sessions if s.close_code is not None}),
                "errors": sum(s.errors for s in sessions), "reconnects": sum(s.reconnects for s in sessions),
                "per_client": [s.messages for s in sessions]}

    def step(self, timeout: float) -> list[int]:
        """One epoll round; returns the fds of stdin events for the caller."""
        if self.open_started and self.next_to_open < len(self.sessions):  # not before start_opening (GO)
            self._open_due()
            timeout = min(timeout, 0.005)
        other = []
        for fd, events in self.poller.poll(timeout):
            session = self.connecting.pop(fd, None)
            if session is not None:
                self._connected(fd, session)
                continue
            session = self.by_fd.get(fd)
            if session is None:
                other.append(fd)
                continue
            arrived = None
            try:
                if session.stamped():
                    data, ancillary, _, _ = session.sock.recvmsg(RECV_BYTES, TIMESTAMP_CMSG_SPACE)
                    arrived = session.arrived = arrival_ms(ancillary)
                else:
                    data = session.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(fd, session)
                continue
            if not session.feed(data):
                self._finish(fd, session)
                continue
            if session.sampled and self.timing and getattr(session, "stamps", None):
                received = time.time() * 1000.0
                stamps = [int(stamp) for stamp in session.stamps]
                self.read_latencies.extend([received - stamp for stamp in stamps])
                self.latencies.extend([(received if arrived is None else arrived) - stamp for stamp in stamps])
                session.stamps = []
        return other

    def _connected(self, fd: int, session: Session) -> None:
        if session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.poller.unregister(fd)
            session.sock.close()
            session.errors += 1
            session.closed = True
            return
        session.sock.sendall(session.request())
        self.poller.modify(fd, select.EPOLLIN)
        self.by_fd[fd] = session

    def _drop(self, fd: int, session: Session) -> None:
        """The server ended the connection: reconnect an HTTP session between answers."""
        self.poller.unregister(fd)
        del self.by_fd[fd]
        session.sock.close()
        if session.lost():
            session.reconnects += 1
            self._open(session)
        else:
            if not session.closed:
                session.errors += 1  # cut in the middle of an answer, without a SockJS close frame
            session.closed = True

    def _finish(self, fd: int, session: Session) -> None:
        self.poller.unregister(fd)
        del self.by_fd[fd]
        session.sock.close()

    def close(self) -> None:
        for session in self.sessions:
            if session.sock is not None:
                session.sock.close()


# Linux: SO_TIMESTAMPNS (= SCM_TIMESTAMPNS; the socket module has no name for it) and the space
# of its control message, a struct timespec of two longs.
SO_TIMESTAMPNS = 35
TIMESTAMP_CMSG_SPACE = socket.CMSG_SPACE(16)


def arrival_ms(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The kernel's receive time (CLOCK_REALTIME, ms) of the newest data a recvmsg returned."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds * 1000.0 + nanoseconds / 1e6
    return None


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def at(quantile: float) -> float:
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    return {"count": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999),
            "max": ordered[-1]}


def run(args: argparse.Namespace) -> None:
    load = LoadProcess(args.port, args.clients, args.transport, args.prefix, args.sample, args.histories,
                       [token for token in args.tokens.split(",") if token])
    if not args.wait_for_go:
        load.start_opening(args.connect_rate)
        deadline = time.monotonic() + max(60.0, 2 * args.clients / max(args.connect_rate, 1.0))
        while not load.all_opened() and time.monotonic() < deadline:
            load.step(0.05)
    print(f"READY {args.clients}", flush=True)

    stdin = sys.stdin.fileno()
    load.poller.register(stdin, select.EPOLLIN)
    commands = b""
    until: tuple[int, float] | None = None
    go_deadline: float | None = None
    while True:
        if go_deadline is not None and (load.histories_done() or time.monotonic() > go_deadline):
            go_deadline = None
            done = [s for s in load.sessions if s.history_done is not None]
            print(json.dumps({"history_ms": [(s.history_done - s.started) * 1000.0 for s in done],
                              "delivered_ms": [s.history_delivered - s.started_ms for s in done
                                               if s.history_delivered is not None],
                              "open": sum(s.sock is not None and not s.closed for s in load.sessions),
                              "failed": sum(s.closed for s in load.sessions)}), flush=True)
        if until is not None:
            total = sum(s.messages for s in load.sessions)
            if total >= until[0] or time.monotonic() > until[1]:
                until = None
                print(json.dumps(load.counts()), flush=True)
        for fd in load.step(0.001 if until or go_deadline else 0.05):
            if fd != stdin:
                continue
            commands += os.read(stdin, 4096) or b"STOP\n"
            while b"\n" in commands:
                command, commands = commands.split(b"\n", 1)
                word, *rest = command.split() or [b""]
                if word == b"COUNT":
                    print(json.dumps(load.counts()), flush=True)
                elif word == b"UNTIL":
                    until = (int(rest[0]), time.monotonic() + float(rest[1]))
                elif word == b"GO":
                    load.start_opening(args.connect_rate)
                    go_deadline = time.monotonic() + GO_TIMEOUT
                elif command == b"TIME ON":
                    load.latencies, load.read_latencies, load.timing = [], [], True
                    print("{}", flush=True)
                elif command == b"TIME OFF":
                    load.timing = False
                    print(json.dumps(percentiles(load.latencies) | {"read": percentiles(load.read_latencies)}),
                          flush=True)
                elif word == b"STOP":
                    load.close()
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--transport", choices=("websocket", "xhr_streaming", "xhr"), default="websocket")
    parser.add_argument("--prefix", default="/live")
    parser.add_argument("--sample", type=int, default=0, help="clients that time every message")
    parser.add_argument("--connect-rate", type=float, default=0.0, help="sessions opened per second (0: all at once)")
    parser.add_argument("--histories", type=int, default=0, help="history messages that make a history complete")
    parser.add_argument("--wait-for-go", action="store_true", help="connect only on the GO command")
    parser.add_argument("--tokens", default="",
                        help="comma-separated: client i authenticates with the i-th (cycled); websocket only")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
