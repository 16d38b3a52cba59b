"""The live stream as one merchant may see it, decided record by record by the export's policy.

Only used when live.access is "token". Each record's owner is read once (when it arrives), and
sessions are grouped by merchant, so a record is filtered and encoded once per merchant, not
once per session. A merchant's history holds the newest `history_size` records *it may see* of
each topic: the hub keeps a deeper per-topic buffer (history_size x DEPTH records, sharing the
envelope strings with the open history) and a merchant's history frame is cut from it and cached
until the topic changes.
"""

from __future__ import annotations

import collections
import typing

import ujson

from proxy.live import wire
from proxy.live.wire import LiveRecord
from proxy.policy import VisibilityPolicy, owner_of

# How many times history_size records per topic are searched for a merchant's history.
DEPTH = 20
# Cached merchant history frames per topic; beyond this (many tokens on a quiet topic) start over.
MAX_CACHED_FRAMES = 1000


def record_owner(envelope: str) -> typing.Any:
    """The owner of an envelope's value (None: no merchant_id, or not decodable here)."""
    try:
        value = ujson.loads(envelope)["value"]
    except (ValueError, KeyError, TypeError):
        return None
    return owner_of(value) if isinstance(value, dict) else None


class MerchantViews:
    """Per-merchant filtering of live batches, and merchants' history frames."""

    def __init__(self, policy: VisibilityPolicy, topics: list[str], history_size: int):
        self.policy = policy
        self.history_size = history_size
        self._recent: dict[str, collections.deque[tuple[typing.Any, str]]] = {
            topic: collections.deque(maxlen=history_size * DEPTH) for topic in topics}
        self._topic_json = {topic: wire.topic_json(topic) for topic in topics}
        # (topic, merchant) -> (count of the history, its frame); dropped whenever the topic changes.
        self._frames: dict[str, dict[str, tuple[int, bytes]]] = {topic: {} for topic in topics}

    @property
    def depth(self) -> int:
        """Records per topic kept for merchants' histories (the ingest's history load reads as many)."""
        return self.history_size * DEPTH

    def visible_topics(self, merchant_id: str, topics: typing.Iterable[str]) -> list[str]:
        """The topics of which the merchant may see anything at all (exportable ones)."""
        return [topic for topic in topics if self.policy.is_exportable(topic)]

    def load(self, histories: dict[str, list[str]]) -> None:
        for topic, envelopes in histories.items():
            recent = self._recent[topic]
            recent.clear()
            recent.extend((record_owner(envelope), envelope) for envelope in envelopes)
            self._frames[topic].clear()

    def index(self, batch: list[LiveRecord]) -> list[typing.Any]:
        """Remember a batch for merchants' histories; the owner of each record, in batch order."""
        owners = [record_owner(envelope) for _, _, envelope in batch]
        changed = set()
        for (topic, _, envelope), owner in zip(batch, owners):
            self._recent[topic].append((owner, envelope))
            changed.add(topic)
        for topic in changed:
            self._frames[topic].clear()
        return owners

    def select(self, merchant_id: str, texts: list[tuple[str, str]], owners: list[typing.Any],
               topics: frozenset[str] | None) -> list[str]:
        """The live messages of a batch the merchant may see (of its subscribed topics)."""
        visible = self.policy.is_visible_owner
        return [text for (topic, text), owner in zip(texts, owners)
                if (topics is None or topic in topics) and visible(topic, owner, merchant_id)]

    def history_frame(self, topic: str, merchant_id: str) -> tuple[int, bytes]:
        """(count, SockJS-quoted history message) of the newest records of topic the merchant may see."""
        cached = self._frames[topic].get(merchant_id)
        if cached is not None:
            return cached
        visible = self.policy.is_visible_owner
        newest: list[str] = []
        if self.history_size:
            for owner, envelope in reversed(self._recent[topic]):
                if visible(topic, owner, merchant_id):
                    newest.append(envelope)
                    if len(newest) == self.history_size:
                        break
        newest.reverse()
        frame = (len(newest), wire.history_message(self._topic_json[topic], newest))
        cache = self._frames[topic]
        if len(cache) >= MAX_CACHED_FRAMES:
            cache.clear()
        cache[merchant_id] = frame
        return frame
