"""Who may see what: merchant identity from a token and the per-topic visibility rules.

This module is the only place that decides visibility; the CSV export asks it for every row,
the live stream for the fields nobody is shown. The rules themselves are data (export.topics in config.yaml).
"""

from __future__ import annotations

import base64
import hashlib
import typing
from collections.abc import Iterable, Iterator, Mapping


class TopicRules(typing.Protocol):
    """One topic's visibility rules, as configured (export.topics.<topic> in config.yaml)."""

    policy: str
    columns: list[str] | None
    drop_columns: list[str]
    flatten: str | None
    parent_fields: dict[str, str]


OWNER_FIELD = "merchant_id"


def owner_of(message: Mapping[str, typing.Any]) -> typing.Any:
    """The merchant a message belongs to (its merchant_id field), None if it has none."""
    return message.get(OWNER_FIELD)


def merchant_id_for(token: str) -> str:
    """A merchant's public id: base64 (standard alphabet, padded) of sha256 of its token."""
    return base64.b64encode(hashlib.sha256(token.encode("utf-8")).digest()).decode("ascii")


def token_from_authorization(header: str | None) -> str | None:
    """The token of an Authorization header ("Token t", "Bearer t" or a bare "t"); None if blank."""
    if header is None:
        return None
    parts = header.split()
    if len(parts) == 1 and parts[0].lower() not in ("token", "bearer"):
        return parts[0]
    if len(parts) == 2 and parts[0].lower() in ("token", "bearer"):
        return parts[1]
    # Blank, a scheme without a token, or anything else (e.g. Basic credentials): no token.
    return None


class VisibilityPolicy:
    """Decides, per topic and merchant, which messages and CSV rows a merchant may see."""

    def __init__(self, rules: Mapping[str, TopicRules]):
        """rules: per exportable topic, in configuration order; any other topic is never shown."""
        self._rules: dict[str, TopicRules] = dict(rules)

    def is_exportable(self, topic: str) -> bool:
        return topic in self._rules

    def exportable_topics(self) -> list[str]:
        """Exportable topics in configuration order."""
        return list(self._rules)

    def columns(self, topic: str) -> list[str] | None:
        """The declared CSV columns of a topic without its dropped ones; None: infer them."""
        rules = self._rules.get(topic)
        if rules is None or rules.columns is None:
            return None
        return [column for column in rules.columns if column not in rules.drop_columns]

    def hidden_fields(self, topic: str) -> frozenset[str]:
        """Fields nobody is shown, live or exported (e.g. addOffer's signature)."""
        rules = self._rules.get(topic)
        return frozenset(rules.drop_columns) if rules is not None else frozenset()

    def is_visible(self, topic: str, message: Mapping[str, typing.Any], merchant_id: str | None) -> bool:
        """Whether the merchant may see this message at all (None: an anonymous reader)."""
        if not isinstance(message, Mapping):
            return False
        return self.is_visible_owner(topic, owner_of(message), merchant_id)

    def is_visible_owner(self, topic: str, owner: typing.Any, merchant_id: str | None) -> bool:
        """is_visible() for a message whose owner (owner_of) is known: visibility depends on nothing else."""
        rules = self._rules.get(topic)
        if rules is None:
            return False
        if rules.policy == "public":
            return True
        if rules.policy == "owner_or_unowned" and owner is None:
            return True
        # "owner", or an owned message under "owner_or_unowned". Anything unknown sees nothing.
        return rules.policy in ("owner", "owner_or_unowned") and merchant_id is not None and owner == merchant_id

    def visible_message(
        self, topic: str, message: Mapping[str, typing.Any], merchant_id: str | None
    ) -> dict[str, typing.Any] | None:
        """The message as the merchant may see it (private fields dropped), or None if hidden."""
        if not self.is_visible(topic, message, merchant_id):
            return None
        rules = self._rules[topic]
        visible = _without(message, rules.drop_columns)
        items = visible.get(rules.flatten) if rules.flatten else None
        if rules.drop_columns and isinstance(items, list):
            visible[rules.flatten] = [_without(item, rules.drop_columns) if isinstance(item, Mapping) else item
                                      for item in items]
        return visible

    def visible_rows(
        self, topic: str, message: Mapping[str, typing.Any], merchant_id: str | None
    ) -> Iterator[dict[str, typing.Any]]:
        """The CSV rows of one message the merchant may see: none, the message, or its flattened list."""
        visible = self.visible_message(topic, message, merchant_id)
        if visible is None:
            return
        rules = self._rules[topic]
        if not rules.flatten:
            yield visible
            return
        items = visible.get(rules.flatten)
        if not isinstance(items, list):
            return
        parent = {column: visible.get(field) for column, field in rules.parent_fields.items()}
        for item in items:
            if isinstance(item, Mapping):
                # Parent fields come first and, being configured explicitly, win over an item's own key.
                row = dict(parent)
                row.update((key, value) for key, value in item.items() if key not in parent)
                yield row


def _without(message: Mapping[str, typing.Any], keys: Iterable[str]) -> dict[str, typing.Any]:
    dropped = set(keys)
    return {key: value for key, value in message.items() if key not in dropped}
