"""Bad Kafka records cost only themselves: one rule (proxy.records) for live, history, /status and exports.

Anyone on the simulation network can write to the topics. These tests write a stream that mixes
every kind of malformed record we know of between valid ones, to the real broker, and check that
a real proxy process forwards every valid record, in order, to live clients, its history, /status
and every merchant's export, and skips and counts the rest by reason everywhere alike.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import typing
import urllib.request

import pytest
from confluent_kafka import Producer

from proxy import records
from proxy.policy import merchant_id_for
from proxy.testing import unique_topics, wait_until

TOKEN_A = "ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7"
TOKEN_B = "Zq0uKkqB3p9Xo1mTtE7rVYc2LhJ8sWdN4fG6aRbC5eUiPzyOvQxHwMlSnDgj0Ak1"
A, B = merchant_id_for(TOKEN_A), merchant_id_for(TOKEN_B)
BASE_TIME_MS = 1_521_194_400_000
MAX_RECORD_BYTES = 25_000
COLUMNS = ["seq", "merchant_id", "note", "n", "http_code", "timestamp"]
BOM = b"\xef\xbb\xbf"

# Malformed values and the reason every reader must skip them for.
MALFORMED: list[tuple[str, bytes | None, str]] = [
    ("tombstone", None, "tombstone"),
    ("empty", b"", "empty"),
    ("blank", b" \r\n\t", "empty"),
    ("deep nesting, 10,000 levels", b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "too_deep"),
    ("deep nesting, 1,025 levels", b"[" * 1025 + b"]" * 1025, "too_deep"),
    ("lone surrogate escape", b'{"merchant_id":"%s","note":"\\ud800"}' % A.encode(), "lone_surrogate"),
    ("lone low surrogate escape", b'{"merchant_id":"%s","note":"x\\udc00y"}' % A.encode(), "lone_surrogate"),
    ("invalid UTF-8", b'{"merchant_id":"%s","note":"\xff\xfe"}' % A.encode(), "invalid_utf8"),
    ("UTF-8-encoded surrogate", b'{"merchant_id":"%s","note":"\xed\xa0\x80"}' % A.encode(), "invalid_utf8"),
    ("overlong UTF-8", b'{"merchant_id":"%s","note":"\xc0\xaf"}' % A.encode(), "invalid_utf8"),
    ("Latin-1 text", '{"merchant_id":"%s","note":"Müller"}'.encode("latin-1") % A.encode(), "invalid_utf8"),
    ("number beyond a double", b'{"merchant_id":"%s","n":1e400}' % A.encode(), "non_finite_number"),
    ("long number beyond a double", b'{"merchant_id":"%s","n":%s.5}' % (A.encode(), b"9" * 400), "non_finite_number"),
    ("NaN", b'{"merchant_id":"%s","n":NaN}' % A.encode(), "invalid_json"),
    ("Infinity", b'{"merchant_id":"%s","n":-Infinity}' % A.encode(), "invalid_json"),
    ("raw control character", b'{"merchant_id":"%s","note":"a\x01b"}' % A.encode(), "invalid_json"),
    ("raw tab in a string", b'{"merchant_id":"%s","note":"a\tb"}' % A.encode(), "invalid_json"),
    ("raw NUL", b'{"merchant_id":"%s","note":"a\x00b"}' % A.encode(), "invalid_json"),
    ("not JSON", b"junk", "invalid_json"),
    ("trailing data", b'{"merchant_id":"%s"} {}' % A.encode(), "invalid_json"),
    ("trailing comma", b'{"merchant_id":"%s",}' % A.encode(), "invalid_json"),
    ("single quotes", b"{'merchant_id': 'x'}", "invalid_json"),
    ("truncated", b'{"merchant_id":"%s","note":"cut' % A.encode(), "invalid_json"),
    ("too large", b'{"merchant_id":"%s","note":"%s"}' % (A.encode(), b"x" * MAX_RECORD_BYTES), "too_large"),
    ("array", b"[1,2]", "not_an_object"),
    ("string", b'"just a string"', "not_an_object"),
    ("number", b"42", "not_an_object"),
    ("null", b"null", "not_an_object"),
]

# Valid but unusual values (each gets a seq and a merchant when written) and what they mean.
UNUSUAL: list[tuple[str, dict[str, typing.Any], bytes | None]] = [
    ("BOM before the JSON", {"note": "after a BOM"}, BOM),
    ("integer beyond 64 bits", {"n": 123456789012345678901234567890}, None),
    ("escaped control characters", {"note": "tab\there\u0001nul\u0000"}, None),
    ("non-ASCII text", {"note": "Müller 😀 \u2028"}, None),
    ("large string under the limit", {"note": "y" * (MAX_RECORD_BYTES // 2)}, None),
    ("http_code as the string 200", {"http_code": "200"}, None),
    ("empty object", {}, None),
    ("formula-like text", {"note": "=HYPERLINK(\"http://x\")"}, None),
    ("nested values", {"note": {"deep": [[[{"x": None}]]]}}, None),
]


def produce_raw(bootstrap: str, topic: str, values: list[bytes | None]) -> None:
    """Write each value as it is (None: a tombstone), one partition, increasing record timestamps."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 1_000_000})
    failures: list[typing.Any] = []
    for index, value in enumerate(values):
        producer.produce(topic, value, partition=0, timestamp=BASE_TIME_MS + index,
                         on_delivery=lambda error, _: error and failures.append(error))
    assert producer.flush(30) == 0 and not failures, failures[:3]


