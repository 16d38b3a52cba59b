"""The market simulator writes Price Wars traffic of the documented shape, consistently, into Kafka."""

from __future__ import annotations

import itertools
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import ujson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from proxy.demo.broker import TansuBroker
from proxy.demo.simulator import (
    PRODUCED_TOPICS,
    STATISTICS_TOPICS,
    MarketSimulator,
    Merchant,
    merchant_id_for,
)

OFFER_FIELDS = ["offer_id", "uid", "product_id", "quality", "merchant_id", "amount", "price",
                "shipping_time_standard", "shipping_time_prime", "prime"]
FIELDS = {
    "addOffer": OFFER_FIELDS + ["signature", "http_code", "timestamp"],
    "updateOffer": OFFER_FIELDS + ["http_code", "timestamp"],
    "buyOffer": ["offer_id", "uid", "product_id", "quality", "price", "amount", "merchant_id",
                 "left_in_stock", "consumer_id", "http_code", "timestamp"],
    "marketSituation": ["timestamp", "trigger", "merchant_id", "product_id", "offers"],
    "producer": ["merchant_id", "product_id", "quantity", "unit_price", "billing_amount", "timestamp"],
    "profit": ["merchant_id", "profit", "timestamp"],
    "profitPerMinute": ["merchant_id", "profit", "timestamp"],
    "profitPerHour": ["merchant_id", "profit", "timestamp"],
    "revenuePerMinute": ["merchant_id", "revenue", "timestamp"],
    "revenuePerHour": ["merchant_id", "revenue", "timestamp"],
    "cumulativeRevenue": ["merchant_id", "revenue", "timestamp"],
    "cumulativeAmountBasedMarketshare": ["merchant_id", "marketshare", "timestamp"],
    "cumulativeRevenueBasedMarketshare": ["merchant_id", "marketshare", "timestamp"],
    "inventory_level": ["merchant_id", "level", "timestamp"],
}
FAILURE_CODES = {"addOffer": {451, 500}, "updateOffer": {404, 500}, "buyOffer": {409, 410}}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TIMESTAMP_WHOLE_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

KNOWN_TOKEN = "ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7"
KNOWN_ID = "YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew="


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    with TansuBroker() as running_broker:
        yield running_broker


def sample(simulator: MarketSimulator, count: int) -> list[tuple[str, dict[str, Any]]]:
    return list(itertools.islice(simulator.events(), count))


def expected_fields(topic: str, record: dict[str, Any]) -> list[str]:
    if topic == "addOffer" and record["http_code"] != 200:
        return FIELDS["addOffer"][1:]  # a rejected offer never got an offer_id
    return FIELDS[topic]


