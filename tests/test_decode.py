"""The live stream's decoder: which Kafka records it forwards, and their envelopes.

RecordDecoder.forward() decodes and renders a whole batch in one loop with the common case
inlined. These tests hold it to the definition it must equal, record by record: the record rule
(proxy.records.decode_value), the live view's own rule (no failed requests, hidden fields removed)
and the wire format (proxy.live.wire), on batches mixing every kind of record.
"""

from __future__ import annotations

import collections
import json
import math
import time
import typing

from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import records
from proxy.live import wire
from proxy.live.decode import RecordDecoder

PLAIN, HIDDEN = "buyOffer", "addOffer"
MAX_RECORD_BYTES = 2000
BASE_TIME_MS = 1_764_600_000_000

# Values every reader must skip (or, for the BOM, accept), as raw bytes.
UNUSUAL_VALUES = [
    None, b"", b"  ", b"junk", b"[1,2]", b"42", b"null", b'"text"', b'{"n":NaN}', b'{"n":-Infinity}',
    b'{"n":1e400}', b'{"s":"\\ud800"}', b'{"s":"\xff"}', b'{"s":"a\x01b"}', b'{"a":1} {}', b'{"a":1,}',
    b"[" * 1025 + b"]" * 1025, b'{"s":"%s"}' % (b"x" * MAX_RECORD_BYTES),
    b'\xef\xbb\xbf{"bom":true}', b'\xef\xbb\xbf{"bom":true,"http_code":500}',
    b'{"http_code":500}', b'{"http_code":"409"}', b'{"http_code":"200"}', b'{"http_code":200.0}',
    b'{"http_code":null}', b'{"http_code":200,"http_code":500}', b'{"big":123456789012345678901234567890}',
    b'{"signature":"S","keep":1}', b'{"text":"M\xc3\xbcller \\u2028 \xf0\x9f\x98\x80","esc":"\\"/\\n"}',
]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_objects = st.dictionaries(
    st.text(max_size=8) | st.sampled_from(["http_code", "signature", "merchant_id"]),
    st.recursive(json_scalars | st.sampled_from([200, "200", 409, "500"]),
                 lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                                    max_size=3),
                 max_leaves=8),
    max_size=6)
encoded_objects = json_objects.map(lambda value: json.dumps(value, ensure_ascii=False).encode())
record_values = encoded_objects | st.sampled_from(UNUSUAL_VALUES)


def kafka_record(topic: str, partition: int, offset: int, value: bytes | None, timestamp: int | None) -> Message:
    stamp = (TIMESTAMP_NOT_AVAILABLE, 0) if timestamp is None else (TIMESTAMP_CREATE_TIME, timestamp)
    return Message(topic=topic, partition=partition, offset=offset, value=value, timestamp=stamp)



def kafka_records(timestamps: st.SearchStrategy[int | None]) -> st.SearchStrategy[Message]:
    return st.builds(kafka_record, st.sampled_from([PLAIN, HIDDEN]), st.integers(0, 3), st.integers(0, 2 ** 40),
                     record_values, timestamps)


written_timestamps = st.integers(BASE_TIME_MS, BASE_TIME_MS + 10 ** 6)


def decoder(drop_failed_requests: bool = True) -> RecordDecoder:
    return RecordDecoder([PLAIN, HIDDEN], drop_failed_requests, {HIDDEN: frozenset({"signature"})},
                         max_record_bytes=MAX_RECORD_BYTES)


def one_by_one(decode: RecordDecoder, batch: list[Message],
               skipped: collections.Counter[tuple[str, str]]) -> list[wire.LiveRecord]:
    """accept() then envelope() of each record: the definition forward() inlines."""
    rendered = []
    for message in batch:
        if decode.accept(message, skipped) and (record := decode.envelope(message, skipped)) is not None:
            rendered.append(record)
    return rendered


def expected_record(message: Message, drop_failed_requests: bool) -> tuple[str, typing.Any]:
    """What the live view makes of a record, from the rule itself: ("skip", reason) or ("forward", value)."""
    try:
        value = records.decode_value(message.value(), MAX_RECORD_BYTES)
    except records.SkippedRecord as skip:
        return "skip", skip.reason
    if drop_failed_requests and records.is_failed_request(value):
        return "skip", "failed_request"
    if message.topic() == HIDDEN:
        value.pop("signature", None)
    return "forward", value


