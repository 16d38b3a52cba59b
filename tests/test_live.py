"""The live view: history replay, live delivery and subscriptions over real SockJS transports."""

from __future__ import annotations

import socket

import pytest

from proxy.demo.broker import TansuBroker, free_port
from proxy.testing import produce, unique_topics, wait_until


def history_of(messages: list[dict], topic: str) -> list[dict]:
    (history,) = [m for m in messages if m["type"] == "history" and m["topic"] == topic]
    return history["messages"]


def test_new_client_gets_one_history_per_topic_in_config_order(broker, start_proxy, sockjs):
    topics = unique_topics("first", "empty", "third")
    broker.create_topics([topics[0], topics[2]])
    produce(broker.bootstrap_servers, topics[0], [{"n": 1}])
    produce(broker.bootstrap_servers, topics[2], [{"n": 3}])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": topics})

    messages = sockjs(proxy.base).receive(3)

    assert [(m["type"], m["topic"]) for m in messages] == [("history", t) for t in topics]
    assert [e["value"] for e in messages[0]["messages"]] == [{"n": 1}]
    assert messages[1]["messages"] == []
    envelope = messages[2]["messages"][0]
    assert set(envelope) == {"topic", "partition", "offset", "timestamp", "value"}
    assert envelope["topic"] == topics[2] and envelope["value"] == {"n": 3}


def test_history_after_restart_is_exactly_the_last_n_oldest_first_across_partitions(broker, start_proxy, sockjs):
    (topic,) = unique_topics("history")
    broker.create_topics([topic], partitions=3)
    base = 1_700_000_000_000
    # 30 records spread over three partitions, interleaved in time.
    for partition in range(3):
        numbers = [n for n in range(30) if n % 3 == partition]
        produce(broker.bootstrap_servers, topic, [{"n": n} for n in numbers], partition=partition,
                timestamps=[base + n * 1000 for n in numbers])
    config = {"topics": [topic], "history_size": 7}
    first = start_proxy(broker.bootstrap_servers, config)
    first.stop()

    proxy = start_proxy(broker.bootstrap_servers, config)
    (history,) = sockjs(proxy.base).receive(1)

    assert [e["value"]["n"] for e in history["messages"]] == list(range(23, 30))
    assert [e["timestamp"] for e in history["messages"]] == [base + n * 1000 for n in range(23, 30)]
    assert {e["partition"] for e in history["messages"]} == {0, 1, 2}


@pytest.mark.parametrize("transport", ["websocket", "xhr_streaming"])
def test_live_messages_reach_clients_over_each_transport(broker, start_proxy, sockjs, transport):
    (topic,) = unique_topics("live")
    broker.create_topics([topic], partitions=2)
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base, transport)
    assert client.receive(1)[0]["type"] == "history"

    produce(broker.bootstrap_servers, topic, [{"seq": i} for i in range(20)])

    messages = client.receive(20)
    assert all(m["type"] == "message" and m["topic"] == topic for m in messages)
    assert sorted(m["message"]["value"]["seq"] for m in messages) == list(range(20))
    assert {m["message"]["partition"] for m in messages} <= {0, 1}


def test_topic_created_after_start_is_followed_without_restart(broker, start_proxy, sockjs):
    existing, later = unique_topics("existing", "later")
    broker.create_topics([existing])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [existing, later]})
    client = sockjs(proxy.base)
    assert [m["topic"] for m in client.receive(2)] == [existing, later]

    # Auto-created by the producer, with several partitions on this broker.
    produce(broker.bootstrap_servers, later, [{"hello": i} for i in range(8)])

    messages = client.receive(8, timeout=15)
    assert sorted(m["message"]["value"]["hello"] for m in messages) == list(range(8))
    status, body, _ = proxy.get("/status")
    assert body["topics"][later]["buffered"] == 8


def test_malformed_values_are_skipped_counted_and_do_not_stop_ingest(broker, start_proxy, sockjs):
    (topic,) = unique_topics("malformed")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base)
    client.receive(1)

    produce(broker.bootstrap_servers, topic,
            [b"not json", b"[1, 2]", b'"a string"', b"\xff\xfe", b'{"x": NaN}', {"ok": True}, b'{"nan": "NaN"}'])

    messages = client.receive(2)
    assert [m["message"]["value"] for m in messages] == [{"ok": True}, {"nan": "NaN"}]
    status, body, _ = proxy.get("/status")
    assert body["topics"][topic]["skipped"] == {"invalid_json": 2, "invalid_utf8": 1, "not_an_object": 2}
    assert body["topics"][topic]["consumed"] == 7
    assert proxy.log().count("skipping") == 3, "each topic and reason is logged once"


def test_failed_requests_are_neither_forwarded_nor_kept(broker, start_proxy, sockjs):
    (topic,) = unique_topics("buyOffer")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"id": 1, "http_code": 409}, {"id": 2, "http_code": 200}])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base)
    assert [e["value"]["id"] for e in client.receive(1)[0]["messages"]] == [2]

    produce(broker.bootstrap_servers, topic, [{"id": 3, "http_code": 410}, {"id": 4}, {"id": 5, "http_code": 200}])

    assert [m["message"]["value"]["id"] for m in client.receive(2)] == [4, 5]
    assert proxy.get("/status")[1]["topics"][topic]["skipped"] == {"failed_request": 2}


def test_failed_requests_are_forwarded_when_the_switch_is_off(broker, start_proxy, sockjs):
    (topic,) = unique_topics("buyOffer")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"id": 1, "http_code": 409}])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {"drop_failed_requests": False}})

    (history,) = sockjs(proxy.base).receive(1)

    assert [e["value"]["id"] for e in history["messages"]] == [1]


