"""Who may see what: merchant identity from a token and the per-topic visibility rules.

This module is the only place that decides visibility; the CSV export asks it for every row,
the live stream for the fields nobody is shown. The rules themselves are data (export.topics in config.yaml).
"""

from __future__ import annotations

import base64
import hashlib
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence


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
        if not isinstance(message, Mapping):
            return None
        # A copy: the view function hands back the message itself when it drops nothing.
        return self.view_function(topic, merchant_id)(dict(message))

    def visible_rows(
        self, topic: str, message: Mapping[str, typing.Any], merchant_id: str | None
    ) -> Iterator[dict[str, typing.Any]]:
        """The CSV rows of one message the merchant may see: none, the message, or its flattened list."""
        if isinstance(message, Mapping):
            yield from self.rows_function(topic, merchant_id)(dict(message))

    def view_function(self, topic: str, merchant_id: str | None) -> ViewFunction:
        """visible_message() of one topic for one merchant, decided once: a dict -> its view, or None if hidden.

        For the export's record loop: the message must be a dict of its own (proxy.records decodes
        one per record), since the view is the message itself when nothing is dropped.
        """
        rules = self._rules.get(topic)
        owner_may_see = _owner_test(rules, merchant_id)
        if rules is None or owner_may_see is None:
            return _hidden
        dropped = frozenset(rules.drop_columns)
        flatten = rules.flatten
        if not dropped:
            if owner_may_see is _anyone:
                return _itself
            return lambda message: message if owner_may_see(message.get(OWNER_FIELD)) else None

        def view(message: dict[str, typing.Any]) -> dict[str, typing.Any] | None:
            if not owner_may_see(message.get(OWNER_FIELD)):
                return None
            visible = {key: value for key, value in message.items() if key not in dropped}
            items = visible.get(flatten) if flatten else None
            if isinstance(items, list):
                visible[flatten] = [{key: value for key, value in item.items() if key not in dropped}
                                    if isinstance(item, Mapping) else item for item in items]
            return visible

        return view

    def rows_function(self, topic: str, merchant_id: str | None) -> RowsFunction:
        """visible_rows() of one topic for one merchant, decided once: a dict -> the rows the merchant may see.

        Built once per export and called for every record: nothing per record but the owner
        question and, only where the rules drop fields or flatten a list, new dicts. The message
        must be a dict of its own (as for view_function): without dropped fields, it is the row.
        """
        rules = self._rules.get(topic)
        owner_may_see = _owner_test(rules, merchant_id)
        if rules is None or owner_may_see is None:
            return _no_rows
        if not rules.flatten:
            if not rules.drop_columns:
                if owner_may_see is _anyone:
                    return _one_row
                if rules.policy == "owner":
                    # The common case (buyOffer, the statistics topics), with the owner test inline.
                    return lambda message: (message,) if message.get(OWNER_FIELD) == merchant_id else ()
                return lambda message: (message,) if owner_may_see(message.get(OWNER_FIELD)) else ()
            view = self.view_function(topic, merchant_id)
            return lambda message: _NO_ROWS if (visible := view(message)) is None else (visible,)
        view = self.view_function(topic, merchant_id)
        flatten, parent_fields = rules.flatten, dict(rules.parent_fields)

        def rows(message: dict[str, typing.Any]) -> Sequence[dict[str, typing.Any]]:
            visible = view(message)
            items = visible.get(flatten) if visible is not None else None
            if not isinstance(items, list):
                return _NO_ROWS
            parent = {column: visible.get(field) for column, field in parent_fields.items()}
            flattened = []
            for item in items:
                if isinstance(item, Mapping):
                    # Parent fields come first and, being configured explicitly, win over an item's own key.
                    row = dict(parent)
                    row.update((key, value) for key, value in item.items() if key not in parent)
                    flattened.append(row)
            return flattened

        return rows


ViewFunction = Callable[[dict[str, typing.Any]], "dict[str, typing.Any] | None"]
RowsFunction = Callable[[dict[str, typing.Any]], Sequence[dict[str, typing.Any]]]
_NO_ROWS: tuple[dict[str, typing.Any], ...] = ()


def _owner_test(rules: TopicRules | None, merchant_id: str | None) -> Callable[[typing.Any], bool] | None:
    """Whether a message's owner lets the merchant see it, under the topic's rules; None: never."""
    if rules is None:
        return None
    if rules.policy == "public":
        return _anyone
    if rules.policy == "owner_or_unowned":
        return lambda owner: owner is None or (merchant_id is not None and owner == merchant_id)
    if rules.policy == "owner" and merchant_id is not None:
        return lambda owner: owner == merchant_id
    # An anonymous reader of an owner topic, or a policy nobody knows: nothing is visible.
    return None


def _anyone(owner: typing.Any) -> bool:
    return True


def _hidden(message: dict[str, typing.Any]) -> None:
    return None


def _itself(message: dict[str, typing.Any]) -> dict[str, typing.Any]:
    return message


def _no_rows(message: dict[str, typing.Any]) -> Sequence[dict[str, typing.Any]]:
    return _NO_ROWS


def _one_row(message: dict[str, typing.Any]) -> Sequence[dict[str, typing.Any]]:
    return (message,)
