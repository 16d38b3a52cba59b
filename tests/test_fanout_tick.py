"""The flush tick as pure logic: batches wait for it, it stretches when it takes long.

The hub runs on a stand-in loop that records what is scheduled instead of running it; the rest
of the live path is tested end to end over real sockets (test_live.py, test_transports.py).
"""

from __future__ import annotations

import collections
import time
import types
import typing

from proxy.live.fanout import MAX_PENDING_RECORDS, FanoutLimits, LiveHub


class RecordingLoop:
    """call_later / add_callback recorded, run by hand."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[float, typing.Callable[[], None]]] = []

    def call_later(self, delay: float, callback: typing.Callable[[], None]) -> None:
        self.scheduled.append((delay, callback))

    def add_callback(self, callback: typing.Callable[[], None]) -> None:
        self.scheduled.append((0.0, callback))

    def run_next(self) -> float:
        delay, callback = self.scheduled.pop(0)
        callback()
        return delay


def hub_on(loop: RecordingLoop, interval: float = 0.01) -> LiveHub:
    hub = LiveHub(["t"], history_size=10, limits=FanoutLimits(flush_interval=interval))
    hub._io_loop = loop  # type: ignore[assignment]
    return hub


def test_batches_reach_the_history_together_at_the_next_tick():
    loop = RecordingLoop()
    hub = hub_on(loop)
    hub.publish([("t", 1, '{"n":1}')])
    hub.publish([("t", 2, '{"n":2}'), ("t", 3, '{"n":3}')])
    # A session joining now gets the history without them, then them live: no duplicate, no gap.
    assert len(hub.history["t"]) == 0
    assert len(loop.scheduled) == 1, "one tick for every batch that arrives before it"
    assert loop.run_next() == 0.01
    assert hub.history["t"].envelopes() == ['{"n":1}', '{"n":2}', '{"n":3}']
    assert not loop.scheduled


def test_a_tick_that_took_longer_than_the_interval_stretches_the_next_one():
    loop = RecordingLoop()
    hub = hub_on(loop)
    hub._tick_cost = 0.25  # as if the last tick wrote to thousands of sessions
    hub.publish([("t", 1, '{"n":1}')])
    assert loop.scheduled[0][0] == 0.25
    hub_zero = hub_on(loop := RecordingLoop(), interval=0.0)
    hub_zero.publish([("t", 1, '{"n":1}')])
    assert loop.scheduled[0][0] == 0.0


def test_ingest_waits_while_too_many_records_wait_for_a_tick():
    loop = RecordingLoop()
    hub = hub_on(loop)
    hub.publish([("t", n, "{}") for n in range(MAX_PENDING_RECORDS)])
    assert not hub.congested()
    hub.publish([("t", 0, "{}")])
    assert hub.congested()
    loop.run_next()
    assert not hub.congested()


def test_polling_answers_are_spaced_out_more_as_polling_sessions_add_up():
    """Every poll answer is a whole HTTP exchange: together they stay near POLL_ANSWERS_PER_SECOND."""
    from proxy.live import fanout

    class Polling:
        def __init__(self, polling: bool) -> None:
            self.session = types.SimpleNamespace(handler=None, polling=polling)

    hub = hub_on(RecordingLoop())
    for polling, websockets, expected in ((10, 500, fanout.POLL_INTERVAL_MIN),
                                          (200, 0, 200 / fanout.POLL_ANSWERS_PER_SECOND),
                                          (5000, 0, fanout.POLL_INTERVAL_MAX)):
        hub._connections = {Polling(True) for _ in range(polling)} | {Polling(False) for _ in range(websockets)}
        hub.sweep()
        assert hub.poll_interval == expected


def test_polling_sessions_answered_together_are_answered_next_spread_out():
    """Sessions answered in one callback round (after a stall of the IOLoop) must not stay in step:
    their next answers spread over the jitter window, never sooner than the poll interval."""
    from proxy.live import session

    interval, now = 0.5, 1000.0
    due = [session.next_answer_at(now, interval) for _ in range(200)]
    assert min(due) >= now + interval
    assert max(due) <= now + interval * (1 + session.POLL_JITTER)
    window = interval * session.POLL_JITTER
    # Ten slots across the window: in step, all 200 would share one; spread, each holds ~20.
    slots = collections.Counter(min(9, int(10 * (t - now - interval) / window)) for t in due)
    assert len(slots) == 10 and max(slots.values()) <= 50, slots


def test_a_long_tick_writes_in_slices_so_the_ioloop_serves_sockets_between_them():
    from proxy.live import fanout

    class SlowSession:
        written = 0

        def writable(self) -> bool:
            return True

        def take(self) -> list[bytes]:
            return [b'"m"']

        def write(self, frame: bytes) -> None:
            deadline = time.thread_time() + 0.001  # a write that costs a millisecond of CPU
            while time.thread_time() < deadline:
                pass
            SlowSession.written += 1

    loop = RecordingLoop()
    hub = hub_on(loop)
    sessions = [SlowSession() for _ in range(40)]
    for session in sessions:
        hub.mark_dirty(session)  # type: ignore[arg-type]
    loop.run_next()  # the tick: its first slice
    slices = 1
    while loop.scheduled:
        assert SlowSession.written < len(sessions), "a slice was scheduled after the last write"
        loop.run_next()
        slices += 1
    assert SlowSession.written == len(sessions)
    assert slices >= 40 * 0.001 / fanout.TICK_SLICE / 2, slices
    assert hub._tick_cost >= 0.04  # the slices' CPU time, which spaces out the next tick
    hub.publish([("t", 1, "{}")])
    assert loop.scheduled[0][0] >= 0.04


def test_views_selecting_the_same_messages_share_one_chunk_counted_once():
    class Session:
        def __init__(self) -> None:
            self.chunks: list[bytes] = []

        def add_shared(self, chunk: bytes, size: int) -> int:
            self.chunks.append(chunk)
            return size

        def writable(self) -> bool:
            return False  # nothing is written here: the queues are what is looked at

    class PublicViews:
        """Every merchant sees every record (a public topic) except merchant "z", who sees none."""

        def index(self, batch: list[typing.Any]) -> list[None]:
            return [None] * len(batch)

        def select(self, merchant: str, texts: list[tuple[str, str]], owners: list[typing.Any],
                   topics: typing.Any) -> list[str]:
            return [] if merchant == "z" else [text for _, text in texts]

    loop = RecordingLoop()
    hub = hub_on(loop)
    hub.views = PublicViews()  # type: ignore[assignment]
    class Connection:
        topics = None

        def __init__(self, merchant: str) -> None:
            self.viewer = types.SimpleNamespace(merchant_id=merchant)
            self.session = Session()

    connections = [Connection(merchant) for merchant in ("a", "b", "b", "z")]
    hub._connections = set(connections)  # type: ignore[arg-type]
    hub.loaded = True
    hub.publish([("t", 1, '{"n":1}'), ("t", 2, '{"n":2}')])
    loop.run_next()
    queues = {id(conn): conn.session.chunks for conn in connections}
    a, b1, b2, z = (queues[id(conn)] for conn in connections)
    assert len(a) == len(b1) == len(b2) == 1 and not z
    assert a[0] is b1[0] is b2[0], "one quoted chunk for the three sessions of two merchants"
    assert b'\\"n\\":2' in a[0]
    assert hub.held_bytes == len(a[0])  # counted once, held three times
    hub.release(a)
    hub.release(b1)
    assert hub.held_bytes == len(a[0]), "a session still holds it"
    hub.release(b2)
    assert hub.held_bytes == 0


def test_a_shared_frame_in_use_is_kept_across_ticks_others_are_dropped():
    """Connects keep getting the histories' frame (one object, not a 421 kB join each) while they
    come; a frame nobody used since the tick before, or only one write ever used (a reader
    catching up alone), is let go at the tick."""
    loop = RecordingLoop()
    hub = hub_on(loop)
    hub.publish([("t", 1, '{"n":1}')])
    loop.run_next()
    history = [hub.history["t"].frame()]
    live, alone = [b'"live"'], [b'"alone"']
    first = hub.frame(list(history))
    assert hub.frame(list(live)) == b'a["live"]' and hub.frame(list(live)) == b'a["live"]'
    assert hub.frame(list(history)) is first
    hub.frame(list(alone))
    bytes_before = hub._frame_bytes
    hub._flush_tick()  # the shared ones were used since the last tick: kept; the lone one is not
    assert tuple(map(id, alone)) not in hub._frames
    assert hub._frame_bytes == bytes_before - len(b'a["alone"]')
    assert hub.frame(list(history)) is first
    hub._flush_tick()  # only the histories' frame was used since
    assert hub.frame(list(history)) is first
    assert tuple(map(id, live)) not in hub._frames
    hub._flush_tick()
    hub._flush_tick()  # unused for a whole tick: dropped, built anew when asked for again
    again = hub.frame(list(history))
    assert again == first and again is not first


class Queue:
    """A session's queue, as the hub fills it (nothing is written)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def enqueue(self, chunks: list[bytes]) -> None:
        self.chunks.extend(chunks)

    def add_shared(self, chunk: bytes, size: int) -> int:
        self.chunks.append(chunk)
        return size

    def writable(self) -> bool:
        return False


