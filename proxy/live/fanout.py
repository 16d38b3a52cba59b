"""Live fan-out over SockJS: history on open, then every new message, coalesced per write.

Each message is SockJS-encoded once (LiveHub.publish); sessions hold references to shared,
pre-encoded chunks (history frames, live batches), never private copies. A flush tick writes
every session that has something queued and no write in flight; sessions whose queues hold the
same chunks share one frame object, written to each socket without a copy.

Memory is bounded per session and for the whole process, and a client that reads at full speed
is never closed: when a session falls more than `max_session_queue_bytes` behind (or all sessions
together more than `max_queued_bytes`), the hub reports congestion and ingest waits, up to
`slow_client_timeout` at a time (Kafka keeps the backlog; frames grow: the stream degrades by
coalescing, not by eviction). A session is judged by its socket, not by how much the proxy had to
queue: it is closed (3008) when it is over its limit and its last write has not completed for
`slow_client_timeout` (it stopped reading), or when it falls HARD_LIMIT_FACTOR times its limit
behind (it reads, but slower than the stream); over the total budget, furthest behind first.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing

import tornado.ioloop
import tornado.websocket
import ujson
from sockjs.tornado import SockJSConnection, SockJSRouter
from sockjs.tornado.session import Session

from proxy import metrics
from proxy.live import wire
from proxy.live.access import EVERYTHING, UNAUTHORIZED_CLOSE, LiveAccess, Viewer
from proxy.live.history import HistoryBuffer
from proxy.live.merchant_view import MerchantViews
from proxy.live.transports import REPLACEMENTS, LiveWebSocketTransport
from proxy.live.wire import LiveRecord

log = logging.getLogger(__name__)

SLOW_CLIENT_CLOSE = (3008, "client too slow: send queue overflowed")
SHUTDOWN_CLOSE = (3000, "server shutting down")
# How often dead connections are looked for and lagging sessions judged.
SWEEP_INTERVAL = 1.0
# A write takes at most this much of a session's queue (at least one chunk), so a write completes
# quickly and the session's progress is seen at a fine grain.
MAX_FRAME_BYTES = 1024 * 1024
# A session this many times its limit behind reads slower than the stream: closed at once.
HARD_LIMIT_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class FanoutLimits:
    """The knobs of the fan-out (live.* in config.yaml)."""

    max_session_queue_bytes: int = 4 * 1024 * 1024
    max_queued_bytes: int = 256 * 1024 * 1024
    slow_client_timeout: float = 5.0
    flush_interval: float = 0.005


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
        self._writing = False
        self._write_future: typing.Any = None
        self.over_limit_since: float | None = None
        # When the write now in flight started (None: none is); a write that does not complete
        # means the client does not read.
        self.write_started: float | None = None

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
        added = sum(map(len, chunks))
        self.queued_bytes += added
        self.hub.account(self, added)

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
        return chunks

    def writable(self) -> bool:
        handler = self.handler
        return bool(self._chunks) and handler is not None and handler.active and not self._writing

    def stalled_for(self, now: float) -> float:
        """Seconds the client has not taken data it could have: a write in flight, or (no
        transport attached, e.g. a poller that stopped polling) since it went over its limit."""
        if self.write_started is not None:
            return now - self.write_started
        if self.over_limit_since is not None and not self.writable():
            return now - self.over_limit_since
        return 0.0

    def write(self, frame: bytes) -> None:
        """Send one SockJS frame (b'a[...]') built from take()n chunks."""
        handler = self.handler
        self.write_started = time.monotonic()
        if isinstance(handler, LiveWebSocketTransport):
            try:
                future = handler.write_frame(frame)
            except tornado.websocket.WebSocketClosedError:
                self._write_finished(None)
                self.server.io_loop.add_callback(handler.drop)
                return
            self._writing = True
            self._write_future = future
            future.add_done_callback(self._write_finished)
        else:
            # HTTP transports mark themselves inactive until the write is flushed, then call
            # flush() again; the write counts as done then.
            send_frame = getattr(handler, "send_frame", None)
            if send_frame is not None:
                send_frame(frame)
            else:
                handler.send_pack(frame.decode())
            self._write_finished(None)
            self.write_started = time.monotonic()  # until the transport calls flush() again

    def flush(self) -> None:
        """Write what is queued now, if a transport can take it (sockjs-tornado calls this when a
        transport attaches or finished a write)."""
        self._pending_flush = False
        self.write_started = None
        if self.writable():
            self.write(b"".join((b"a[", b",".join(self.take()), b"]")))

    def _write_finished(self, future: typing.Any) -> None:
        if future is not None and future is not self._write_future:
            return
        self._writing = False
        self._write_future = None
        self.write_started = None
        self.hub.account(self, -self.in_flight_bytes)
        self.in_flight_bytes = 0
        if future is not None and future.exception() is not None:
            return  # the connection is gone; the sweep or on_close drops the session
        self.hub.settle(self)
        if self._chunks:
            self.hub.mark_dirty(self)

    def _heartbeat(self) -> None:
        if not drop_if_lost(self.handler):
            super()._heartbeat()

    def close_after_flush(self, code: int, message: str) -> None:
        """Close, but first send what is queued (e.g. the error that says why)."""
        handler = self.handler
        if self._chunks and handler is not None and not self.is_closed:
            frame = b"".join((b"a[", b",".join(self.take()), b"]"))
            if isinstance(handler, LiveWebSocketTransport):
                handler.send_pack(frame.decode())  # ordered before the close frame on the same stream
            elif handler.active:
                handler.send_pack(frame.decode())
        self.close(code, message)

    def close(self, code: int = 3000, message: str = "Go away!") -> None:
        if self._chunks or self.in_flight_bytes:
            self.hub.account(self, -self.pending_bytes)
        self._chunks, self.queued_bytes, self.in_flight_bytes = [], 0, 0
        self.hub.settle(self)
        super().close(code, message)


class LiveConnection(SockJSConnection):
    """One browser: gets every topic's history on open, then the topics it subscribed to.

    In token mode (live.access: token) it first has to say who it is: {"type": "auth", "token": T}.
    """

    hub: LiveHub  # set on the subclass made by LiveHub.router()

    def on_open(self, info: typing.Any) -> None:
        self.topics: frozenset[str] | None = None  # None: every topic
        self.transport = self.session.transport_name
        self.viewer: Viewer | None = None
        self._token: str | None = None
        self._auth_timer: typing.Any = None
        metrics.LIVE_SESSIONS.labels(self.transport).inc()
        if self.hub.access.requires_token:
            self._auth_timer = self.session.server.io_loop.call_later(self.hub.access.auth_timeout,
                                                                      self._auth_timed_out)
        else:
            self.viewer = EVERYTHING
            self.hub.add(self)

    def on_message(self, message: str) -> None:
        try:
            request = ujson.loads(message)
        except (ValueError, TypeError):
            return self.send_error("message is not valid JSON")
        kind = request.get("type") if isinstance(request, dict) else None
        if kind == "auth":
            return self._authenticate(request.get("token"))
        if kind != "subscribe":
            return self.send_error('expected {"type": "subscribe", "topics": [...]}')
        if self.viewer is None:
            return self.send_error('authenticate first: send {"type": "auth", "token": "<token>"}')
        topics = request.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            return self.send_error('"topics" must be a list of topic names')
        unknown = [t for t in topics if t not in self.hub.history]
        if unknown:
            return self.send_error(f"unknown topics: {', '.join(unknown)}")
        hidden = [t for t in topics if t not in self.hub.visible_topics(self.viewer)]
        if hidden:
            return self.send_error(f"topics not visible to this merchant: {', '.join(hidden)}")
        self.hub.subscribe(self, [t for t in self.hub.topics if t in topics])

    def _authenticate(self, token: typing.Any) -> None:
        access = self.hub.access
        if not access.requires_token:
            return self.send_error("live access is open: no authentication needed")
        if self.viewer is not None:
            # The same token again is harmless; another one would change whose view this is.
            if isinstance(token, str) and self._token is not None and access.same_token(token, self._token):
                return self._send([self.viewer.auth_answer()])
            return self._refuse("already authenticated with another token")
        viewer = access.viewer_for(token)
        if viewer is None:
            return self._refuse('"token" must be a non-empty string')
        self._cancel_auth_timer()
        self.viewer, self._token = viewer, token
        self._send([viewer.auth_answer()])
        self.hub.add(self)

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.viewer is None:
            self._refuse(f"no auth message within {self.hub.access.auth_timeout:g} s")

    def _refuse(self, error: str) -> None:
        self._cancel_auth_timer()
        self.send_error(error)
        self.session.close_after_flush(*UNAUTHORIZED_CLOSE)

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None:
            self.session.server.io_loop.remove_timeout(self._auth_timer)
            self._auth_timer = None

    def on_close(self) -> None:
        transport = getattr(self, "transport", None)  # None: closed before it was opened
        if transport is not None:
            metrics.LIVE_SESSIONS.labels(transport).dec()
            self._cancel_auth_timer()
        self.hub.remove(self)

    def send_error(self, error: str) -> None:
        self._send([{"type": "error", "error": error}])

    def _send(self, bodies: list[dict[str, typing.Any]]) -> None:
        self.session.enqueue([wire.control_message(body) for body in bodies])


class LiveHub:
    """Holds the per-topic histories and the open sessions, and fans batches out to them."""

    def __init__(self, topics: list[str], history_size: int, limits: FanoutLimits | None = None,
                 access: LiveAccess | None = None, views: MerchantViews | None = None):
        """views: how merchants see the stream; needed when access requires tokens."""
        self.topics = list(topics)
        self.history = {topic: HistoryBuffer(topic, history_size) for topic in topics}
        self.limits = limits or FanoutLimits()
        self.access = access or LiveAccess()
        self.views = views
        if self.access.requires_token and views is None:
            raise ValueError("token access needs merchant views")
        self._message_prefix = {topic: wire.message_prefix(topic) for topic in topics}
        self.loaded = False
        self._connections: set[LiveConnection] = set()
        self._dirty: set[LiveSession] = set()
        self._tick_scheduled = False
        # Bytes queued or in flight over all sessions, and the sessions over their own limit.
        self.queued_bytes = 0
        self._over_limit: set[LiveSession] = set()
        self._over_budget_since: float | None = None
        self._sweeper: tornado.ioloop.PeriodicCallback | None = None
        self._io_loop: tornado.ioloop.IOLoop | None = None

    def router(self, prefix: str, settings: dict[str, typing.Any]) -> SockJSRouter:
        """A SockJS router for this hub; build it inside the running IOLoop."""
        connection = type("HubConnection", (LiveConnection,), {"hub": self})
        router = SockJSRouter(connection, prefix, dict(settings, hub=self), session_kls=LiveSession)
        router._transport_urls = [(pattern, REPLACEMENTS.get(handler, handler), kwargs)
                                  for pattern, handler, kwargs in router.urls]
        self._io_loop = router.io_loop
        self._sweeper = tornado.ioloop.PeriodicCallback(self.sweep, SWEEP_INTERVAL * 1000)
        self._sweeper.start()
        return router

    def session_count(self) -> int:
        return len(self._connections)

    # ---- sessions ----------------------------------------------------------------------------

    def visible_topics(self, viewer: Viewer) -> list[str]:
        """The live topics a viewer may see anything of, in configuration order."""
        if viewer.sees_everything or self.views is None:
            return self.topics
        return self.views.visible_topics(viewer.merchant_id or "", self.topics)

    def add(self, conn: LiveConnection) -> None:
        """An (authenticated) session joins the stream: its history now, then live messages."""
        self._connections.add(conn)
        if self.loaded:
            self._send_history(conn, self.topics)

    def remove(self, conn: LiveConnection) -> None:
        self._connections.discard(conn)

    def subscribe(self, conn: LiveConnection, topics: list[str]) -> None:
        conn.topics = frozenset(topics)
        if self.loaded:
            self._send_history(conn, topics)

    def close_all(self, code: int, reason: str) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
        for conn in list(self._connections):
            conn.session.close(code, reason)

    # ---- messages ----------------------------------------------------------------------------

    def load_history(self, histories: dict[str, list[str]]) -> None:
        """The initial history is in: fill the buffers and greet sessions that were waiting."""
        for topic, envelopes in histories.items():
            self.history[topic].replace(envelopes)
            metrics.HISTORY_SIZE.labels(topic).set(len(self.history[topic]))
        if self.views is not None:
            self.views.load(histories)
        self.loaded = True
        for conn in list(self._connections):
            self._send_history(conn, self.topics if conn.topics is None else [t for t in self.topics if t in conn.topics])

    def _send_history(self, conn: LiveConnection, topics: typing.Iterable[str]) -> None:
        viewer = conn.viewer or EVERYTHING
        if viewer.sees_everything or self.views is None:
            # The cached frames themselves: a session holds references, never a copy.
            topics = list(topics)
            frames = [self.history[t].frame() for t in topics]
            count = sum(len(self.history[t]) for t in topics)
        else:
            visible = set(self.visible_topics(viewer))
            cut = [self.views.history_frame(t, viewer.merchant_id or "") for t in topics if t in visible]
            frames, count = [frame for _, frame in cut], sum(n for n, _ in cut)
        if frames:
            conn.session.enqueue(frames)
            metrics.MESSAGES_DELIVERED.inc(count)

    def publish(self, batch: list[LiveRecord]) -> None:
        """Append a batch to the histories and queue it for every session, encoded once."""
        by_topic: dict[str, list[str]] = {}
        for topic, _, envelope in batch:
            by_topic.setdefault(topic, []).append(envelope)
        for topic, envelopes in by_topic.items():
            self.history[topic].extend(envelopes)
            metrics.HISTORY_SIZE.labels(topic).set(len(self.history[topic]))
        owners = self.views.index(batch) if self.views is not None else None
        if not self._connections or not self.loaded:
            return
        prefix = self._message_prefix
        texts = [(topic, prefix[topic] + envelope + "}") for topic, _, envelope in batch]
        # Sessions with the same view (merchant, subscription) share one joined, encoded chunk:
        # each record is filtered and encoded once per merchant, not once per session.
        chunks: dict[tuple[str | None, frozenset[str] | None], tuple[list[bytes], int]] = {}
        delivered = 0
        for conn in list(self._connections):
            topics = conn.topics
            merchant = conn.viewer.merchant_id if conn.viewer is not None else None
            key = (merchant, topics)
            chunk = chunks.get(key)
            if chunk is None:
                if merchant is None or self.views is None or owners is None:
                    selected = [text for t, text in texts if topics is None or t in topics]
                else:
                    selected = self.views.select(merchant, texts, owners, topics)
                # Quoted for SockJS once per distinct view, in one call for the whole batch.
                chunk = chunks[key] = ([wire.sockjs_quote_many(selected)] if selected else [], len(selected))
            if chunk[1]:
                conn.session.enqueue(chunk[0])
                delivered += chunk[1]
        metrics.MESSAGES_DELIVERED.inc(delivered)

    # ---- writing -----------------------------------------------------------------------------

    def mark_dirty(self, session: LiveSession) -> None:
        """The session has something to write: include it in the next flush tick."""
        self._dirty.add(session)
        if not self._tick_scheduled and self._io_loop is not None:
            self._tick_scheduled = True
            delay = self.limits.flush_interval
            if delay > 0:
                self._io_loop.call_later(delay, self._flush_tick)
            else:
                self._io_loop.add_callback(self._flush_tick)

    def _flush_tick(self) -> None:
        """Write every session that can take a write; equal queues share one frame object."""
        self._tick_scheduled = False
        dirty, self._dirty = self._dirty, set()
        frames: dict[tuple[int, ...], bytes] = {}
        keep_alive: list[list[bytes]] = []  # chunk ids must stay unique while they key `frames`
        for session in dirty:
            if not session.writable():
                continue  # a write in flight or no transport: it comes back when that changes
            chunks = session.take()
            keep_alive.append(chunks)
            key = tuple(map(id, chunks))
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = b"".join((b"a[", b",".join(chunks), b"]"))
            session.write(frame)

    # ---- memory bounds -----------------------------------------------------------------------

    def account(self, session: LiveSession, added: int) -> None:
        """Track queued bytes; judge the session and the whole process against their limits."""
        self.queued_bytes += added
        metrics.LIVE_QUEUED_BYTES.set(self.queued_bytes)
        if added <= 0:
            return
        self.mark_dirty(session)
        limit = self.limits.max_session_queue_bytes
        if session.pending_bytes > limit and session not in self._over_limit:
            session.over_limit_since = time.monotonic()
            self._over_limit.add(session)
        if session.pending_bytes > limit * HARD_LIMIT_FACTOR:
            self._close_slow(session)

    def settle(self, session: LiveSession) -> None:
        """The session's pending bytes went down: it may be back within its limit."""
        if session in self._over_limit and session.pending_bytes <= self.limits.max_session_queue_bytes:
            self._over_limit.discard(session)
            session.over_limit_since = None

    def congested(self) -> bool:
        """Whether ingest should wait: a session, or all of them, is too far behind (thread-safe read)."""
        return bool(self._over_limit) or self.queued_bytes > self.limits.max_queued_bytes

    def sweep(self) -> None:
        """Every second: drop sessions whose connection died, close sessions that stopped keeping up."""
        now = time.monotonic()
        for conn in list(self._connections):
            drop_if_lost(conn.session.handler)
        timeout = self.limits.slow_client_timeout
        # Over the limit and no write completed for a while: the client stopped reading.
        for session in [s for s in self._over_limit if s.stalled_for(now) > timeout]:
            self._close_slow(session)
        if self.queued_bytes > self.limits.max_queued_bytes:
            if self._over_budget_since is None:
                self._over_budget_since = now
            elif now - self._over_budget_since > timeout:
                self._shed_furthest_behind()
        else:
            self._over_budget_since = None

    def _shed_furthest_behind(self) -> None:
        sessions = sorted((conn.session for conn in self._connections), key=lambda s: s.pending_bytes, reverse=True)
        target = self.limits.max_queued_bytes * 0.9
        for session in sessions:
            if self.queued_bytes <= target or not session.pending_bytes:
                break
            self._close_slow(session)
        self._over_budget_since = None

    def _close_slow(self, session: LiveSession) -> None:
        log.warning("closing slow session %s (%d bytes behind)", session.session_id, session.pending_bytes)
        metrics.SLOW_SESSIONS_DROPPED.inc()
        self._over_limit.discard(session)
        session.close(*SLOW_CLIENT_CLOSE)
