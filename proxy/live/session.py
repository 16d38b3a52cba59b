"""One SockJS session of the live stream: a queue of shared chunks, one write in flight at a time.

How far behind a session may fall, and what happens then, is the hub's decision
(proxy.live.fanout); the session keeps the counts it needs: bytes queued and in flight, when it
went over its limit, when its write in flight started.
"""

from __future__ import annotations

import random
import time
import typing

import tornado.websocket
from sockjs.tornado import SockJSRouter
from sockjs.tornado.session import Session

from proxy.live.transports import WebSocketFrames

if typing.TYPE_CHECKING:
    from proxy.live.fanout import LiveHub

# A write takes at most this much of a session's queue (at least one chunk), so a write completes
# quickly and the session's progress is seen at a fine grain.
MAX_FRAME_BYTES = 1024 * 1024
# A session with this much queued when its write completes writes again at once (a reader
# draining a backlog); with less, it waits for the flush tick and shares its frame.
BEHIND_BYTES = 64 * 1024
# Transports that take one HTTP request per answer: answered at most every hub.poll_interval.
POLLING_TRANSPORTS = frozenset({"xhr", "jsonp"})
# A polling session's next answer waits hub.poll_interval plus a random share of it, up to this
# fraction. Periodic timers fall into step: every stall of the IOLoop (a long tick, a collection)
# gathered the timers due meanwhile into one callback round, and with one period for all they
# stayed together, so answers and the polls that follow them came in bursts (2,000-session soak:
# up to 74 answers in 50 ms against 20 on average, /health waiting behind them). A random share
# spreads them out again.
POLL_JITTER = 0.2


def next_answer_at(now: float, interval: float) -> float:
    """When a polling session answered at `now` may be answered again."""
    return now + interval * (1.0 + POLL_JITTER * random.random())


def drop_if_lost(handler: typing.Any) -> bool:
    """Drop the handler's session if its connection is gone (transports without the check: never)."""
    lost = getattr(handler, "connection_lost", None)
    if lost is not None and lost():
        handler.drop()
        return True
    return False


