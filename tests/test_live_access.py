"""live.access: token — who may watch the live stream, and what each merchant sees of it."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, parse_config
from proxy.policy import merchant_id_for
from proxy.testing import SockJSClient, SockJSClosed, produce, unique_topics, wait_until

ADMIN = "admin-" + "a" * 58
TOKENS = {"m1": "1" * 64, "m2": "2" * 64, "m3": "3" * 64}
IDS = {name: merchant_id_for(token) for name, token in TOKENS.items()}


def token_proxy(broker, start_proxy, topics, rules, **live):
    config = {"topics": topics, "export": {"topics": rules},
              "live": {"access": "token", "admin_tokens": ["${TEST_ADMIN_TOKEN}"], **live}, "log_level": "DEBUG"}
    return start_proxy(broker.bootstrap_servers, config, env={"TEST_ADMIN_TOKEN": ADMIN})


def expect_unauthorized(client: SockJSClient, error_pattern: str) -> None:
    messages = []
    with pytest.raises(SockJSClosed) as closed:
        while True:
            messages += client.receive(1, timeout=20)
    assert closed.value.args == (3401, "unauthorized")
    assert [m["type"] for m in messages] == ["error"] and re.search(error_pattern, messages[0]["error"])


@pytest.fixture
def setup(broker, start_proxy):
    public, owned, internal = unique_topics("marketSituation", "buyOffer", "producer")
    broker.create_topics([public, owned, internal])
    produce(broker.bootstrap_servers, owned, [{"merchant_id": IDS["m1"], "n": 1}, {"merchant_id": IDS["m2"], "n": 2}])
    produce(broker.bootstrap_servers, public, [{"merchant_id": IDS["m2"], "offers": []}])
    produce(broker.bootstrap_servers, internal, [{"merchant_id": IDS["m1"], "quantity": 3}])
    rules = {public: {"policy": "public"}, owned: {"policy": "owner"}}
    proxy = token_proxy(broker, start_proxy, [public, owned, internal], rules, auth_timeout=1)
    return proxy, public, owned, internal


def test_nothing_is_sent_before_auth_and_silence_is_closed_3401(setup, sockjs):
    proxy, *_ = setup
    client = sockjs(proxy.base)
    expect_unauthorized(client, r"no auth message within 1 s")
    assert proxy.get("/status", {"Authorization": f"Token {ADMIN}"})[1]["sessions"] == 0


@pytest.mark.parametrize("token", ["", "   ", 42, None, ["x"]])
def test_empty_or_malformed_tokens_are_refused(setup, sockjs, token):
    proxy, *_ = setup
    client = sockjs(proxy.base)
    client.send({"type": "auth", "token": token})
    expect_unauthorized(client, r"non-empty string")


def test_subscribe_before_auth_is_an_error_that_changes_nothing(setup, sockjs):
    proxy, public, owned, internal = setup
    client = sockjs(proxy.base)
    client.send({"type": "subscribe", "topics": [owned]})
    assert client.receive(1)[0] == {"type": "error",
                                    "error": 'authenticate first: send {"type": "auth", "token": "<token>"}'}
    client.send({"type": "auth", "token": TOKENS["m1"]})
    answer, *histories = client.receive(3)
    assert answer == {"type": "auth", "role": "merchant", "merchant_id": IDS["m1"]}
    # Every topic it may see, not just the one it asked for before authenticating.
    assert [h["topic"] for h in histories] == [public, owned]


def test_a_second_auth_with_another_token_is_refused_the_same_one_is_harmless(setup, sockjs):
    proxy, *_ = setup
    client = sockjs(proxy.base)
    client.send({"type": "auth", "token": TOKENS["m1"]})
    client.receive(3)
    client.send({"type": "auth", "token": TOKENS["m1"]})
    assert client.receive(1)[0]["role"] == "merchant"
    client.send({"type": "auth", "token": TOKENS["m2"]})
    expect_unauthorized(client, r"another token")


def test_admin_sees_everything_merchant_only_what_the_export_shows_it(setup, sockjs, broker):
    proxy, public, owned, internal = setup
    admin = sockjs(proxy.base)
    admin.send({"type": "auth", "token": ADMIN})
    answer, *histories = admin.receive(4)
    assert answer == {"type": "auth", "role": "admin"}
    assert [len(h["messages"]) for h in histories] == [1, 2, 1]

    merchant = sockjs(proxy.base)
    merchant.send({"type": "auth", "token": TOKENS["m1"]})
    answer, *histories = merchant.receive(3)
    by_topic = {h["topic"]: [e["value"] for e in h["messages"]] for h in histories}
    # Public whole, owned only its own, the producer topic (not exportable) not at all.
    assert by_topic == {public: [{"merchant_id": IDS["m2"], "offers": []}],
                        owned: [{"merchant_id": IDS["m1"], "n": 1}]}

    merchant.send({"type": "subscribe", "topics": [owned, internal]})
    assert merchant.receive(1)[0] == {"type": "error", "error": f"topics not visible to this merchant: {internal}"}

    produce(broker.bootstrap_servers, owned, [{"merchant_id": IDS["m2"], "n": 3}, {"merchant_id": IDS["m1"], "n": 4}])
    (live,) = merchant.receive(1)
    assert live["message"]["value"] == {"merchant_id": IDS["m1"], "n": 4}
    assert [m["message"]["value"]["n"] for m in admin.receive(2)] == [3, 4]


def test_status_needs_an_admin_token_health_metrics_topics_stay_open_without_records(setup):
    proxy, public, owned, internal = setup
    assert proxy.get("/status")[0] == 401
    assert proxy.get("/status", {"Authorization": f"Token {TOKENS['m1']}"})[0] == 401
    status, body, _ = proxy.get("/status", {"Authorization": f"Token {ADMIN}"})
    assert status == 200 and body["topics"][owned]["buffered"] == 2
    health = proxy.get("/health")[1]
    assert health["live_access"] == "token"
    for path in ("/health", "/metrics", "/topics"):
        text = json.dumps(proxy.get(path)[1])
        assert not any(merchant_id in text or merchant_id.replace("+", "\\u002b") in text for merchant_id in IDS.values())


def test_admin_tokens_never_reach_the_log(setup, sockjs):
    proxy, *_ = setup
    client = sockjs(proxy.base)
    client.send({"type": "auth", "token": ADMIN})
    client.receive(4)
    proxy.get("/status", {"Authorization": f"Token {ADMIN}"})
    bad = sockjs(proxy.base)
    bad.send({"type": "auth", "token": ["not", ADMIN]})
    with pytest.raises(SockJSClosed):
        bad.receive(5, timeout=20)
    log = proxy.log()
    assert "path=/status status=200" in log  # the requests that carried it were logged
    assert ADMIN not in log and ADMIN[:20] not in log


def test_unknown_access_mode_or_unset_admin_token_variable_is_a_config_error():
    with pytest.raises(ConfigError, match="'live.access' must be one of open, token"):
        parse_config({"live": {"access": "tokens"}})
    with pytest.raises(ConfigError, match="live.admin_tokens\\[0\\]"):
        parse_config({"live": {"access": "token", "admin_tokens": ["${SURELY_NOT_SET_12345}"]}})


# ---- the property: a merchant's live stream and its export show the same records ----------------

KINDS = ("public", "owner", "owner_or_unowned", "internal")
OWNERS = st.sampled_from([IDS["m1"], IDS["m2"], IDS["m3"], None, 42])
RECORDS = st.lists(st.tuples(st.sampled_from(KINDS), OWNERS, st.sampled_from([200, 200, 409, None]),
                             st.integers(0, 3)), min_size=1, max_size=30)


@pytest.fixture(scope="module")
def property_proxy(broker, tmp_path_factory):
    from proxy.testing import ProxyProcess

    topics = dict(zip(KINDS, unique_topics(*KINDS)))
    broker.create_topics(list(topics.values()), partitions=4)
    rules = {topics[kind]: {"policy": kind} for kind in KINDS if kind != "internal"}
    config = {"topics": list(topics.values()), "export": {"topics": rules},
              "live": {"access": "token", "admin_tokens": [ADMIN]}}
    proxy = ProxyProcess(broker.bootstrap_servers, config, tmp_path_factory.mktemp("property")).start()
    yield proxy, topics
    proxy.stop()


def may_see(kind: str, owner: object, merchant: str) -> bool:
    """The rule, written independently of proxy.policy."""
    return kind == "public" or (kind == "owner" and owner == merchant) or (
        kind == "owner_or_unowned" and (owner is None or owner == merchant))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=RECORDS, split=st.integers(0, 30))
def test_every_merchant_sees_live_exactly_what_its_export_holds(property_proxy, broker, records, split):
    proxy, topics = property_proxy
    run = uuid.uuid4().hex

    def write(part):
        for i, (kind, owner, code, partition) in part:
            value = {"run": run, "i": i}
            if owner is not None:
                value["merchant_id"] = owner
            if code is not None:
                value["http_code"] = code
            produce(broker.bootstrap_servers, topics[kind], [value], partition=partition)

    numbered = list(enumerate(records))
    write(numbered[:split])  # these reach the sessions as history, the rest live
    clients = {}
    try:
        for name in TOKENS:
            client = clients[name] = SockJSClient(proxy.base)
            client.send({"type": "auth", "token": TOKENS[name]})
        write(numbered[split:])
        for name, client in clients.items():
            merchant = IDS[name]
            expected = {i for i, (kind, owner, code, _) in enumerate(records)
                        if may_see(kind, owner, merchant) and code in (200, None)}
            seen: set[tuple[str, int]] = set()

            def collect() -> bool:
                for message in client.receive(1, timeout=20):
                    envelopes = message.get("messages") or ([message["message"]] if "message" in message else [])
                    for envelope in envelopes:
                        value = envelope["value"]
                        assert value.get("merchant_id") in (merchant, None) or envelope["topic"] == topics["public"], value
                        if value.get("run") == run:
                            seen.add((envelope["topic"], value["i"]))
                return len(seen) >= len(expected)

            wait_until(collect, 30, interval=0, message=f"{name}'s {len(expected)} records")
            assert {i for _, i in seen} == expected
            # The export's view of the same records (less the failed requests the live view drops).
            status, body, _ = proxy.get("/export/data", {"Authorization": f"Token {TOKENS[name]}",
                                                          "Accept": "text/csv"})
            exported = {json.loads(row["value"])["i"] for row in _csv_rows(body)
                        if json.loads(row["value"]).get("run") == run
                        and json.loads(row["value"]).get("http_code", 200) == 200}
            assert exported == expected
    finally:
        for client in clients.values():
            client.close()


def _csv_rows(text: str) -> list[dict[str, str]]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))
