"""Per-topic history: the most recent messages of a topic, replayed to every new client."""

from __future__ import annotations

import collections
import typing

from proxy.live import wire


class HistoryBuffer:
    """The last `size` envelopes of one topic (JSON text, oldest first) and its cached history frame."""

    def __init__(self, topic: str, size: int):
        self.topic = topic
        self.size = size
        self._envelopes: collections.deque[str] = collections.deque(maxlen=size)
        self._topic_json = wire.topic_json(topic)
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
            self._frame = wire.history_message(self._topic_json, self._envelopes)
        return self._frame
