"""Live fan-out over SockJS: history on open, then every new message, coalesced per write.

Each message is encoded once (in `LiveHub.publish`); sessions receive pre-encoded chunks that
are joined into one SockJS frame per write. A session holds at most one write in flight; what
arrives meanwhile waits in a byte-bounded queue, and a session whose queue overflows is closed,
so a slow client costs only itself.
"""

from __future__ import annotations

import logging
import typing

import tornado.websocket
import ujson
from sockjs.tornado import SockJSConnection, SockJSRouter
from sockjs.tornado.session import Session

from proxy import metrics
from proxy.live import wire
from proxy.live.history import HistoryBuffer
from proxy.live.wire import LiveRecord

log = logging.getLogger(__name__)

SLOW_CLIENT_CLOSE = (3008, "client too slow: send queue overflowed")
SHUTDOWN_CLOSE = (3000, "server shutting down")
class LiveSession(Session):
    """A SockJS session with a byte-bounded send queue and one write in flight at a time."""

    def __init__(self, conn: type, server: SockJSRouter, session_id: str, expiry: float | None = None):
        super().__init__(conn, server, session_id, expiry)
        self._chunks: list[bytes] = []
        self._queued_bytes = 0
        self._writing = False
        self._write_future: typing.Any = None
        self._max_queue_bytes = server.settings["max_session_queue_bytes"]

    def send_jsonified(self, msg: str, stats: bool = True) -> None:
        """Everything sockjs-tornado sends through the session goes through the bounded queue."""
        self.enqueue(msg.encode())

    def enqueue(self, chunk: bytes) -> None:
        """Queue pre-encoded SockJS messages (comma-joined, UTF-8) and flush on the next IOLoop turn."""
        if self.is_closed:
            return
        self._chunks.append(chunk)
        self._queued_bytes += len(chunk)
        # Only data that waits behind an unfinished write counts against the client: a big batch
        # into an idle session goes out on the next turn whatever its size.
        if (self._queued_bytes > self._max_queue_bytes and self._blocked()
                and not self._write_finished_meanwhile()):
            log.warning("closing slow session %s (%d bytes queued)", self.session_id, self._queued_bytes)
            metrics.SLOW_SESSIONS_DROPPED.inc()
            self._chunks, self._queued_bytes = [], 0
            self.close(*SLOW_CLIENT_CLOSE)
            return
        if not self._pending_flush:
            self._pending_flush = True
            self.server.io_loop.add_callback(self.flush)

    def flush(self) -> None:
        """Send everything queued as one frame, unless a write is still in flight."""
        self._pending_flush = False
        handler = self.handler
        if not self._chunks or handler is None or not handler.active or self._writing:
            return
        # Bytes all the way: one copy per session for a single chunk, and Tornado writes bytes
        # without encoding them again.
        frame = b"".join((b"a[", b",".join(self._chunks), b"]"))
        self._chunks, self._queued_bytes = [], 0
        if isinstance(handler, tornado.websocket.WebSocketHandler):
            # sockjs-tornado drops the write's future; keep it to know when the socket took the
            # data, which is what bounds memory for a client that reads slowly.
            try:
                future = handler.write_message(frame)
            except tornado.websocket.WebSocketClosedError:
                self.server.io_loop.add_callback(handler.on_close)
                return
            self._writing = True
            self._write_future = future
            future.add_done_callback(self._write_done)
        else:
            # HTTP streaming/polling transports mark themselves inactive until the write is
            # flushed, then call flush() again.
            handler.send_pack(frame.decode())

    def _blocked(self) -> bool:
        """Whether a write is in flight, or no transport is attached (a poller between requests)."""
        handler = self.handler
        return self._writing or handler is None or not handler.active

    def _write_finished_meanwhile(self) -> bool:
        """Whether the write in flight has in fact reached the socket, with only its callback
        still to run (the IOLoop is behind); if so, send the queue now instead of blaming the client."""
        handler = self.handler
        if not self._writing or not isinstance(handler, tornado.websocket.WebSocketHandler):
            return False
        connection = handler.ws_connection
        if connection is None or connection.stream.writing():
            return False
        self._writing = False
        self.flush()
        return True

    def _write_done(self, future: typing.Any) -> None:
        if future is not self._write_future:
            return  # an earlier write, already known to be done (_write_finished_meanwhile)
        self._writing = False
        if future.exception() is None and self._chunks:
            self.flush()

    def close(self, code: int = 3000, message: str = "Go away!") -> None:
        self._chunks, self._queued_bytes = [], 0
        super().close(code, message)


