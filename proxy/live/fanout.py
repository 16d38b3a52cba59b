"""Live fan-out over SockJS: history on open, then every new message, coalesced per write.

Batches from Kafka wait for the next flush tick, which fans out everything that arrived since the
last one: each message is SockJS-encoded once per view (LiveHub._fan_out), and each session gets
one reference per tick to shared, pre-encoded chunks (history frames, live batches), never a
private copy. The tick then writes every session that has something queued and no write in
flight, in slices of TICK_SLICE between which the IOLoop serves its sockets (/health, connects);
sessions whose queues hold the same chunks share one frame object, written to each socket without
a copy. The next tick waits at least as long as the last one's CPU took, so at any number of
sessions the fan-out leaves half of the IOLoop's CPU to everything else and frames grow instead.

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
import itertools
import logging
import operator
import time
import typing

import tornado.ioloop
from sockjs.tornado import SockJSRouter

from proxy import metrics
from proxy.live import transports, wire
from proxy.live.access import EVERYTHING, LiveAccess, Viewer
from proxy.live.connection import LiveConnection
from proxy.live.history import HistoryBuffer
from proxy.live.merchant_view import MerchantViews
from proxy.live.session import MAX_FRAME_BYTES, LiveSession, drop_if_lost
from proxy.live.transports import REPLACEMENTS
from proxy.live.wire import LiveRecord

log = logging.getLogger(__name__)

_topic = operator.itemgetter(0)  # of a LiveRecord
_envelope = operator.itemgetter(2)

SLOW_CLIENT_CLOSE = (3008, "client too slow: send queue overflowed")
SHUTDOWN_CLOSE = (3000, "server shutting down")
# How often dead connections are looked for and lagging sessions judged.
SWEEP_INTERVAL = 1.0
# A session this many times its limit behind reads slower than the stream: closed at once.
HARD_LIMIT_FACTOR = 4
# Records waiting for the next flush tick beyond which ingest waits (a tick fans out at most this
# many plus one Kafka batch).
MAX_PENDING_RECORDS = 20_000
# A flush tick writes sessions for at most this long at a time, then lets the IOLoop serve sockets.
TICK_SLICE = 0.005
# Frames kept for sharing, at most (beyond, the cache starts over). A tick drops the frames no
# session used since the tick before, and those only one session used (a reader catching up
# alone, megabytes of them): what stays is what is shared, such as the histories' frame, which
# every connect would otherwise join again (421 kB each) until the histories change.
MAX_SHARED_FRAMES = 1000
MAX_SHARED_FRAME_BYTES = 32 * 1024 * 1024
# Polling sessions (one HTTP request per answer) are answered at most every poll_interval: at
# least POLL_INTERVAL_MIN, and long enough that all of them together cost about
# POLL_ANSWERS_PER_SECOND requests (200 polling sessions: one answer each per 0.5 s; each costs ~1 ms).
POLL_INTERVAL_MIN = 0.05
POLL_ANSWERS_PER_SECOND = 400
POLL_INTERVAL_MAX = 1.0


@dataclasses.dataclass(frozen=True)
class FanoutLimits:
    """The knobs of the fan-out (live.* in config.yaml)."""

    max_session_queue_bytes: int = 4 * 1024 * 1024
    max_queued_bytes: int = 256 * 1024 * 1024
    slow_client_timeout: float = 5.0
    flush_interval: float = 0.01


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
        self._by_view: dict[tuple[str | None, frozenset[str] | None], list[LiveSession]] | None = None
        self._dirty: set[LiveSession] = set()
        self._tick_scheduled = False
        # CPU seconds of the last flush tick's slices (the IOLoop thread's own time: not the gaps
        # between slices, nor the time the machine gave to other processes).
        self._tick_cost = 0.0
        self._to_write: list[LiveSession] = []  # sessions the running tick has yet to write
        # Records from Kafka since the last tick, fanned out together at the next one.
        self._pending: list[LiveRecord] = []
        # Frames by the ids of their chunks (see frame()): [frame, chunks, the tick it was last used
        # in, whether more than one write used it].
        self._frames: dict[tuple[int, ...], list[typing.Any]] = {}
        # Every topic's history as one chunk (the histories' chunks comma-joined) and its count of
        # messages, for the sessions that get them all; made on first use after a change (None),
        # () when they do not fit one chunk.
        self._everything: tuple[bytes, int] | tuple[()] | None = None
        self._frame_tick = 0
        # id(frame) -> [frame, its websocket encoding once a websocket session sent it]
        self._encodings: dict[int, list[typing.Any]] = {}
        self._frame_bytes = 0
        # The sessions over their own limit.
        self._over_limit: set[LiveSession] = set()
        self._over_budget_since: float | None = None
        # The memory all queues hold: each shared chunk counted once (id -> [chunk, holders]).
        self._holds: dict[int, list[typing.Any]] = {}
        self.held_bytes = 0
        # Read when /metrics is scraped: it changes twice per session per write.
        metrics.LIVE_QUEUED_BYTES.set_function(lambda: self.held_bytes)
        self.poll_interval = POLL_INTERVAL_MIN
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
        self._by_view = None
        if self.loaded:
            self._send_history(conn, self.topics)

    def remove(self, conn: LiveConnection) -> None:
        self._connections.discard(conn)
        self._by_view = None

    def subscribe(self, conn: LiveConnection, topics: list[str]) -> None:
        conn.topics = frozenset(topics)
        self._by_view = None
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
        self._everything = None
        for topic, envelopes in histories.items():
            self.history[topic].replace(envelopes)
            metrics.labelled(metrics.HISTORY_SIZE, topic).set(len(self.history[topic]))
        if self.views is not None:
            self.views.load(histories)
        self.loaded = True
        for conn in list(self._connections):
            self._send_history(conn, self.topics if conn.topics is None else [t for t in self.topics if t in conn.topics])

    def _send_history(self, conn: LiveConnection, topics: typing.Iterable[str]) -> None:
        viewer = conn.viewer or EVERYTHING
        if viewer.sees_everything or self.views is None:
            everything = self._everything_chunk() if topics is self.topics else None
            if everything is not None:
                # A connect's common case: one chunk to queue, hold and frame instead of one per topic.
                frames, count = [everything[0]], everything[1]
            else:
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

    def _everything_chunk(self) -> tuple[bytes, int] | None:
        """Every topic's history as one chunk and its count of messages, if it fits one: at most a
        write's worth (MAX_FRAME_BYTES), so that a session's progress through it is still seen
        write by write (made now if the histories changed since)."""
        if self._everything is None:
            frames = [self.history[topic].frame() for topic in self.topics]
            if frames and sum(map(len, frames)) + len(frames) <= MAX_FRAME_BYTES:
                self._everything = (b",".join(frames), sum(len(self.history[topic]) for topic in self.topics))
            else:
                self._everything = ()
        return self._everything if self._everything else None

    def publish(self, batch: list[LiveRecord]) -> None:
        """Queue a batch from Kafka: the next flush tick appends it to the histories and fans it out,
        together with every other batch that arrived meanwhile (per-session work is per tick, not
        per Kafka batch)."""
        if not batch:
            return
        self._pending.extend(batch)
        if self._io_loop is None:
            self._flush_tick()  # no router yet (nothing to write to): keep the histories current
        else:
            self._schedule_tick()

    def _fan_out(self, batch: list[LiveRecord]) -> None:
        """Append records to the histories and queue them for every session, encoded once per view."""
        changed = set()
        # Runs of one topic, each appended in C (a backlog batch is one long run).
        for topic, run in itertools.groupby(batch, key=_topic):
            self.history[topic].extend(map(_envelope, run))
            changed.add(topic)
        self._everything = None
        for topic in changed:
            metrics.labelled(metrics.HISTORY_SIZE, topic).set(len(self.history[topic]))
        owners = self.views.index(batch) if self.views is not None else None
        if not self._connections or not self.loaded:
            return
        messages = wire.message_texts(self._message_prefix, batch)
        texts: list[tuple[str, str]] | None = None  # (topic, message), for views that filter
        # Sessions with the same view (merchant, subscription) share one joined, encoded chunk:
        # each record is filtered and encoded once per merchant, not once per session.
        delivered = 0
        # Views that select the same messages (a public topic, the same subscription) share one
        # quoted chunk: by the ids of the texts, alive until the batch is done.
        quoted: dict[tuple[int, ...] | None, bytes] = {}
        for (merchant, topics), sessions in self._views().items():
            everything = merchant is None or self.views is None or owners is None
            if everything and topics is None:
                selected = messages
            else:
                if texts is None:
                    texts = list(zip(map(_topic, batch), messages))
                if everything:
                    selected = [text for t, text in texts if t in typing.cast(frozenset, topics)]
                else:
                    selected = typing.cast(MerchantViews, self.views).select(
                        typing.cast(str, merchant), texts, typing.cast(list, owners), topics)
            if selected:
                # Quoted for SockJS once per distinct selection, in one call for the whole batch.
                key = None if selected is messages else tuple(map(id, selected))
                chunk = quoted.get(key)
                if chunk is None:
                    chunk = quoted[key] = wire.sockjs_quote_many(selected)
                delivered += len(selected) * self._queue_shared(chunk, sessions)
        metrics.MESSAGES_DELIVERED.inc(delivered)

    def _views(self) -> dict[tuple[str | None, frozenset[str] | None], list[LiveSession]]:
        """The sessions grouped by what they see (merchant, subscription); kept until one joins,
        leaves or subscribes."""
        if self._by_view is None:
            self._by_view = {}
            for conn in self._connections:
                merchant = conn.viewer.merchant_id if conn.viewer is not None else None
                self._by_view.setdefault((merchant, conn.topics), []).append(conn.session)
        return self._by_view

    def _queue_shared(self, chunk: bytes, sessions: list[LiveSession]) -> int:
        """Queue one shared chunk for many sessions (the fan-out's inner loop: a few operations
        per session); returns how many took it."""
        size = len(chunk)
        limit = self.limits.max_session_queue_bytes
        dirty = self._dirty
        over = []
        taken = 0
        for session in sessions:
            pending = session.add_shared(chunk, size)
            if pending < 0:
                continue  # closed
            taken += 1
            dirty.add(session)
            if pending > limit:
                over.append(session)
        if taken:
            entry = self._holds.get(id(chunk))
            if entry is None:
                self._holds[id(chunk)] = [chunk, taken]
                self.held_bytes += size
            else:  # the chunk of another view too
                entry[1] += taken
            self._schedule_tick()
        for session in over:  # after the chunk is counted: closing one releases its share
            self._judge(session)
        return taken

    # ---- writing -----------------------------------------------------------------------------

    def mark_dirty(self, session: LiveSession) -> None:
        """The session has something to write: include it in the next flush tick."""
        self._dirty.add(session)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        if self._tick_scheduled or self._io_loop is None:
            return
        self._tick_scheduled = True
        # The next tick waits at least as long as the last one's CPU took: however many sessions
        # there are, ticks take at most about half of the proxy's CPU, and frames grow instead.
        # (Wall time would count what a busy machine and the callbacks between slices took too:
        # at 2,000 sessions on 2 shared cores ticks then stretched to 0.3-1 s, and latency with them.)
        delay = max(self.limits.flush_interval, self._tick_cost)
        if delay > 0:
            self._io_loop.call_later(delay, self._flush_tick)
        else:
            self._io_loop.add_callback(self._flush_tick)

    def _flush_tick(self) -> None:
        """Fan out what arrived since the last tick, then write every session that can take a
        write (in slices, see _write_slice); equal queues share one frame object."""
        started = time.monotonic()
        cpu_started = time.thread_time()
        try:
            if self._pending:
                batch, self._pending = self._pending, []
                self._fan_out(batch)  # sessions it makes dirty are written below, not at another tick
        except BaseException:
            self._tick_scheduled = False  # whatever happened, the stream goes on at the next tick
            raise
        self._age_frames()
        self._to_write = list(self._dirty)
        self._dirty = set()
        self._tick_cost = time.thread_time() - cpu_started  # the fan-out's; the slices add theirs
        self._write_slice(started)

    def _write_slice(self, started: float | None = None) -> None:
        """Write sessions of this tick for up to TICK_SLICE seconds, then let the IOLoop serve
        sockets (/health, connects, requests) before the next slice; the tick ends with the last."""
        started = time.monotonic() if started is None else started
        deadline = started + TICK_SLICE if self._io_loop is not None else float("inf")
        cpu_started = time.thread_time()
        to_write = self._to_write
        try:
            while to_write:
                session = to_write.pop()
                if session.writable():  # if not: a write in flight or no transport; it comes back then
                    session.write(self.frame(session.take()))
                if time.monotonic() >= deadline:
                    break
        except BaseException:
            to_write.clear()
            raise
        finally:
            self._tick_cost += time.thread_time() - cpu_started
            if not to_write:
                metrics.LIVE_FLUSH_SECONDS.observe(self._tick_cost)
                self._tick_scheduled = False
                if self._pending or self._dirty:
                    self._schedule_tick()
        if to_write:
            typing.cast(tornado.ioloop.IOLoop, self._io_loop).add_callback(self._write_slice)

    def frame(self, chunks: list[bytes]) -> bytes:
        """The SockJS frame (b'a[...]') of these chunks; sessions writing the same chunks (a burst
        of connects getting the same histories, a tick's in-sync sessions) share one object
        instead of joining a private copy each. Kept while in use (see _age_frames)."""
        key = tuple(map(id, chunks))
        entry = self._frames.get(key)
        if entry is None:
            frame = b"".join((b"a[", b",".join(chunks), b"]"))
            if self._frame_bytes + len(frame) > MAX_SHARED_FRAME_BYTES or len(self._frames) >= MAX_SHARED_FRAMES:
                self._clear_frames()
            # The entry keeps its chunks alive, so their ids cannot be reused while it is cached.
            entry = self._frames[key] = [frame, chunks, self._frame_tick, False]
            self._encodings[id(frame)] = [frame, None]
            self._frame_bytes += len(frame)
        else:
            entry[2] = self._frame_tick
            entry[3] = True
        return entry[0]

    def websocket_parts(self, frame: bytes) -> tuple[bytes, ...]:
        """The frame encoded for a websocket, once per shared frame (see frame())."""
        cached = self._encodings.get(id(frame))
        if cached is None or cached[0] is not frame:  # not a shared frame (the cache keeps those alive)
            return transports.websocket_frame(frame)
        if cached[1] is None:
            cached[1] = transports.websocket_frame(frame)
            self._frame_bytes += len(cached[1][0])
        return cached[1]

    def _age_frames(self) -> None:
        """At a tick: drop the frames not used since the tick before, and those never shared."""
        tick = self._frame_tick
        stale = [key for key, entry in self._frames.items() if entry[2] < tick or not entry[3]]
        for key in stale:
            frame = self._frames.pop(key)[0]
            encoding = self._encodings.pop(id(frame))[1]
            self._frame_bytes -= len(frame) + (len(encoding[0]) if encoding is not None else 0)
        self._frame_tick = tick + 1

    def _clear_frames(self) -> None:
        self._frames.clear()
        self._encodings.clear()
        self._frame_bytes = 0

    # ---- memory bounds -----------------------------------------------------------------------

    def account(self, session: LiveSession, added: int) -> None:
        """The session's pending bytes changed: schedule its write, judge it against its limit."""
        if added <= 0:
            return
        self.mark_dirty(session)
        if session.pending_bytes > self.limits.max_session_queue_bytes:
            self._judge(session)

    def _judge(self, session: LiveSession) -> None:
        """The session is over its limit: note since when; far over it, close it."""
        if session not in self._over_limit:
            session.over_limit_since = time.monotonic()
            self._over_limit.add(session)
        if session.pending_bytes > self.limits.max_session_queue_bytes * HARD_LIMIT_FACTOR:
            self._close_slow(session)

    def settle(self, session: LiveSession) -> None:
        """The session's pending bytes went down: it may be back within its limit."""
        if session in self._over_limit and session.pending_bytes <= self.limits.max_session_queue_bytes:
            self._over_limit.discard(session)
            session.over_limit_since = None

    def hold(self, chunks: list[bytes]) -> None:
        """A session queued these chunks: count each object's bytes once, however many hold it."""
        holds = self._holds
        for chunk in chunks:
            entry = holds.get(id(chunk))
            if entry is None:
                holds[id(chunk)] = [chunk, 1]
                self.held_bytes += len(chunk)
            else:
                entry[1] += 1

    def release(self, chunks: list[bytes]) -> None:
        """A session is done with these chunks (written, or closed)."""
        holds = self._holds
        for chunk in chunks:
            entry = holds.get(id(chunk))
            if entry is None:
                continue
            entry[1] -= 1
            if not entry[1]:
                del holds[id(chunk)]
                self.held_bytes -= len(chunk)

    def congested(self) -> bool:
        """Whether ingest should wait: a session, or all of them, is too far behind (thread-safe read)."""
        return (bool(self._over_limit) or self.held_bytes > self.limits.max_queued_bytes
                or len(self._pending) > MAX_PENDING_RECORDS)

    def sweep(self) -> None:
        """Every second: drop sessions whose connection died, close sessions that stopped keeping up."""
        now = time.monotonic()
        polling = 0
        for conn in list(self._connections):
            drop_if_lost(conn.session.handler)
            polling += conn.session.polling
        self.poll_interval = min(POLL_INTERVAL_MAX, max(POLL_INTERVAL_MIN, polling / POLL_ANSWERS_PER_SECOND))
        timeout = self.limits.slow_client_timeout
        # Over the limit and no write completed for a while: the client stopped reading.
        for session in [s for s in self._over_limit if s.stalled_for(now) > timeout]:
            self._close_slow(session)
        if self.held_bytes > self.limits.max_queued_bytes:
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
            if self.held_bytes <= target or not session.pending_bytes:
                break
            self._close_slow(session)
        self._over_budget_since = None

    def _close_slow(self, session: LiveSession) -> None:
        log.warning("closing slow session %s (%d bytes behind)", session.session_id, session.pending_bytes)
        metrics.SLOW_SESSIONS_DROPPED.inc()
        self._over_limit.discard(session)
        session.close(*SLOW_CLIENT_CLOSE)
