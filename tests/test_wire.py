"""The live wire format: every message a client gets is an ASCII JSON string that decodes back."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.live import wire


@given(st.text())
def test_sockjs_quoting_is_ascii_json_that_decodes_to_the_payload(payload):
    quoted = wire.sockjs_quote_bytes(payload)
    assert quoted.isascii()
    assert json.loads(quoted) == payload
    assert quoted.decode() == wire.sockjs_quote(payload) or json.loads(wire.sockjs_quote(payload)) == payload


def test_line_and_paragraph_separators_are_escaped_for_old_transports():
    assert wire.sockjs_quote_bytes("a\u2028b\u2029") == b'"a\\u2028b\\u2029"'


def test_a_live_message_is_the_envelope_inside_a_message_object():
    envelope = wire.render_envelope(wire.envelope_prefix("t"), 1, 2, 3, '{"k":"\u00e9"}')
    message = json.loads(json.loads(wire.live_message("t", envelope)))
    assert message == {"type": "message", "topic": "t",
                       "message": {"topic": "t", "partition": 1, "offset": 2, "timestamp": 3, "value": {"k": "\u00e9"}}}


@given(st.lists(st.text(), max_size=20))
def test_a_batch_is_quoted_as_its_messages_one_by_one(payloads):
    assert wire.sockjs_quote_many(payloads) == b",".join(wire.sockjs_quote_bytes(p) for p in payloads)