class LiveConnection(SockJSConnection):
    """One browser: gets every topic's history on open, then the topics it subscribed to."""

    hub: LiveHub  # set on the subclass made by LiveHub.router()

    def on_open(self, info: typing.Any) -> None:
        self.topics: frozenset[str] | None = None  # None: every topic
        self.transport = self.session.transport_name
        metrics.LIVE_SESSIONS.labels(self.transport).inc()
        self.hub.add(self)

    def on_message(self, message: str) -> None:
        try:
            request = ujson.loads(message)
        except (ValueError, TypeError):
            return self.send_error("message is not valid JSON")
        if not isinstance(request, dict) or request.get("type") != "subscribe":
            return self.send_error('expected {"type": "subscribe", "topics": [...]}')
        topics = request.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            return self.send_error('"topics" must be a list of topic names')
        unknown = [t for t in topics if t not in self.hub.history]
        if unknown:
            return self.send_error(f"unknown topics: {', '.join(unknown)}")
        self.hub.subscribe(self, [t for t in self.hub.topics if t in topics])

    def on_close(self) -> None:
        transport = getattr(self, "transport", None)  # None: closed before it was opened
        if transport is not None:
            metrics.LIVE_SESSIONS.labels(transport).dec()
        self.hub.remove(self)

    def send_error(self, error: str) -> None:
        self.session.enqueue(wire.control_message({"type": "error", "error": error}))


class LiveHub:
    """Holds the per-topic histories and the open sessions, and fans batches out to them."""

    def __init__(self, topics: list[str], history_size: int):
        self.topics = list(topics)
        self.history = {topic: HistoryBuffer(topic, history_size) for topic in topics}
        self._topic_json = {topic: wire.topic_json(topic) for topic in topics}
        self.loaded = False
        self._connections: set[LiveConnection] = set()

    def router(self, prefix: str, settings: dict[str, typing.Any]) -> SockJSRouter:
        """A SockJS router for this hub; build it inside the running IOLoop."""
        connection = type("HubConnection", (LiveConnection,), {"hub": self})
        return SockJSRouter(connection, prefix, settings, session_kls=LiveSession)

    def session_count(self) -> int:
        return len(self._connections)

    def add(self, conn: LiveConnection) -> None:
        self._connections.add(conn)
        if self.loaded:
            self._send_history(conn, self.topics)

    def remove(self, conn: LiveConnection) -> None:
        self._connections.discard(conn)

    def subscribe(self, conn: LiveConnection, topics: list[str]) -> None:
        conn.topics = frozenset(topics)
        if self.loaded:
            self._send_history(conn, topics)

    def load_history(self, histories: dict[str, list[str]]) -> None:
        """The initial history is in: fill the buffers and greet sessions that were waiting."""
        for topic, envelopes in histories.items():
            self.history[topic].replace(envelopes)
            metrics.HISTORY_SIZE.labels(topic).set(len(self.history[topic]))
        self.loaded = True
        for conn in list(self._connections):
            self._send_history(conn, self.topics if conn.topics is None else [t for t in self.topics if t in conn.topics])

    def _send_history(self, conn: LiveConnection, topics: typing.Iterable[str]) -> None:
        frames = [self.history[t].frame() for t in topics]
        if frames:
            conn.session.enqueue(b",".join(frames))
            metrics.MESSAGES_DELIVERED.inc(sum(len(self.history[t]) for t in topics))

    def publish(self, batch: list[LiveRecord]) -> None:
        """Append a batch to the histories and send it to every session, encoded once."""
        by_topic: dict[str, list[str]] = {}
        for topic, _, envelope in batch:
            by_topic.setdefault(topic, []).append(envelope)
        for topic, envelopes in by_topic.items():
            self.history[topic].extend(envelopes)
            metrics.HISTORY_SIZE.labels(topic).set(len(self.history[topic]))
        if not self._connections or not self.loaded:
            return
        topic_json = self._topic_json
        frames = [(topic, wire.live_message(topic_json[topic], envelope)) for topic, _, envelope in batch]
        # Sessions with the same subscription share one joined, encoded chunk.
        chunks: dict[frozenset[str] | None, tuple[bytes, int]] = {}
        delivered = 0
        for conn in list(self._connections):
            key = conn.topics
            chunk = chunks.get(key)
            if chunk is None:
                selected = [f for t, f in frames if key is None or t in key]
                chunk = chunks[key] = (",".join(selected).encode(), len(selected))
            if chunk[1]:
                conn.session.enqueue(chunk[0])
                delivered += chunk[1]
        metrics.MESSAGES_DELIVERED.inc(delivered)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self._connections):
            conn.session.close(code, reason)