class Stream(typing.NamedTuple):
    """What was written and what every reader must make of it."""

    values: list[bytes | None]
    valid: list[dict[str, typing.Any]]   # in order, as a JSON parser reads them (live values)
    failed: list[dict[str, typing.Any]]  # valid, but failed requests: exported, not shown live
    skipped: dict[str, int]              # by reason


def mixed_stream() -> Stream:
    """Every malformed kind between valid records (twice), ending with a malformed one."""
    values: list[bytes | None] = []
    valid: list[dict[str, typing.Any]] = []
    failed: list[dict[str, typing.Any]] = []
    skipped: dict[str, int] = {}
    seq = 0

    def add_valid(message: dict[str, typing.Any], prefix: bytes | None = None) -> None:
        nonlocal seq
        message = {"seq": seq, "merchant_id": (A, B)[seq % 2], **message, "signature": f"SIG{seq}",
                   "timestamp": f"2018-03-16T10:00:{seq % 60:02d}.000Z"}
        seq += 1
        values.append((prefix or b"") + json.dumps(message, ensure_ascii=False).encode())
        (failed if records.is_failed_request(message) else valid).append(message)

    for _ in range(2):
        for _, raw, reason in MALFORMED:
            add_valid({"note": "plain"})
            values.append(raw)
            skipped[reason] = skipped.get(reason, 0) + 1
        for _, message, prefix in UNUSUAL:
            add_valid(message, prefix)
        add_valid({"merchant_id": None, "note": "owned by nobody"})
        add_valid({"merchant_id": 42, "note": "owner that is not a string"})
        values.append(b'{"seq":%d,"merchant_id":"%s","merchant_id":"%s","note":"dup"}' % (seq, B.encode(), A.encode()))
        valid.append({"seq": seq, "merchant_id": A, "note": "dup"})
        seq += 1
        add_valid({"http_code": "409", "note": "failed, code as a string"})
        add_valid({"http_code": 500, "note": "failed"})
    values.append(MALFORMED[5][1])  # the newest record is a bad one: /status must still answer
    skipped["lone_surrogate"] += 1
    skipped["failed_request"] = len(failed)
    return Stream(values, valid, failed, skipped)


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def export_csv(base: str, path: str, token: str, streamed: bool = False) -> bytes:
    headers = {"Authorization": f"Token {token}"}
    if streamed:
        headers["Accept"] = "text/csv"
    status, body = http_get(base + path, headers)
    assert status == 200, body
    if streamed:
        return body
    status, body = http_get(base + "/" + json.loads(body)["url"])
    assert status == 200
    return body


def expected_seqs(messages: list[dict[str, typing.Any]], merchant: str) -> list[str]:
    return [str(message["seq"]) for message in messages if message.get("merchant_id") == merchant]


