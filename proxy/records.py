"""What the proxy makes of one Kafka record: a JSON object, or the reason it is skipped.

Anyone on the simulation network can write to the topics, so a value may be anything. One rule,
here, decides for every reader (the live stream, its history, /status and every export), so they
all skip the same records, and a record the proxy cannot use only ever costs itself:

- The value must be one JSON object as RFC 8259 defines it, in UTF-8, at most `max_bytes` long
  and nested at most 1024 levels. Read strictly (orjson): NaN, Infinity, numbers beyond the
  double range (1e400), lone surrogate escapes ("\\ud800"), raw control characters in strings and
  invalid UTF-8 are refused, because browsers' JSON.parse, CSV files or the HTTP answers could not
  carry them, and one such record would otherwise break a whole history frame or export.
- A UTF-8 byte order mark before the JSON is ignored (RFC 8259 allows parsers to).
- Integers beyond 64 bits are read as doubles, as JavaScript reads them.
- Duplicate keys: the last one wins, as in JavaScript and Python.
"""

from __future__ import annotations

import re
import typing

import orjson

# librdkafka's default message.max.bytes: a larger record comes only from a cluster configured
# for it, and one such record would be sent whole to every live client and kept in the history.
DEFAULT_MAX_RECORD_BYTES = 1024 * 1024

# Why a record is skipped: the label of /status "skipped", proxy_messages_skipped_total and the
# export's skipped_records.
REASONS = {
    "tombstone": "no value (a Kafka tombstone)",
    "empty": "an empty or blank value",
    "too_large": "longer than max_record_bytes",
    "invalid_utf8": "not UTF-8 text",
    "invalid_json": "not JSON (including NaN, Infinity and raw control characters in strings)",
    "too_deep": "nested deeper than 1024 levels",
    "non_finite_number": "a number beyond the range of a double, such as 1e400",
    "lone_surrogate": "half of a UTF-16 surrogate pair escaped on its own, such as \\ud800",
    "not_an_object": "JSON, but not an object (an array, a string, a number, null)",
    "failed_request": "live only: a failed marketplace request (http_code present and not 200)",
    "cannot_render": "a record the proxy could not turn into an envelope or CSV rows (the log says why)",
}

BOM = b"\xef\xbb\xbf"
_DIGITS = re.compile(r"[0-9]{1,9}")
# orjson's wording for the refusals that have a reason of their own (anything else: invalid_json).
_ORJSON_REASONS = (
    ("depth limit", "too_deep"),
    ("infinity", "non_finite_number"),
    ("not valid UTF-8", "invalid_utf8"),  # before "surrogate": encoded surrogates are invalid UTF-8
    ("surrogate", "lone_surrogate"),
)


class SkippedRecord(Exception):
    """A record value the proxy does not use; reason is one of REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_value(raw: bytes | None, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict[str, typing.Any]:
    """The JSON object of a record value; raises SkippedRecord saying why there is none.

    The live stream's RecordDecoder.forward() inlines the common case (at most max_bytes, orjson
    reads an object): a change to the rule changes it there too (tests/test_decode.py compares them).
    """
    if raw is None:
        raise SkippedRecord("tombstone")
    if len(raw) > max_bytes:
        raise SkippedRecord("too_large")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        value = _decode_unusual(raw, exc)
    if type(value) is not dict:
        raise SkippedRecord("not_an_object")
    return value


def value_text(raw: bytes) -> str:
    """The JSON text of a value that decode_value() accepted, as the producer wrote it."""
    return raw.decode("utf-8") if not raw.startswith(BOM) else raw[3:].decode("utf-8")


def is_failed_request(value: typing.Mapping[str, typing.Any]) -> bool:
    """Whether a marketplace message reports a failed request: http_code present and not 200.

    A producer that writes the code as a string of digits ("200") means that number.
    """
    code = value.get("http_code", 200)
    if isinstance(code, str) and _DIGITS.fullmatch(code.strip()):
        code = int(code)
    return code != 200


def _decode_unusual(raw: bytes, error: orjson.JSONDecodeError) -> typing.Any:
    """The slow path of decode_value: a value with a BOM, or the reason it cannot be used."""
    if raw.startswith(BOM):
        return decode_value(raw[3:])
    if not raw.strip():
        raise SkippedRecord("empty")
    message = str(error)
    for wording, reason in _ORJSON_REASONS:
        if wording in message:
            raise SkippedRecord(reason) from None
    raise SkippedRecord("invalid_json") from None