class Joining:
    """A connection joining the stream."""

    topics = None
    viewer = None

    def __init__(self) -> None:
        self.session = Queue()


def test_a_connect_gets_every_history_as_one_chunk_made_once_per_change():
    from proxy.live import fanout

    loop = RecordingLoop()
    hub = LiveHub(["t", "u"], history_size=10, limits=FanoutLimits(flush_interval=0.01))
    hub._io_loop = loop  # type: ignore[assignment]
    hub.load_history({"t": ['{"n":1}'], "u": ['{"m":1}']})
    first, second = Joining(), Joining()
    hub.add(first)  # type: ignore[arg-type]
    hub.add(second)  # type: ignore[arg-type]
    per_topic = [hub.history["t"].frame(), hub.history["u"].frame()]
    assert first.session.chunks == [b",".join(per_topic)]
    assert second.session.chunks[0] is first.session.chunks[0], "made once, shared"
    hub.publish([("t", 2, '{"n":2}')])
    loop.run_next()
    third = Joining()
    hub.add(third)  # type: ignore[arg-type]
    assert b'{\\"n\\":2}' in third.session.chunks[0] and b'{\\"n\\":2}' not in first.session.chunks[0]
    # A subscription to some topics gets theirs, one chunk each.
    subscriber = Joining()
    hub._connections.add(subscriber)  # type: ignore[arg-type]
    hub.subscribe(subscriber, ["u"])  # type: ignore[arg-type]
    assert subscriber.session.chunks == [hub.history["u"].frame()]
    # Histories larger than a write's worth stay one chunk per topic.
    big = LiveHub(["t", "u"], history_size=10, limits=FanoutLimits(flush_interval=0.01))
    half = '{"x":"' + "y" * (fanout.MAX_FRAME_BYTES // 2) + '"}'
    big.load_history({"t": [half], "u": [half]})
    joining = Joining()
    big.add(joining)  # type: ignore[arg-type]
    assert joining.session.chunks == [big.history["t"].frame(), big.history["u"].frame()]