@pytest.fixture(scope="module")
def stream() -> Stream:
    return mixed_stream()


def test_the_stream_holds_every_kind_of_bad_record(stream: Stream) -> None:
    assert set(stream.skipped) == set(records.REASONS) - {"cannot_render"}


@pytest.mark.parametrize("kind, raw, reason", MALFORMED, ids=[kind for kind, _, _ in MALFORMED])
def test_the_record_rule_names_why_a_value_is_skipped(kind: str, raw: bytes | None, reason: str) -> None:
    with pytest.raises(records.SkippedRecord) as skipped:
        records.decode_value(raw, MAX_RECORD_BYTES)
    assert skipped.value.reason == reason


@pytest.mark.parametrize("kind, message, prefix", UNUSUAL, ids=[kind for kind, _, _ in UNUSUAL])
def test_the_record_rule_accepts_valid_but_unusual_json(kind: str, message: dict, prefix: bytes | None) -> None:
    raw = (prefix or b"") + json.dumps(message, ensure_ascii=False).encode()
    value = records.decode_value(raw, MAX_RECORD_BYTES)
    # Integers beyond 64 bits are read as doubles, as JavaScript reads them.
    assert value == {key: float(v) if isinstance(v, int) and abs(v) >= 2 ** 64 else v for key, v in message.items()}
    assert json.loads(records.value_text(raw)) == message


@pytest.mark.parametrize("code, failed", [
    (200, False), ("200", False), (" 200 ", False), (200.0, False), (None, True), (409, True), ("409", True),
    ("OK", True), (True, True), ("", True), ("2OO", True),
])
def test_http_code_given_as_a_string_of_digits_means_that_number(code: typing.Any, failed: bool) -> None:
    assert records.is_failed_request({"http_code": code}) is failed
    assert records.is_failed_request({}) is False