def same_json(a: typing.Any, b: typing.Any) -> bool:
    """Equal as JSON values, floats compared the way JavaScript reads them (big integers become doubles)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_json, a, b))
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isclose(a, b, rel_tol=1e-15)
    return a == b


@settings(max_examples=300, deadline=None)
@given(st.lists(kafka_records(written_timestamps), max_size=40), st.booleans())
def test_a_batch_is_forwarded_exactly_as_record_by_record(batch: list[Message], drop_failed_requests: bool) -> None:
    fast, slow, consumed = collections.Counter(), collections.Counter(), collections.Counter()
    assert decoder(drop_failed_requests).forward(batch, consumed, fast) == one_by_one(decoder(drop_failed_requests),
                                                                                      batch, slow)
    assert fast == slow
    assert consumed == collections.Counter(message.topic() for message in batch)


@settings(max_examples=300, deadline=None)
@given(st.lists(kafka_records(st.none() | written_timestamps), max_size=40), st.booleans())
def test_forwarded_envelopes_follow_the_record_rule_and_the_wire_format(batch: list[Message],
                                                                        drop_failed_requests: bool) -> None:
    skipped: collections.Counter[tuple[str, str]] = collections.Counter()
    before_ms = int(time.time() * 1000)
    forwarded = iter(decoder(drop_failed_requests).forward(batch, collections.Counter(), skipped))
    expected_skips: collections.Counter[tuple[str, str]] = collections.Counter()
    for message in batch:
        verdict, detail = expected_record(message, drop_failed_requests)
        if verdict == "skip":
            expected_skips[message.topic(), detail] += 1
            continue
        topic, timestamp, envelope = next(forwarded)
        kind, written = message.timestamp()
        assert topic == message.topic()
        assert timestamp == written if kind != TIMESTAMP_NOT_AVAILABLE else before_ms <= timestamp <= time.time() * 1000
        parsed = json.loads(envelope)
        assert list(parsed) == ["topic", "partition", "offset", "timestamp", "value"]
        assert (parsed["topic"], parsed["partition"], parsed["offset"], parsed["timestamp"]) == (
            topic, message.partition(), message.offset(), timestamp)
        assert same_json(parsed["value"], detail)
        if topic == PLAIN:  # the producer's own text, byte order mark removed
            assert envelope == wire.render_envelope(wire.envelope_prefix(topic), message.partition(), message.offset(),
                                                    timestamp, records.value_text(message.value()))
    assert next(forwarded, None) is None
    assert skipped == expected_skips


def test_nan_infinity_and_out_of_range_numbers_never_reach_a_client() -> None:
    batch = [kafka_record(PLAIN, 0, offset, value, BASE_TIME_MS)
             for offset, value in enumerate([b'{"n":NaN}', b'{"n":1}', b'{"n":Infinity}', b'{"n":-1e400}'])]
    skipped: collections.Counter[tuple[str, str]] = collections.Counter()
    forwarded = decoder().forward(batch, collections.Counter(), skipped)
    assert [json.loads(envelope)["value"] for _, _, envelope in forwarded] == [{"n": 1}]
    assert skipped == {(PLAIN, "invalid_json"): 2, (PLAIN, "non_finite_number"): 1}


def test_hidden_fields_are_removed_and_failed_requests_dropped() -> None:
    batch = [kafka_record(HIDDEN, 1, 7, b'{"signature":"SECRET","n":1}', BASE_TIME_MS),
             kafka_record(HIDDEN, 1, 8, b'{"signature":"SECRET","http_code":500}', BASE_TIME_MS),
             kafka_record(PLAIN, 0, 9, b'{"http_code":"409"}', BASE_TIME_MS)]
    skipped: collections.Counter[tuple[str, str]] = collections.Counter()
    forwarded = decoder().forward(batch, collections.Counter(), skipped)
    assert [json.loads(envelope)["value"] for _, _, envelope in forwarded] == [{"n": 1}]
    assert "SECRET" not in forwarded[0][2]
    assert skipped == {(HIDDEN, "failed_request"): 1, (PLAIN, "failed_request"): 1}
    assert len(decoder(drop_failed_requests=False).forward(batch, collections.Counter(), collections.Counter())) == 3