def read_topics(bootstrap_servers: str, topics: list[str], timeout: float = 15.0) -> dict[str, list[dict]]:
    """Every record of every partition of the topics, read until each partition reports EOF."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap_servers,
        "group.id": "test-simulator-reader",  # required by the library; never joined or committed
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 50,
    })
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [TopicPartition(topic, partition, OFFSET_BEGINNING)
                      for topic in topics for partition in metadata.topics[topic].partitions]
        consumer.assign(partitions)
        pending = {(p.topic, p.partition) for p in partitions}
        records: dict[str, list[dict]] = defaultdict(list)
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, f"no EOF from {sorted(pending)}"
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                pending.discard((message.topic(), message.partition()))
                continue
            assert message.key() is None
            records[message.topic()].append(ujson.loads(message.value()))
        return records
    finally:
        consumer.close()


def test_merchant_id_matches_known_vector() -> None:
    assert merchant_id_for(KNOWN_TOKEN) == KNOWN_ID
    assert Merchant(KNOWN_TOKEN, name="known").merchant_id == KNOWN_ID


def test_generated_merchants_have_fresh_64_character_tokens() -> None:
    first, second = Merchant.generate("a"), Merchant.generate("b")
    assert re.fullmatch(r"[0-9A-Za-z]{64}", first.token)
    assert first.token != second.token
    assert len(first.merchant_id) == 44 and first.merchant_id == merchant_id_for(first.token)
    assert first.token not in repr(first)


def test_events_have_documented_fields_in_order() -> None:
    simulator = MarketSimulator("unused:9092", seed=1)
    merchant_ids = {merchant.merchant_id for merchant in simulator.merchants}
    seen_topics = set()
    for topic, record in sample(simulator, 4000):
        seen_topics.add(topic)
        assert list(record) == expected_fields(topic, record), topic
        assert record["merchant_id"] in merchant_ids
        if topic == "inventory_level":
            assert TIMESTAMP.match(record["timestamp"]) or TIMESTAMP_WHOLE_SECONDS.match(record["timestamp"])
        else:
            assert TIMESTAMP.match(record["timestamp"]), record["timestamp"]
        if "http_code" in record and record["http_code"] != 200:
            assert record["http_code"] in FAILURE_CODES[topic]
        if "price" in record:
            assert isinstance(record["price"], float) and record["price"] > 0
        if topic in ("addOffer", "updateOffer"):
            assert isinstance(record["prime"], bool)
        if topic == "marketSituation":
            assert record["trigger"] in ("addOffer", "updateOffer")
            for offer in record["offers"]:
                assert list(offer) == OFFER_FIELDS
                assert offer["product_id"] == record["product_id"]
        if topic.endswith("Marketshare"):
            assert 0.0 <= record["marketshare"] <= 1.0
    assert seen_topics == set(PRODUCED_TOPICS)
    assert not seen_topics & {"updates", "salesPerMinutes"}


def test_market_state_stays_consistent() -> None:
    """Replaying the stream as a marketplace would: sales and snapshots agree with the offers."""
    simulator = MarketSimulator("unused:9092", seed=2)
    book: dict[int, dict[str, Any]] = {}
    ever_offered: set[int] = set()
    revenue: dict[str, float] = defaultdict(float)
    previous: tuple[str, dict[str, Any]] | None = None
    sales = sold_out_attempts = 0
    for topic, record in sample(simulator, 5000):
        code = record.get("http_code")
        if topic == "addOffer" and code == 200:
            assert record["offer_id"] not in ever_offered
            ever_offered.add(record["offer_id"])
            book[record["offer_id"]] = {key: record[key] for key in OFFER_FIELDS}
        elif topic == "updateOffer" and code == 200:
            offer = book[record["offer_id"]]
            assert (record["merchant_id"], record["amount"]) == (offer["merchant_id"], offer["amount"])
            offer["price"] = record["price"]
        elif topic == "updateOffer" and code == 404:
            assert record["offer_id"] in ever_offered and record["offer_id"] not in book
        elif topic == "buyOffer" and code == 200:
            sales += 1
            offer = book[record["offer_id"]]
            assert (record["merchant_id"], record["product_id"], record["price"]) == (
                offer["merchant_id"], offer["product_id"], offer["price"])
            assert record["left_in_stock"] == offer["amount"] - record["amount"] >= 0
            offer["amount"] = record["left_in_stock"]
            revenue[record["merchant_id"]] += record["price"] * record["amount"]
            if offer["amount"] == 0:
                del book[record["offer_id"]]
        elif topic == "buyOffer" and code == 410:
            sold_out_attempts += 1
            assert record["left_in_stock"] == 0
            assert record["offer_id"] in ever_offered and record["offer_id"] not in book
        elif topic == "buyOffer" and code == 409:
            assert record["price"] != book[record["offer_id"]]["price"]
        elif topic == "marketSituation":
            assert previous is not None and previous[0] == record["trigger"]
            assert previous[1]["http_code"] == 200 and previous[1]["merchant_id"] == record["merchant_id"]
            current = [offer for offer in book.values() if offer["product_id"] == record["product_id"]]
            assert sorted(record["offers"], key=lambda o: o["offer_id"]) == current
        elif topic == "cumulativeRevenue":
            assert record["revenue"] == pytest.approx(revenue[record["merchant_id"]], abs=0.01)
        elif topic == "inventory_level":
            assert record["level"] == sum(offer["amount"] for offer in book.values()
                                          if offer["merchant_id"] == record["merchant_id"])
        previous = (topic, record)
    assert sales > 100 and sold_out_attempts > 0


def test_same_seed_gives_the_same_market() -> None:
    merchants = [Merchant.generate("a"), Merchant.generate("b")]

    def without_timestamps(seed: int) -> list[tuple[str, dict[str, Any]]]:
        return [(topic, {key: value for key, value in record.items() if key != "timestamp"})
                for topic, record in sample(MarketSimulator("unused:9092", merchants=merchants, seed=seed), 500)]

    assert without_timestamps(5) == without_timestamps(5)
    assert without_timestamps(5) != without_timestamps(6)


def test_simulator_writes_all_topics_to_kafka(broker: TansuBroker) -> None:
    broker.restart()  # an empty broker (memory storage), so the topic counts below are exact
    simulator = MarketSimulator(broker.bootstrap_servers, rate=None, max_events=4000, seed=7)

    assert simulator.run() == 4000
    assert simulator.delivery_errors == 0
    assert set(simulator.produced) == set(PRODUCED_TOPICS)

    records = read_topics(broker.bootstrap_servers, list(PRODUCED_TOPICS))
    assert {topic: len(values) for topic, values in records.items()} == dict(simulator.produced)

    merchant_ids = {merchant.merchant_id for merchant in simulator.merchants}
    prices_by_offer: dict[int, set[float]] = defaultdict(set)
    owner_by_offer: dict[int, str] = {}
    failures: dict[str, set[int]] = defaultdict(set)
    for topic, values in records.items():
        for record in values:
            assert isinstance(record, dict)
            assert list(record) == expected_fields(topic, record)
            assert record["merchant_id"] in merchant_ids
            if record.get("http_code", 200) != 200:
                failures[topic].add(record["http_code"])
            if topic in ("addOffer", "updateOffer") and record["http_code"] == 200:
                prices_by_offer[record["offer_id"]].add(record["price"])
                owner_by_offer[record["offer_id"]] = record["merchant_id"]
    assert failures == FAILURE_CODES

    sales = [record for record in records["buyOffer"] if record["http_code"] == 200]
    assert sales
    for sale in sales:
        assert sale["offer_id"] in owner_by_offer, "a sale of an offer that was never added"
        assert sale["merchant_id"] == owner_by_offer[sale["offer_id"]]
        assert sale["price"] in prices_by_offer[sale["offer_id"]]
    for topic in STATISTICS_TOPICS:
        assert {record["merchant_id"] for record in records[topic]} == merchant_ids


def test_duration_bounds_a_paced_run(broker: TansuBroker) -> None:
    simulator = MarketSimulator(broker.bootstrap_servers, rate=100.0, duration=1.0, seed=8)

    started = time.monotonic()
    count = simulator.run()
    elapsed = time.monotonic() - started

    assert 0.9 <= elapsed < 3.0
    assert 60 <= count <= 130  # about rate x duration, plus at most one 100 ms burst


def test_stop_ends_a_running_simulator_promptly(broker: TansuBroker) -> None:
    simulator = MarketSimulator(broker.bootstrap_servers, rate=200.0, seed=9)
    simulator.start()
    try:
        deadline = time.monotonic() + 10.0
        while sum(simulator.produced.values()) < 50:
            assert time.monotonic() < deadline, "the simulator produced nothing"
            assert simulator.running, f"the simulator ended early: {simulator.error!r}"
            time.sleep(0.01)
    finally:
        started = time.monotonic()
        simulator.stop(timeout=5.0)
    assert time.monotonic() - started < 1.5
    assert not simulator.running and simulator.error is None
    assert simulator.delivery_errors == 0
    stopped_at = sum(simulator.produced.values())
    records = read_topics(broker.bootstrap_servers, sorted(simulator.produced))
    # Earlier tests wrote to the same topics, so this run's records are a lower bound.
    assert sum(len(values) for values in records.values()) >= stopped_at