def test_valid_records_reach_live_clients_history_status_and_every_export_in_order(broker, start_proxy, sockjs, stream):
    plain, hidden = unique_topics("plain", "hidden")
    broker.create_topics([plain, hidden], partitions=1)
    config = {"topics": [plain, hidden], "history_size": 500, "max_record_bytes": MAX_RECORD_BYTES,
              "export": {"topics": {plain: {"policy": "owner", "columns": COLUMNS},
                                    hidden: {"policy": "owner", "columns": COLUMNS, "drop_columns": ["signature"]}}}}
    proxy = start_proxy(broker.bootstrap_servers, config)
    client = sockjs(proxy.base)
    assert [m["messages"] for m in client.receive(2)] == [[], []]

    for topic in (plain, hidden):
        produce_raw(broker.bootstrap_servers, topic, stream.values)

    # Live: every valid record but failed requests, in order, on both topics; nothing else.
    live = client.receive(2 * len(stream.valid), timeout=60)
    for topic in (plain, hidden):
        values = [m["message"]["value"] for m in live if m["topic"] == topic]
        assert [v["seq"] for v in values] == [m["seq"] for m in stream.valid], topic
        if topic == hidden:
            assert all("signature" not in value for value in values)
    plain_values = [m["message"]["value"] for m in live if m["topic"] == plain]
    assert plain_values == stream.valid  # the producer's own JSON, as any parser reads it
    with pytest.raises(AssertionError):
        client.receive(1, timeout=2)

    # /status counts every record and skips by reason, and previews the newest valid one
    # (the newest record is a bad one).
    def status_of(topic: str) -> dict:
        return proxy.get("/status")[1]["topics"][topic]

    for topic in (plain, hidden):
        status = wait_until(lambda: (s := status_of(topic))["consumed"] == len(stream.values) and s, 20,
                            message="every record consumed")
        assert status["skipped"] == stream.skipped
        assert status["last_message"]["value"]["seq"] == stream.valid[-1]["seq"]
    status_code, metrics, _ = proxy.get("/metrics")
    for reason, count in stream.skipped.items():
        assert f'proxy_messages_skipped_total{{reason="{reason}",topic="{plain}"}} {float(count)}' in metrics

    # History, for a client that connects now and for a proxy started after the records were written.
    later = start_proxy(broker.bootstrap_servers, config)
    for base in (proxy.base, later.base):
        histories = sockjs(base).receive(2)
        for history in histories:
            assert [e["value"]["seq"] for e in history["messages"]] == [m["seq"] for m in stream.valid], base
    assert later.get("/status")[1]["topics"][plain]["skipped"] == stream.skipped

    # Exports: each merchant gets every one of its valid records (failed requests too), in order,
    # from a file and streamed; the export counts what it skipped.
    exported = stream.valid + stream.failed
    exported.sort(key=lambda message: message["seq"])
    export_skipped = {reason: count for reason, count in stream.skipped.items() if reason != "failed_request"}
    for topic in (plain, hidden):
        for token, merchant in ((TOKEN_A, A), (TOKEN_B, B)):
            for streamed in (False, True):
                body = export_csv(proxy.base, f"/export/data/{topic}", token, streamed)
                rows = csv_rows(body)
                assert [row["seq"] for row in rows] == expected_seqs(exported, merchant), (topic, merchant, streamed)
                assert b"SIG" not in body
    rows = csv_rows(export_csv(proxy.base, f"/export/data/{plain}", TOKEN_A))
    rows += csv_rows(export_csv(proxy.base, f"/export/data/{plain}", TOKEN_B))
    notes = {row["seq"]: row for row in rows}
    first = len(MALFORMED)
    assert notes[str(first)]["note"] == "after a BOM"
    assert notes[str(first + 1)]["n"] == "1.2345678901234568e+29"
    assert notes[str(first + 2)]["note"] == "tab\there\u0001nul\u0000"
    assert notes[str(first + 7)]["note"] == "'=HYPERLINK(\"http://x\")"
    everything = csv_rows(export_csv(proxy.base, "/export/data", TOKEN_B))
    assert [json.loads(row["value"])["seq"] for row in everything if row["topic"] == plain] == \
        [int(seq) for seq in expected_seqs(exported, B)]

    log = wait_until(lambda: proxy.log().count(f"topic={plain} ") >= 6 and proxy.log(), message="export log lines")
    lines = [line for line in log.splitlines() if f"export merchant_id={A} topic={plain} " in line]
    expected_field = "skipped=" + json.dumps(",".join(f"{r}:{c}" for r, c in sorted(export_skipped.items())))
    assert lines and all(expected_field in line and f"skipped_records={sum(export_skipped.values())}" in line
                         for line in lines), lines
    _, metrics, _ = proxy.get("/metrics")
    for reason, count in export_skipped.items():
        # Six exports of the plain topic (A and B, file and streamed, and once more) counted each bad record.
        assert f'proxy_export_records_skipped_total{{reason="{reason}",topic="{plain}"}} {float(6 * count)}' in metrics
    assert "Traceback" not in log


def test_a_newest_record_nested_1024_levels_is_shown_by_status(broker, start_proxy):
    """The deepest value the rule accepts is one level deeper inside its envelope: /status embeds it as is."""
    (topic,) = unique_topics("deepest")
    broker.create_topics([topic], partitions=1)
    deepest = b'{"a":' + b"[" * 1023 + b"]" * 1023 + b"}"
    produce_raw(broker.bootstrap_servers, topic, [b'{"n":1}', deepest])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    status, text = http_get(proxy.base + "/status")
    assert status == 200
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # the test's own parser recurses once per level
    try:
        body = json.loads(text)
    finally:
        sys.setrecursionlimit(limit)
    assert body["topics"][topic]["buffered"] == 2
    depth, value = 0, body["topics"][topic]["last_message"]["value"]["a"]
    while value:
        depth, value = depth + 1, value[0]
    assert depth == 1022  # the innermost list is empty


def test_duplicate_keys_decide_ownership_the_way_clients_read_them() -> None:
    value = records.decode_value(b'{"merchant_id":"%s","merchant_id":"%s"}' % (B.encode(), A.encode()))
    assert value["merchant_id"] == A == json.loads(b'{"merchant_id":"x","merchant_id":"%s"}' % A.encode())["merchant_id"]


def test_the_reasons_are_documented_labels() -> None:
    assert all(re.fullmatch(r"[a-z0-9_]+", reason) for reason in records.REASONS)
