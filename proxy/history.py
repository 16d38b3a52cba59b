"""Per-topic history: the most recent messages of a topic, replayed to every new client."""

from __future__ import annotations

import collections
import typing

import ujson


def sockjs_quote(payload: str) -> str:
    """A JSON string literal of payload, as SockJS frames carry each message.

    ASCII-only output: some SockJS transports (and old browsers) mangle raw U+2028 and friends.
    """
    return ujson.dumps(payload, ensure_ascii=True, escape_forward_slashes=False)


class HistoryBuffer:
    """The last `size` envelopes of one topic (JSON text, oldest first) and its cached history frame."""

    def __init__(self, topic: str, size: int):
        self.topic = topic
        self.size = size
        self._envelopes: collections.deque[str] = collections.deque(maxlen=size)
        self._topic_json = ujson.dumps(topic)
        self._frame: bytes | None = None

    def __len__(self) -> int:
        return len(self._envelopes)

    def replace(self, envelopes: typing.Iterable[str]) -> None:
        """Set the whole history (oldest first); keeps only the last `size`."""
        self._envelopes = collections.deque(envelopes, maxlen=self.size)
        self._frame = None

    def extend(self, envelopes: typing.Iterable[str]) -> None:
        if self.size:
            self._envelopes.extend(envelopes)
            self._frame = None

    def last(self) -> str | None:
        return self._envelopes[-1] if self._envelopes else None

    def envelopes(self) -> list[str]:
        return list(self._envelopes)

    def frame(self) -> bytes:
        """The SockJS-quoted {"type": "history", ...} message (ASCII bytes), encoded once per change."""
        if self._frame is None:
            payload = '{"type":"history","topic":%s,"messages":[%s]}' % (
                self._topic_json, ",".join(self._envelopes))
            self._frame = sockjs_quote(payload).encode()
        return self._frame
