"""The wire format of the live stream, in one place: envelopes and SockJS-quoted messages.

An envelope is `{"topic":T,"partition":P,"offset":O,"timestamp":MS,"value":V}` as JSON text;
the SockJS messages wrap envelopes (`history`, `message`) or say something to one client
(`error`, `auth`). Every SockJS message travels as a JSON string literal (quoted once, here).
"""

from __future__ import annotations

import typing

import orjson
import ujson

# (topic, record timestamp in ms, envelope JSON): one record rendered for the live stream.
LiveRecord = tuple[str, int, str]


def sockjs_quote(payload: str) -> str:
    """A JSON string literal of payload, as SockJS frames carry each message.

    ASCII-only output: some SockJS transports (and old browsers) mangle raw U+2028 and friends.
    """
    return ujson.dumps(payload, ensure_ascii=True, escape_forward_slashes=False)


def sockjs_quote_bytes(payload: str) -> bytes:
    """sockjs_quote() as ASCII bytes, the fast way: this runs for every live message.

    An ASCII string (str.isascii() is a flag, no scan) quoted by orjson is plain ASCII and about
    4 x faster than ujson's ensure_ascii pass; anything else takes that pass.
    """
    if payload.isascii():
        return orjson.dumps(payload)
    return ujson.dumps(payload, ensure_ascii=True, escape_forward_slashes=False).encode()


def topic_json(topic: str) -> str:
    return ujson.dumps(topic)


def envelope_prefix(topic: str) -> str:
    """The constant start of every envelope of a topic."""
    return '{"topic":%s,"partition":' % topic_json(topic)


# prefix (envelope_prefix), partition, offset, timestamp, value JSON.
ENVELOPE_FORMAT = '%s%d,"offset":%d,"timestamp":%d,"value":%s}'


def render_envelope(prefix: str, partition: int, offset: int, timestamp: int, value_json: str) -> str:
    return ENVELOPE_FORMAT % (prefix, partition, offset, timestamp, value_json)


def history_message(topic_literal: str, envelopes: typing.Iterable[str]) -> bytes:
    """The SockJS-quoted {"type": "history", ...} message (ASCII bytes)."""
    payload = '{"type":"history","topic":%s,"messages":[%s]}' % (topic_literal, ",".join(envelopes))
    return sockjs_quote_bytes(payload)


def sockjs_quote_many(payloads: list[str]) -> bytes:
    """sockjs_quote_bytes() of each payload, comma-joined: one C call for a batch of ASCII ones."""
    if all(map(str.isascii, payloads)):
        return orjson.dumps(payloads)[1:-1]
    return b",".join(map(sockjs_quote_bytes, payloads))


def message_prefix(topic: str) -> str:
    """The start of every {"type": "message", ...} text of a topic; the envelope and "}" follow."""
    return '{"type":"message","topic":%s,"message":' % topic_json(topic)


def message_texts(prefixes: typing.Mapping[str, str], records: list[LiveRecord]) -> list[str]:
    """The {"type": "message", ...} text of each record (unquoted), in one loop for a batch;
    prefixes: message_prefix() of each topic, built once."""
    return [prefixes[topic] + envelope + "}" for topic, _, envelope in records]


def live_message(topic: str, envelope: str) -> bytes:
    """The SockJS-quoted {"type": "message", ...} message of one envelope (the flush tick quotes a
    batch of message_texts() at once, with sockjs_quote_many())."""
    return sockjs_quote_bytes(message_texts({topic: message_prefix(topic)}, [(topic, 0, envelope)])[0])


def control_message(body: dict[str, typing.Any]) -> bytes:
    """A SockJS-quoted message to one client ({"type": "error" | "auth", ...})."""
    return sockjs_quote_bytes(ujson.dumps(body, ensure_ascii=False, escape_forward_slashes=False))