class LiveSession(Session):
    """A SockJS session whose queue holds shared chunks, with one write in flight at a time."""

    def __init__(self, conn: type, server: SockJSRouter, session_id: str, expiry: float | None = None):
        self._chunks: list[bytes] = []
        super().__init__(conn, server, session_id, expiry)
        self.hub: LiveHub = server.settings["hub"]
        self.queued_bytes = 0      # waiting in _chunks
        self.in_flight_bytes = 0   # handed to the socket, not yet sent
        self._in_flight_chunks: list[bytes] = []
        self._writing = False
        self._write_future: typing.Any = None
        self.over_limit_since: float | None = None
        # When the write now in flight started (None: none is); a write that does not complete
        # means the client does not read.
        self.write_started: float | None = None
        # Whether the client polls (one HTTP request per answer, so answers are spaced out); when
        # the next answer may go out, and whether a timer waits for it.
        self.polling = False
        self.next_answer_at = 0.0
        self._answer_timer = False

    def set_handler(self, handler: typing.Any, start_heartbeat: bool = True) -> bool:
        attached = super().set_handler(handler, start_heartbeat)
        self.polling = self.transport_name in POLLING_TRANSPORTS
        return attached

    # sockjs-tornado's transports look at send_queue to decide whether to flush at once.
    @property  # type: ignore[override]
    def send_queue(self) -> list[bytes]:
        return self._chunks

    @send_queue.setter
    def send_queue(self, value: typing.Any) -> None:
        pass  # sockjs-tornado resets it to '' in __init__; the chunks are ours

    @property
    def pending_bytes(self) -> int:
        return self.queued_bytes + self.in_flight_bytes

    def send_jsonified(self, msg: str, stats: bool = True) -> None:
        """Everything sockjs-tornado sends through the session goes through the bounded queue."""
        self.enqueue([msg.encode()])

    def enqueue(self, chunks: list[bytes]) -> None:
        """Queue pre-encoded SockJS messages (each comma-joinable, UTF-8); written on the next tick."""
        if self.is_closed or not chunks:
            return
        self._chunks.extend(chunks)
        self.hub.hold(chunks)
        added = sum(map(len, chunks))
        self.queued_bytes += added
        self.hub.account(self, added)

    def add_shared(self, chunk: bytes, size: int) -> int:
        """enqueue() of one chunk for the hub's fan-out, which does the accounting for all
        sessions at once; returns the bytes now pending, or -1 if the session is closed."""
        if self.is_closed:
            return -1
        self._chunks.append(chunk)
        self.queued_bytes += size
        return self.queued_bytes + self.in_flight_bytes

    def take(self) -> list[bytes]:
        """Hand queued chunks (up to MAX_FRAME_BYTES, at least one) to a write (the tick or flush())."""
        if self.queued_bytes <= MAX_FRAME_BYTES:
            chunks, self._chunks = self._chunks, []
            taken = self.queued_bytes
        else:
            taken, count = 0, 0
            for chunk in self._chunks:
                if count and taken + len(chunk) > MAX_FRAME_BYTES:
                    break
                taken += len(chunk)
                count += 1
            chunks, self._chunks = self._chunks[:count], self._chunks[count:]
        self.in_flight_bytes += taken
        self.queued_bytes -= taken
        self._in_flight_chunks.extend(chunks)
        return chunks

    def writable(self) -> bool:
        handler = self.handler
        if not (self._chunks and handler is not None and handler.active and not self._writing):
            return False
        return not self.polling or self._answer_due()

    def _answer_due(self) -> bool:
        """A polling session may be answered now; if not, a timer flushes it when it may.

        Each answer costs the client a new request and the proxy a whole HTTP exchange, so polls
        are answered at most every hub.poll_interval (which grows with the number of polling
        sessions): their messages gather meanwhile and cost one request.
        """
        wait = self.next_answer_at - time.monotonic()
        if wait <= 0:
            return True
        if not self._answer_timer:
            self._answer_timer = True
            self.server.io_loop.call_later(wait, self._answer)
        return False

    def _answer(self) -> None:
        self._answer_timer = False
        if not self.is_closed:
            self.flush()

    def stalled_for(self, now: float) -> float:
        """Seconds the client has not taken data it could have: a write in flight, or (no
        transport attached, e.g. a poller that stopped polling) since it went over its limit."""
        if self.write_started is not None:
            return now - self.write_started
        if self.over_limit_since is not None and not self.writable():
            return now - self.over_limit_since
        return 0.0

    def write(self, frame: bytes) -> None:
        """Send one SockJS frame (b'a[...]') built from take()n chunks; while the socket takes
        writes at once and a backlog is queued, go on with the next frame."""
        while True:
            handler = self.handler
            if isinstance(handler, WebSocketFrames):
                try:
                    future = handler.write_parts(self.hub.websocket_parts(frame))
                except tornado.websocket.WebSocketClosedError:
                    self._finish_write(None)
                    self.server.io_loop.add_callback(handler.drop)
                    return
                if future is not None:
                    self.write_started = time.monotonic()
                    self._writing = True
                    self._write_future = future
                    future.add_done_callback(self._write_finished)
                    return
                self._finish_write(None)  # the socket took it all
            else:
                # HTTP transports mark themselves inactive until the write is flushed, then call
                # flush() again; the write counts as done then.
                send_frame = getattr(handler, "send_frame", None)
                if send_frame is not None:
                    send_frame(frame)
                else:
                    handler.send_pack(frame.decode())
                self._finish_write(None)
                if not handler.active:
                    self.write_started = time.monotonic()  # until the transport calls flush() again
                if self.polling:
                    self.next_answer_at = next_answer_at(time.monotonic(), self.hub.poll_interval)
            if not self._write_again():
                return
            frame = self.hub.frame(self.take())

    def flush(self) -> None:
        """Write what is queued now, if a transport can take it (sockjs-tornado calls this when a
        transport attaches or finished a write)."""
        self._pending_flush = False
        self.write_started = None
        if self.writable():
            self.write(self.hub.frame(self.take()))

    def _write_finished(self, future: typing.Any) -> None:
        """A write that waited for the socket completed (or failed)."""
        if future is not self._write_future or not self._finish_write(future):
            return
        if self._write_again():
            self.write(self.hub.frame(self.take()))

    def _finish_write(self, future: typing.Any) -> bool:
        """Account for the write in flight being done; False if it failed (connection gone)."""
        self._writing = False
        self._write_future = None
        self.write_started = None
        self.hub.account(self, -self.in_flight_bytes)
        self.in_flight_bytes = 0
        self.hub.release(self._in_flight_chunks)
        self._in_flight_chunks = []
        if future is not None and future.exception() is not None:
            return False  # the connection is gone; the sweep or on_close drops the session
        self.hub.settle(self)
        return True

    def _write_again(self) -> bool:
        """After a write: whether to write the next frame now (a backlog piled up: out of step
        with the others, there is no frame to share); otherwise the next tick takes the rest."""
        if self.queued_bytes >= BEHIND_BYTES and self.writable():
            return True
        if self._chunks:
            self.hub.mark_dirty(self)
        return False

    # sockjs-tornado's heartbeat: an "h" frame every heartbeat_delay while a transport is
    # attached. One asyncio timer per session instead of its periodic.Callback, which went through
    # Tornado's add_timeout (6-12 against 3-4 us per start, measured) and whose stopped timers
    # stayed in the loop's heap until they fell due (a reconnecting crowd's pile).

    def start_heartbeat(self) -> None:
        self.stop_heartbeat()
        self._heartbeat_timer = self.server.io_loop.asyncio_loop.call_later(
            self._heartbeat_interval / 1000.0, self._heartbeat_due)

    def stop_heartbeat(self) -> None:
        timer = self._heartbeat_timer
        if timer is not None:
            timer.cancel()
            self._heartbeat_timer = None

    def delay_heartbeat(self) -> None:
        if self._heartbeat_timer is not None:
            self.start_heartbeat()

    def _heartbeat_due(self) -> None:
        self.start_heartbeat()  # the next one (_heartbeat stops them if no transport is attached)
        self._heartbeat()

    def _heartbeat(self) -> None:
        if not drop_if_lost(self.handler):
            super()._heartbeat()

    def close_after_flush(self, code: int, message: str) -> None:
        """Close, but first send what is queued (e.g. the error that says why)."""
        handler = self.handler
        if self._chunks and handler is not None and not self.is_closed:
            frame = self.hub.frame(self.take())
            if isinstance(handler, WebSocketFrames):
                handler.send_pack(frame.decode())  # ordered before the close frame on the same stream
            elif handler.active:
                handler.send_pack(frame.decode())
        self.close(code, message)

    def close(self, code: int = 3000, message: str = "Go away!") -> None:
        if self._chunks or self.in_flight_bytes:
            self.hub.account(self, -self.pending_bytes)
        self.hub.release(self._chunks)
        self.hub.release(self._in_flight_chunks)
        self._chunks, self._in_flight_chunks, self.queued_bytes, self.in_flight_bytes = [], [], 0, 0
        self.hub.settle(self)
        super().close(code, message)