def test_subscribe_narrows_the_stream_and_replays_history_of_listed_topics(broker, start_proxy, sockjs):
    wanted, other = unique_topics("wanted", "other")
    broker.create_topics([wanted, other])
    produce(broker.bootstrap_servers, wanted, [{"old": 1}])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [wanted, other]})
    client = sockjs(proxy.base, "xhr_streaming")
    client.receive(2)

    client.send({"type": "subscribe", "topics": [wanted]})
    (history,) = client.receive(1)
    assert history["type"] == "history" and history["topic"] == wanted
    assert [e["value"] for e in history["messages"]] == [{"old": 1}]

    produce(broker.bootstrap_servers, other, [{"skip": 1}])
    produce(broker.bootstrap_servers, wanted, [{"new": 1}])
    (message,) = client.receive(1)
    assert message["topic"] == wanted and message["message"]["value"] == {"new": 1}
    # The other topic's message was produced first; had it been sent, it would have come first.


@pytest.mark.parametrize("request_message, error_part", [
    ({"type": "subscribe", "topics": ["no-such-topic"]}, "unknown topics: no-such-topic"),
    ({"type": "subscribe", "topics": "x"}, "must be a list"),
    ({"type": "dance"}, "expected"),
    ("{not json", "not valid JSON"),
])
def test_bad_client_messages_get_an_error_and_the_session_stays_open(broker, start_proxy, sockjs,
                                                                      request_message, error_part):
    (topic,) = unique_topics("errors")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base)
    client.receive(1)

    client.send(request_message)
    (error,) = client.receive(1)
    assert error["type"] == "error" and error_part in error["error"]

    produce(broker.bootstrap_servers, topic, [{"still": "open"}])
    assert client.receive(1)[0]["message"]["value"] == {"still": "open"}


def test_health_is_503_until_kafka_is_reachable_and_history_loaded(start_proxy, tmp_path):
    port = free_port()
    (topic,) = unique_topics("health")
    proxy = start_proxy(f"127.0.0.1:{port}", {"topics": [topic]}, wait_healthy=False)

    status, body, headers = proxy.get("/health")
    assert status == 503 and body["status"] in ("starting", "degraded") and body["reason"]
    assert headers["Content-Type"].startswith("application/json")

    with TansuBroker(port=port):
        status, body, _ = wait_until(lambda: (answer := proxy.get("/health"))[0] == 200 and answer, 30,
                                     message="/health 200")
        assert body["status"] == "ok" and "reason" not in body
    # The 503s were answers, not failed requests: logged as warnings, not errors.
    health_lines = [line for line in proxy.log().splitlines() if "path=/health" in line]
    assert any(" WARNING proxy.access: " in line and "status=503" in line for line in health_lines), health_lines
    assert not any(" ERROR " in line for line in health_lines), health_lines


def test_topics_status_and_unknown_routes_answer_json(broker, start_proxy):
    topics = unique_topics("a", "b")
    broker.create_topics(topics)
    produce(broker.bootstrap_servers, topics[0], [{"k": "v"}])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": topics})

    assert proxy.get("/topics")[:2] == (200, topics)
    wait_until(lambda: proxy.get("/status")[1]["topics"][topics[0]]["consumed"] == 1)
    status = proxy.get("/status")[1]["topics"]
    assert status[topics[0]]["buffered"] == 1
    assert status[topics[0]]["last_message"]["value"] == {"k": "v"}
    assert status[topics[1]] == {"buffered": 0, "last_message": None, "consumed": 0, "skipped": {}}
    code, body, headers = proxy.get("/nowhere")
    assert code == 404 and "error" in body and headers["Content-Type"].startswith("application/json")


def test_a_client_that_stops_reading_is_closed_and_costs_the_others_nothing(broker, start_proxy, sockjs):
    (topic,) = unique_topics("flood")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "live": {"max_session_queue_bytes": 1_000_000}})
    reader = sockjs(proxy.base)
    stalled = sockjs(proxy.base)
    stalled.ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads again
    reader.receive(1)

    padding = "x" * 1000
    # 20 MB in steps the reading client keeps up with; the stalled one must absorb all of it.
    for step in range(100):
        numbers = range(step * 200, (step + 1) * 200)
        produce(broker.bootstrap_servers, topic, [{"n": n, "pad": padding} for n in numbers])
        assert [m["message"]["value"]["n"] for m in reader.receive(200, timeout=20)] == list(numbers)
    wait_until(lambda: "proxy_slow_sessions_dropped_total 1.0" in proxy.get("/metrics")[1], 20,
               message="the stalled session to be closed")
    assert proxy.get("/status")[1]["sessions"] == 1


def test_fields_the_policy_hides_never_reach_the_live_view_or_status(broker, start_proxy, sockjs):
    (topic,) = unique_topics("addOffer")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"offer_id": 1, "signature": "c2VjcmV0", "price": 2.5}])
    rules = {"topics": {topic: {"policy": "owner", "drop_columns": ["signature"]}}}
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "export": rules})
    client = sockjs(proxy.base)
    assert [e["value"] for e in client.receive(1)[0]["messages"]] == [{"offer_id": 1, "price": 2.5}]

    produce(broker.bootstrap_servers, topic, [{"offer_id": 2, "signature": "c2VjcmV0"}])

    assert client.receive(1)[0]["message"]["value"] == {"offer_id": 2}
    assert "c2VjcmV0" not in str(proxy.get("/status")[1])
