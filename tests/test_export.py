"""Merchant CSV export against a real Tansu broker: visibility, files, streaming, errors, data folder."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime
import hashlib
import http.client
import io
import json
import os
import random
import socket
import string
import threading
import time
import typing
import urllib.error
import urllib.request
import uuid

import pandas
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.demo.broker import TansuBroker, free_port
from proxy.config import TopicExportConfig
from proxy.export.data_folder import DataFolder
from proxy.export.errors import ExportCancelled, ExportKafkaUnavailable
from proxy.export.service import ExportService
from proxy.export.handlers import DataFileHandler, ExportHandler
from proxy.http_api import NotFoundHandler
from proxy.metrics import REGISTRY
from proxy.config import default_topic_rules
from proxy.policy import VisibilityPolicy, merchant_id_for
from proxy.testing import produce
from proxy.testing import wait_until

BASE_TIME_MS = 1_521_194_400_000  # 2018-03-16T10:00:00Z
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
BUY_OFFER_COLUMNS = ["offer_id", "uid", "product_id", "quality", "price", "amount", "merchant_id", "left_in_stock",
                     "consumer_id", "http_code", "timestamp"]
MARKET_SITUATION_COLUMNS = ["timestamp", "triggering_merchant_id", "trigger", "offer_id", "uid", "product_id",
                            "quality", "merchant_id", "amount", "price", "shipping_time_standard",
                            "shipping_time_prime", "prime"]


def seeded_token(seed: int, id_starts_with: str | None = None) -> str:
    """A reproducible 64-character token, optionally one whose merchant id starts with a given character."""
    generator = random.Random(seed)
    while True:
        token = "".join(generator.choice(string.ascii_letters + string.digits) for _ in range(64))
        if id_starts_with is None or merchant_id_for(token).startswith(id_starts_with):
            return token


# Three merchants; one id starts with "+", which the CSV must still show unchanged.
TOKENS = ["ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7", seeded_token(1),
          seeded_token(2, id_starts_with="+")]
MERCHANTS = [merchant_id_for(token) for token in TOKENS]
STRANGER_TOKEN = seeded_token(3)  # owns nothing: sees only public rows


def iso(epoch_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def expected_cell(value: typing.Any) -> str:
    """The spec's cell rules, written independently of the writer."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        if value in MERCHANTS or len(value) == 44 and value.endswith("=") and "(" not in value:
            return value  # ids are base64: no function can hide in them, and they must match
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


@dataclasses.dataclass
class Response:
    status: int
    headers: typing.Any
    body: bytes

    def json(self) -> typing.Any:
        return json.loads(self.body)


def get(url: str, token: str | None = None, **headers: str) -> Response:
    if token is not None:
        headers["Authorization"] = f"Token {token}"
    request = urllib.request.Request(url, headers={name.replace("_", "-"): value for name, value in headers.items()})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return Response(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.headers, error.read())


def raw_get(base: str, path: str, method: str = "GET", **headers: str) -> Response:
    """A request whose path goes on the wire exactly as written (no client-side normalisation)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name.replace("_", "-"), value)
        connection.endheaders()
        answer = connection.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        connection.close()


def csv_rows(text: str | bytes) -> list[dict[str, str]]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def csv_header(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return next(csv.reader(io.StringIO(text, newline="")))


def export_files(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name != ".gitkeep")


def make_app(service: ExportService, data_dir: str, cors_origins: typing.Sequence[str] = ("*",)) -> tornado.web.Application:
    """The export routes as the proxy wires them."""
    common = {"cors_origins": cors_origins}
    return tornado.web.Application([
        (r"/+export/+data/*", ExportHandler, dict(common, service=service)),
        (r"/+export/+data/+([^/]+)/*", ExportHandler, dict(common, service=service)),
        (r"/+data/+(.*)", DataFileHandler, dict(common, path=data_dir)),
    ], default_handler_class=NotFoundHandler, default_handler_args=common)


class ServerThread:
    """An asyncio loop on a background thread serving test apps, as the proxy's IOLoop would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: list[tornado.httpserver.HTTPServer] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-ioloop", daemon=True)
        self._thread.start()

    def run(self, coroutine: typing.Awaitable[typing.Any], timeout: float = 60) -> typing.Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def serve(self, app: tornado.web.Application) -> str:
        async def listen() -> int:
            server = tornado.httpserver.HTTPServer(app)
            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            server.add_sockets(sockets)
            self._servers.append(server)
            return sockets[0].getsockname()[1]

        return f"http://127.0.0.1:{self.run(listen())}"

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.stop()
                await server.close_all_connections()

        try:
            self.run(close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@dataclasses.dataclass
class Proxy:
    base: str
    service: ExportService
    data_dir: str


@pytest.fixture(scope="module")
def export_broker() -> typing.Iterator[TansuBroker]:
    """A real Kafka-protocol broker for this module, stopped at teardown even after a failure."""
    with TansuBroker() as running:
        yield running


@pytest.fixture(scope="module")
def server_thread() -> typing.Iterator[ServerThread]:
    thread = ServerThread()
    try:
        yield thread
    finally:
        thread.stop()


def start_proxy(server_thread: ServerThread, bootstrap: str, data_dir: str, rules: dict[str, TopicExportConfig] | None = None,
                cors_origins: typing.Sequence[str] = ("*",), **service_options: typing.Any) -> Proxy:
    os.makedirs(data_dir, exist_ok=True)
    folder = DataFolder(data_dir, retention_seconds=3600, max_bytes=1024 ** 3)
    service = ExportService({"bootstrap.servers": bootstrap}, VisibilityPolicy(rules or default_topic_rules()), folder, **service_options)
    return Proxy(server_thread.serve(make_app(service, data_dir, cors_origins)), service, data_dir)


@pytest.fixture(scope="module")
def proxy(export_broker: TansuBroker, server_thread: ServerThread, tmp_path_factory: typing.Any) -> Proxy:
    """The export routes with the default rules of config.yaml, on a loopback port."""
    return start_proxy(server_thread, export_broker.bootstrap_servers, str(tmp_path_factory.mktemp("data")))


def offer(offer_id: int, merchant: str, price: float) -> dict[str, typing.Any]:
    return {"offer_id": offer_id, "uid": 11, "product_id": 1, "quality": 1 + offer_id % 3, "merchant_id": merchant,
            "amount": 5, "price": price, "shipping_time_standard": 5, "shipping_time_prime": 1,
            "prime": offer_id % 2 == 0}


@pytest.fixture(scope="module")
def market(export_broker: TansuBroker) -> dict[str, list[dict[str, typing.Any]]]:
    """A small market of three merchants on the default topics, spread over several partitions."""
    topics = {"buyOffer": 3, "marketSituation": 2, "addOffer": 2, "profit": 1, "producer": 1, "updates": 2}
    for name, count in topics.items():
        export_broker.create_topics([name], partitions=count)
    data: dict[str, list[dict[str, typing.Any]]] = {name: [] for name in topics}
    for i in range(30):
        merchant = MERCHANTS[i % 3]
        data["buyOffer"].append({
            "offer_id": i, "uid": 11, "product_id": 1, "quality": 1, "price": 20 + i / 4, "amount": 1,
            "merchant_id": merchant, "left_in_stock": 30 - i, "consumer_id": f"consumer{i % 5}=",
            "http_code": 409 if i % 7 == 0 else 200, "timestamp": iso(BASE_TIME_MS + i * 1000)})
    for i in range(10):
        data["marketSituation"].append({
            "timestamp": iso(BASE_TIME_MS + i * 1000 + 500), "trigger": "addOffer" if i % 2 else "updateOffer",
            "merchant_id": MERCHANTS[i % 3], "product_id": 1,
            "offers": [offer(100 + 3 * i + k, MERCHANTS[k], 10.0 + k + i / 8) for k in range(3)]})
    for i in range(9):
        merchant = MERCHANTS[i % 3]
        data["addOffer"].append({**offer(200 + i, merchant, 12.5), "signature": f"SIG-{i}-c2VjcmV0",
                                 "http_code": 200, "timestamp": iso(BASE_TIME_MS + i * 1000 + 100)})
        data["profit"].append({"merchant_id": merchant, "profit": 100.0 + i,
                               "timestamp": iso(BASE_TIME_MS + i * 1000 + 200)})
    for i in range(3):
        data["producer"].append({"merchant_id": MERCHANTS[i], "product_id": 1, "quantity": 10, "unit_price": 7.5,
                                 "billing_amount": 75.0, "timestamp": iso(BASE_TIME_MS + i * 1000 + 300)})
    for i in range(6):
        update = {"kind": "notice", "sequence": i, "timestamp": iso(BASE_TIME_MS + i * 1000 + 400)}
        if i % 2:
            update["merchant_id"] = MERCHANTS[i % 3]
        data["updates"].append(update)
    for name, messages in data.items():
        partitions = [i % topics[name] for i in range(len(messages))]
        timestamps = [record_time(name, i) for i in range(len(messages))]
        produce(export_broker.bootstrap_servers, name, messages, partitions, timestamps)
    return data


MARKET_TOPICS = ["buyOffer", "marketSituation", "addOffer", "profit", "producer", "updates"]


def record_time(topic: str, index: int) -> int:
    """The record timestamp the market fixture gives message `index` of `topic`: all distinct."""
    return BASE_TIME_MS + index * 1000 + MARKET_TOPICS.index(topic) * 100


def export(proxy: Proxy, path: str, token: str | None = TOKENS[0], **headers: str) -> Response:
    """Ask for an export and, on success, fetch the file it names (without a token, like the SDK)."""
    answer = get(proxy.base + path, token, **headers)
    if answer.status != 200 or headers.get("Accept") == "text/csv":
        return answer
    url = answer.json()["url"]
    assert url.startswith("data/") and url.endswith(".csv"), url
    return get(f"{proxy.base}/{url}")


# --- Visibility, property-based ------------------------------------------------------------------

merchant_ids = st.sampled_from(MERCHANTS)
money = st.floats(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False)
small = st.integers(0, 50)
words = st.text(alphabet=string.ascii_letters + "+/=-@ ,\"", max_size=8)
signatures = st.binary(min_size=6, max_size=6).map(lambda raw: "SIG" + raw.hex())
offers = st.fixed_dictionaries({
    "offer_id": small, "uid": small, "product_id": small, "quality": st.integers(1, 4), "merchant_id": merchant_ids,
    "amount": small, "price": money, "shipping_time_standard": small, "shipping_time_prime": small,
    "prime": st.booleans()})
def statistics(field: str) -> st.SearchStrategy[dict[str, typing.Any]]:
    return st.fixed_dictionaries({"merchant_id": merchant_ids, field: money})


unowned_or_owned = st.fixed_dictionaries({"note": words}, optional={"merchant_id": merchant_ids, "level": small})
# Every exportable topic of the default rules, with messages of its documented shape.
MESSAGES = {
    "buyOffer": st.fixed_dictionaries({
        "offer_id": small, "price": money, "amount": small, "merchant_id": merchant_ids, "left_in_stock": small,
        "consumer_id": words, "http_code": st.sampled_from([200, 409, 410])}),
    "addOffer": st.builds(lambda base, signature, code: {**base, "signature": signature, "http_code": code},
                          offers, signatures, st.sampled_from([200, 451, 500])),
    "updateOffer": st.builds(lambda base, code: {**base, "http_code": code}, offers, st.sampled_from([200, 404, 500])),
    "marketSituation": st.fixed_dictionaries({
        "trigger": st.sampled_from(["addOffer", "updateOffer"]), "merchant_id": merchant_ids, "product_id": small,
        "offers": st.lists(offers, max_size=4)}),
    "updates": unowned_or_owned,
    "salesPerMinutes": unowned_or_owned,
    **{topic: statistics("profit") for topic in ("profit", "profitPerMinute", "profitPerHour")},
    **{topic: statistics("revenue") for topic in ("revenuePerMinute", "revenuePerHour", "cumulativeRevenue")},
    **{topic: statistics("marketshare")
       for topic in ("cumulativeAmountBasedMarketshare", "cumulativeRevenueBasedMarketshare")},
    "inventory_level": statistics("level"),
}


def allowed_rows(kind: str, messages: list[dict[str, typing.Any]], merchant: str) -> list[dict[str, typing.Any]]:
    """What the issue says a merchant may see, written independently of proxy.policy."""
    if kind == "marketSituation":
        return [{"timestamp": message["timestamp"], "triggering_merchant_id": message["merchant_id"],
                 "trigger": message["trigger"], **item} for message in messages for item in message["offers"]]
    if kind in ("updates", "salesPerMinutes"):
        return [message for message in messages if message.get("merchant_id", merchant) == merchant]
    return [{key: value for key, value in message.items() if key != "signature"}
            for message in messages if message["merchant_id"] == merchant]


def test_the_property_test_covers_every_exportable_topic() -> None:
    assert set(MESSAGES) == set(default_topic_rules())


@pytest.mark.parametrize("kind", list(MESSAGES))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_merchant_export_contains_exactly_the_rows_its_policy_allows(
        kind: str, data: st.DataObject, export_broker: TansuBroker, tmp_path_factory: typing.Any) -> None:
    messages = data.draw(st.lists(MESSAGES[kind], max_size=20), label="messages")
    partitions = data.draw(st.lists(st.integers(0, 2), min_size=len(messages), max_size=len(messages)),
                           label="partitions")
    timestamps = [BASE_TIME_MS + i * 1000 for i in range(len(messages))]
    for message, timestamp in zip(messages, timestamps):
        message["timestamp"] = iso(timestamp)
    topic = f"{kind}-{uuid.uuid4().hex[:8]}"
    export_broker.create_topics([topic], partitions=3)
    produce(export_broker.bootstrap_servers, topic, messages, partitions, timestamps)
    rules = default_topic_rules()[kind]
    folder = DataFolder(str(tmp_path_factory.mktemp("prop")), 3600, 1024 ** 3)
    service = ExportService({"bootstrap.servers": export_broker.bootstrap_servers}, VisibilityPolicy({topic: rules}),
                            folder)

    async def export_for_everyone() -> list[tuple[str, str]]:
        files = []
        for merchant in [*MERCHANTS, merchant_id_for(STRANGER_TOKEN)]:
            result = await service.export_to_file(topic, merchant)
            with open(os.path.join(folder.path, result.filename), encoding="utf-8", newline="") as handle:
                files.append((merchant, handle.read()))
        await service.cancel_all()
        return files

    for merchant, text in asyncio.run(export_for_everyone()):
        expected = allowed_rows(kind, messages, merchant)
        if rules.columns is not None:
            columns = [column for column in rules.columns if column not in rules.drop_columns]
        else:
            columns = list(dict.fromkeys(key for row in expected for key in row)) or ["timestamp"]
        assert csv_header(text) == columns
        assert csv_rows(text) == [{column: expected_cell(row.get(column)) for column in columns} for row in expected]
        assert "SIG" not in text
        if kind != "marketSituation":
            for competitor in MERCHANTS:
                if competitor != merchant:
                    assert competitor not in text, "a competitor's row leaked"


# --- Visibility and compatibility over HTTP --------------------------------------------------------

def test_merchant_never_sees_competitor_sales(proxy: Proxy, market: dict) -> None:
    for token, merchant in zip(TOKENS, MERCHANTS):
        answer = export(proxy, "/export/data/buyOffer", token)
        assert answer.status == 200
        rows = csv_rows(answer.body)
        own = [sale for sale in market["buyOffer"] if sale["merchant_id"] == merchant]
        assert [row["offer_id"] for row in rows] == [str(sale["offer_id"]) for sale in own]
        assert {row["merchant_id"] for row in rows} == {expected_cell(merchant)}


def test_merchant_never_sees_competitor_statistics(proxy: Proxy, market: dict) -> None:
    answer = export(proxy, "/export/data/profit", TOKENS[1])
    rows = csv_rows(answer.body)
    assert [row["profit"] for row in rows] == [repr(stat["profit"]) for stat in market["profit"]
                                               if stat["merchant_id"] == MERCHANTS[1]]


def test_signatures_are_in_no_export(proxy: Proxy, market: dict) -> None:
    for path in ("/export/data/addOffer", "/export/data"):
        answer = export(proxy, path, TOKENS[0])
        assert answer.status == 200
        assert b"SIG-" not in answer.body and b"signature" not in answer.body
    assert len(csv_rows(export(proxy, "/export/data/addOffer", TOKENS[0]).body)) == 3


def test_token_that_owns_nothing_sees_only_public_and_unowned_rows(proxy: Proxy, market: dict) -> None:
    assert csv_rows(export(proxy, "/export/data/buyOffer", STRANGER_TOKEN).body) == []
    assert len(csv_rows(export(proxy, "/export/data/marketSituation", STRANGER_TOKEN).body)) == 30
    updates = csv_rows(export(proxy, "/export/data/updates", STRANGER_TOKEN).body)
    assert [row["sequence"] for row in updates] == ["0", "2", "4"]


def test_pandas_reads_the_buy_offer_export_like_the_merchant_sdk(proxy: Proxy, market: dict) -> None:
    answer = get(proxy.base + "/export/data/buyOffer", TOKENS[2])
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
    url = answer.json()["url"]
    frame = pandas.read_csv(proxy.base + "/" + url, parse_dates=["timestamp"])
    own = [sale for sale in market["buyOffer"] if sale["merchant_id"] == MERCHANTS[2]]
    assert list(frame.columns) == BUY_OFFER_COLUMNS
    assert frame["offer_id"].tolist() == [sale["offer_id"] for sale in own]
    assert frame["amount"].tolist() == [sale["amount"] for sale in own]
    assert frame["price"].tolist() == [sale["price"] for sale in own]
    assert frame["http_code"].tolist() == [sale["http_code"] for sale in own]
    assert frame["timestamp"].tolist() == [pandas.Timestamp(sale["timestamp"]) for sale in own]


def test_pandas_reads_the_market_situation_export_one_row_per_offer(proxy: Proxy, market: dict) -> None:
    url = get(proxy.base + "/export/data/marketSituation", TOKENS[0]).json()["url"]
    frame = pandas.read_csv(proxy.base + "/" + url, parse_dates=["timestamp"])
    offers = [(snapshot, item) for snapshot in market["marketSituation"] for item in snapshot["offers"]]
    assert list(frame.columns) == MARKET_SITUATION_COLUMNS
    assert frame["timestamp"].tolist() == [pandas.Timestamp(snapshot["timestamp"]) for snapshot, _ in offers]
    assert frame["offer_id"].tolist() == [item["offer_id"] for _, item in offers]
    assert frame["merchant_id"].tolist() == [expected_cell(item["merchant_id"]) for _, item in offers]
    assert frame["triggering_merchant_id"].tolist() == [expected_cell(snapshot["merchant_id"]) for snapshot, _ in offers]
    assert frame["price"].tolist() == [item["price"] for _, item in offers]
    assert frame["quality"].tolist() == [item["quality"] for _, item in offers]
    assert frame["product_id"].tolist() == [item["product_id"] for _, item in offers]


def test_all_topics_export_has_one_row_per_visible_message(proxy: Proxy, market: dict) -> None:
    answer = export(proxy, "/export/data", TOKENS[1])
    assert answer.status == 200
    assert csv_header(answer.body) == ["topic", "partition", "offset", "timestamp", "value"]
    rows = csv_rows(answer.body)
    policy = {"buyOffer": "owner", "addOffer": "owner", "profit": "owner", "marketSituation": "public",
              "updates": "owner_or_unowned"}
    expected = []
    for topic, rule in policy.items():
        for index, message in enumerate(market[topic]):
            owner = message.get("merchant_id")
            if rule == "public" or owner == MERCHANTS[1] or (rule == "owner_or_unowned" and owner is None):
                visible = {key: value for key, value in message.items() if key != "signature"}
                expected.append((record_time(topic, index), topic, visible))
    expected.sort(key=lambda item: item[0])
    assert [(row["timestamp"], row["topic"], json.loads(row["value"])) for row in rows] == \
           [(iso(stamp), topic, message) for stamp, topic, message in expected]
    assert all(row["partition"].isdigit() and row["offset"].isdigit() for row in rows)


def test_accept_text_csv_streams_the_same_rows(proxy: Proxy, market: dict) -> None:
    as_file = export(proxy, "/export/data/buyOffer", TOKENS[0])
    streamed = raw_get(proxy.base, "/export/data/buyOffer", Authorization=f"Bearer {TOKENS[0]}", Accept="text/csv")
    assert streamed.status == 200
    assert streamed.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert streamed.headers["Content-Disposition"].startswith('attachment; filename="buyOffer-')
    assert streamed.headers["X-Content-Type-Options"] == "nosniff"
    assert streamed.headers["Transfer-Encoding"] == "chunked"
    assert streamed.body == as_file.body
    everything = raw_get(proxy.base, "/export/data", Authorization=TOKENS[0], Accept="text/csv")
    assert everything.status == 200 and csv_header(everything.body)[0] == "topic"


def test_rows_are_ordered_by_record_timestamp_across_partitions(export_broker: TansuBroker, tmp_path: typing.Any) -> None:
    topic = f"profit-{uuid.uuid4().hex[:8]}"
    export_broker.create_topics([topic], partitions=3)
    # Written partition by partition, so neither write order nor partition order is time order.
    stamps = {partition: [BASE_TIME_MS + 10 * i + partition for i in range(20)] for partition in (2, 0, 1)}
    for partition, times in stamps.items():
        messages = [{"merchant_id": MERCHANTS[0], "profit": float(stamp - BASE_TIME_MS), "timestamp": iso(stamp)}
                    for stamp in times]
        produce(export_broker.bootstrap_servers, topic, messages, [partition] * len(times), times)
    service = ExportService({"bootstrap.servers": export_broker.bootstrap_servers},
                            VisibilityPolicy({topic: default_topic_rules()["profit"]}),
                            DataFolder(str(tmp_path), 3600, 1024 ** 3), read_ahead_bytes=3 * 4 * 200)
    result = asyncio.run(service.export_to_file(topic, MERCHANTS[0]))
    with open(tmp_path / result.filename, encoding="utf-8") as handle:
        rows = csv_rows(handle.read())
    assert [float(row["profit"]) for row in rows] == sorted(float(stamp - BASE_TIME_MS)
                                                            for times in stamps.values() for stamp in times)


def test_records_that_are_not_json_objects_are_skipped(export_broker: TansuBroker, tmp_path: typing.Any) -> None:
    topic = f"updates-{uuid.uuid4().hex[:8]}"
    export_broker.create_topics([topic], partitions=1)
    values: list[typing.Any] = [{"note": "first"}, b"not json", b"[1, 2]", b"\xff\xfe", {"note": "last"}]
    produce(export_broker.bootstrap_servers, topic, values, [0] * 5, [BASE_TIME_MS + i for i in range(5)])
    service = ExportService({"bootstrap.servers": export_broker.bootstrap_servers},
                            VisibilityPolicy({topic: TopicExportConfig(policy="public")}),
                            DataFolder(str(tmp_path), 3600, 1024 ** 3))
    result = asyncio.run(service.export_to_file(topic, MERCHANTS[0]))
    assert (result.rows, result.skipped_records) == (2, 3)
    assert (tmp_path / result.filename).read_bytes() == b"note\r\nfirst\r\nlast\r\n"


@pytest.mark.parametrize("query, indexes", [
    (f"?from={iso(BASE_TIME_MS + 3000)}&to={iso(BASE_TIME_MS + 12000)}", [3, 6, 9, 12]),
    (f"?from={BASE_TIME_MS + 3000}&to={BASE_TIME_MS + 12000}", [3, 6, 9, 12]),
    (f"?from={BASE_TIME_MS + 20001}", [21, 24, 27]),
    ("?to=2018-03-16T10:00:06Z", [0, 3, 6]),
    ("?to=2018-03-16T10:00:06", [0, 3, 6]),
    ("?limit=2", [24, 27]),
    (f"?limit=3&to={BASE_TIME_MS + 12000}", [6, 9, 12]),
    ("?limit=0", []),
    ("?from=2030-01-01T00:00:00Z", []),
])
def test_from_to_and_limit_select_rows_by_record_timestamp(proxy: Proxy, market: dict, query: str,
                                                           indexes: list[int]) -> None:
    answer = export(proxy, "/export/data/buyOffer" + query, TOKENS[0])
    assert answer.status == 200
    assert [row["offer_id"] for row in csv_rows(answer.body)] == [str(index) for index in indexes]


@pytest.mark.parametrize("one_record_per_batch", [False, True])
def test_limit_gives_exactly_the_most_recent_visible_rows(export_broker: TansuBroker, tmp_path: typing.Any,
                                                          one_record_per_batch: bool) -> None:
    topic = f"buyOffer-{uuid.uuid4().hex[:8]}"
    export_broker.create_topics([topic], partitions=3)
    count = 400
    # The merchant owns one sale in seven, so the last N records hold fewer than N of its rows.
    owners = [MERCHANTS[0] if i % 7 == 3 else MERCHANTS[1] for i in range(count)]
    messages = [{"offer_id": i, "merchant_id": owner, "timestamp": iso(BASE_TIME_MS + i)} for i, owner in enumerate(owners)]
    # Multi-record batches make Tansu report a too-small high watermark; single ones do not.
    produce(export_broker.bootstrap_servers, topic, messages, [i % 3 for i in range(count)],
            [BASE_TIME_MS + i for i in range(count)], one_record_per_batch)
    service = ExportService({"bootstrap.servers": export_broker.bootstrap_servers},
                            VisibilityPolicy({topic: default_topic_rules()["buyOffer"]}),
                            DataFolder(str(tmp_path), 3600, 1024 ** 3))
    own = [str(i) for i, owner in enumerate(owners) if owner == MERCHANTS[0]]

    async def exports() -> list[list[str]]:
        results = []
        for limit, to_ms in [(1, None), (10, None), (len(own), None), (len(own) + 5, None), (4, BASE_TIME_MS + 200)]:
            result = await service.export_to_file(topic, MERCHANTS[0], limit=limit, to_ms=to_ms)
            with open(tmp_path / result.filename, encoding="utf-8") as handle:
                results.append([row["offer_id"] for row in csv_rows(handle.read())])
        return results

    by_limit = asyncio.run(exports())
    assert by_limit[:4] == [own[-1:], own[-10:], own, own]
    assert by_limit[4] == [i for i in own if int(i) <= 200][-4:]


# --- Errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["?from=yesterday", "?to=2018-13-45", "?limit=-1", "?limit=ten", "?limit=1.5",
                                   f"?from={BASE_TIME_MS + 1}&to={BASE_TIME_MS}", "?from=12345678901234567890"])
def test_invalid_query_values_answer_400(proxy: Proxy, query: str) -> None:
    answer = get(proxy.base + "/export/data/buyOffer" + query, TOKENS[0])
    assert answer.status == 400
    assert answer.json()["error"]


@pytest.mark.parametrize("authorization", [None, "", "Token", "Token    ", "Bearer "])
def test_missing_or_blank_token_answers_401(proxy: Proxy, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    answer = raw_get(proxy.base, "/export/data/buyOffer", **headers)
    assert answer.status == 401
    assert "token" in answer.json()["error"].lower()


def test_topic_neither_configured_nor_in_kafka_answers_404(proxy: Proxy) -> None:
    for path in ("/export/data/noSuchTopic", "/export/data/bad%20name", "/export/data/a%2Fb"):
        answer = get(proxy.base + path, TOKENS[0])
        assert answer.status == 404, path
        assert answer.json()["error"]
    streamed = get(proxy.base + "/export/data/noSuchTopic", TOKENS[0], Accept="text/csv")
    assert streamed.status == 404 and streamed.json()["error"]


def test_topic_without_export_rules_answers_403(proxy: Proxy, market: dict) -> None:
    answer = get(proxy.base + "/export/data/producer", TOKENS[0])
    assert answer.status == 403
    assert "producer" in answer.json()["error"]


def test_exportable_topic_not_yet_in_kafka_exports_the_header_only(proxy: Proxy) -> None:
    answer = export(proxy, "/export/data/revenuePerHour", TOKENS[0])
    assert answer.status == 200
    assert answer.body == b"merchant_id,revenue,timestamp\r\n"
    assert list(pandas.read_csv(io.BytesIO(answer.body), parse_dates=["timestamp"]).columns) == \
           ["merchant_id", "revenue", "timestamp"]


def test_kafka_unreachable_answers_503(server_thread: ServerThread, tmp_path: typing.Any) -> None:
    unreachable = start_proxy(server_thread, f"127.0.0.1:{free_port()}", str(tmp_path), kafka_timeout=1.0)
    answer = get(unreachable.base + "/export/data/buyOffer", TOKENS[0])
    assert answer.status == 503
    assert "Kafka" in answer.json()["error"]
    assert export_files(str(tmp_path)) == []


def test_trailing_and_doubled_slashes_are_tolerated(proxy: Proxy, market: dict) -> None:
    for path in ("/export/data/buyOffer/", "//export//data//buyOffer//", "/export/data/", "/export//data"):
        answer = raw_get(proxy.base, path, Authorization=TOKENS[0])
        assert answer.status == 200, path
        url = answer.json()["url"]
        assert raw_get(proxy.base, "//" + url).status == 200


# --- Concurrency, cancellation, failure ------------------------------------------------------------

@pytest.fixture(scope="module")
def bulk_topic(export_broker: TansuBroker) -> str:
    """A public topic large enough that exporting it takes a while (about 5 MB of CSV)."""
    topic = f"bulk-{uuid.uuid4().hex[:8]}"
    export_broker.create_topics([topic], partitions=4)
    count = 30000
    messages = [{"offer_id": i, "merchant_id": MERCHANTS[i % 3], "price": 10 + i % 100 / 4, "note": "x" * 80,
                 "timestamp": iso(BASE_TIME_MS + i)} for i in range(count)]
    produce(export_broker.bootstrap_servers, topic, messages, [i % 4 for i in range(count)],
            [BASE_TIME_MS + i for i in range(count)])
    return topic


def open_stalled_download(base: str, path: str) -> socket.socket:
    """Ask for a streamed export and never read it: the export stays running, held by back-pressure."""
    host, port = base.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Token {TOKENS[0]}\r\n"
                   "Accept: text/csv\r\n\r\n".encode())
    return client


def test_too_many_exports_answer_429_until_one_ends(server_thread: ServerThread, export_broker: TansuBroker,
                                                    bulk_topic: str, tmp_path: typing.Any) -> None:
    limited = start_proxy(server_thread, export_broker.bootstrap_servers, str(tmp_path),
                          {bulk_topic: TopicExportConfig(policy="public")}, max_concurrent=2)
    stalled = [open_stalled_download(limited.base, f"/export/data/{bulk_topic}") for _ in range(2)]
    try:
        wait_until(lambda: limited.service.running == 2, message="two running exports")
        started = time.monotonic()
        answer = get(limited.base + f"/export/data/{bulk_topic}", TOKENS[1])
        # Answered at once although two exports are busy: they do not hold up the IOLoop.
        assert time.monotonic() - started < 1.0
        assert answer.status == 429
        assert int(answer.headers["Retry-After"]) > 0
        assert answer.json()["error"]
    finally:
        for client in stalled:
            client.close()
    # Clients that went away stop their exports and free their slots.
    wait_until(lambda: limited.service.running == 0, message="the abandoned exports to stop")
    assert get(limited.base + f"/export/data/{bulk_topic}?limit=5", TOKENS[1]).status == 200


def temporary_files(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".part")]


def test_client_leaving_a_file_export_leaves_no_file(server_thread: ServerThread, export_broker: TansuBroker,
                                                     bulk_topic: str, tmp_path: typing.Any) -> None:
    proxy = start_proxy(server_thread, export_broker.bootstrap_servers, str(tmp_path),
                        {bulk_topic: TopicExportConfig(policy="public")})
    host, port = proxy.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(f"GET /export/data/{bulk_topic} HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKENS[0]}\r\n\r\n".encode())
        wait_until(lambda: temporary_files(str(tmp_path)), interval=0.002, message="the export to start")
    wait_until(lambda: proxy.service.running == 0, message="the export to stop")
    assert export_files(str(tmp_path)) == []


def test_shutdown_cancels_running_exports_and_removes_their_files(export_broker: TansuBroker, bulk_topic: str,
                                                                  tmp_path: typing.Any) -> None:
    service = ExportService({"bootstrap.servers": export_broker.bootstrap_servers},
                            VisibilityPolicy({bulk_topic: TopicExportConfig(policy="public")}),
                            DataFolder(str(tmp_path), 3600, 1024 ** 3))

    async def shutdown_during_export() -> None:
        running = asyncio.ensure_future(service.export_to_file(bulk_topic, MERCHANTS[0]))
        while not temporary_files(str(tmp_path)):
            assert not running.done(), "the export ended before it could be cancelled"
            await asyncio.sleep(0.002)
        await service.cancel_all()
        with pytest.raises(ExportCancelled) as cancelled:
            await running
        assert cancelled.value.status == 503
        with pytest.raises(ExportCancelled):
            await service.export_to_file(bulk_topic, MERCHANTS[0])

    asyncio.run(shutdown_during_export())
    assert export_files(str(tmp_path)) == []


def test_failed_export_leaves_no_file(tmp_path: typing.Any) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with TansuBroker() as doomed:
        doomed.create_topics(["buyOffer"], partitions=2)
        count = 60000
        produce(doomed.bootstrap_servers, "buyOffer",
                [{"offer_id": i, "merchant_id": MERCHANTS[0], "note": "y" * 100} for i in range(count)],
                [i % 2 for i in range(count)], [BASE_TIME_MS + i for i in range(count)])
        service = ExportService({"bootstrap.servers": doomed.bootstrap_servers}, VisibilityPolicy(default_topic_rules()),
                                DataFolder(str(data_dir), 3600, 1024 ** 3), kafka_timeout=2.0)

        async def broker_dies_during_export() -> None:
            running = asyncio.ensure_future(service.export_to_file("buyOffer", MERCHANTS[0]))
            while not temporary_files(str(data_dir)):
                assert not running.done(), "the export ended before the broker died"
                await asyncio.sleep(0.002)
            assert doomed.process is not None
            doomed.process.kill()
            with pytest.raises(ExportKafkaUnavailable):
                await running

        asyncio.run(broker_dies_during_export())
    assert export_files(str(data_dir)) == []


def test_streamed_export_that_fails_midway_does_not_look_complete(server_thread: ServerThread,
                                                                 tmp_path: typing.Any) -> None:
    with TansuBroker() as doomed:
        doomed.create_topics(["buyOffer"], partitions=2)
        count = 60000
        produce(doomed.bootstrap_servers, "buyOffer",
                [{"offer_id": i, "merchant_id": MERCHANTS[0], "note": "y" * 100} for i in range(count)],
                [i % 2 for i in range(count)], [BASE_TIME_MS + i for i in range(count)])
        proxy = start_proxy(server_thread, doomed.bootstrap_servers, str(tmp_path), kafka_timeout=1.0)
        client = open_stalled_download(proxy.base, "/export/data/buyOffer")
        with client:
            client.settimeout(20)
            received = client.recv(4096)
            assert received.startswith(b"HTTP/1.1 200 ")
            assert doomed.process is not None
            doomed.process.kill()
            while chunk := client.recv(65536):
                received += chunk
    assert b"Transfer-Encoding: chunked" in received
    # Chunked transfer without its final empty chunk: every HTTP client reports the download as cut.
    assert not received.endswith(b"0\r\n\r\n")
    assert received.count(b"\n") < count


# --- The data files ---------------------------------------------------------------------------------

def test_data_file_is_a_csv_attachment_with_range_and_etag(proxy: Proxy, market: dict) -> None:
    url = get(proxy.base + "/export/data/buyOffer", TOKENS[0]).json()["url"]
    name = url.removeprefix("data/")
    assert name.startswith("buyOffer-") and len(name.split("-")[-1]) == len("0123456789abcdef0123456789abcdef.csv")
    whole = get(f"{proxy.base}/{url}")
    assert whole.status == 200
    assert whole.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert whole.headers["Content-Disposition"] == f'attachment; filename="{name}"'
    assert whole.headers["X-Content-Type-Options"] == "nosniff"
    assert whole.headers["Access-Control-Allow-Origin"] == "*"
    part = get(f"{proxy.base}/{url}", Range="bytes=0-9")
    assert part.status == 206 and part.body == whole.body[:10]
    unchanged = get(f"{proxy.base}/{url}", If_None_Match=whole.headers["ETag"])
    assert unchanged.status == 304


def test_export_file_names_are_unguessable(proxy: Proxy, market: dict) -> None:
    names = {get(proxy.base + "/export/data/profit", TOKENS[0]).json()["url"] for _ in range(3)}
    assert len(names) == 3


@pytest.mark.parametrize("path", [
    "/data/../config.yaml", "/data/..%2Fconfig.yaml", "/data/%2e%2e/%2e%2e/etc/passwd", "/data/%2e%2e%2fsetup.py",
    "/data//etc/passwd", "/data/%2Fetc%2Fpasswd", "/data/..\\config.yaml", "/data/.gitkeep",
    "/data/.tmp-0123456789abcdef0123456789abcdef.csv.part", "/data/",
    "/data/buyOffer-20180316T100000Z-0123456789abcdef0123456789abcdef.csv",
])
def test_path_traversal_and_missing_files_get_404(proxy: Proxy, path: str) -> None:
    # A temporary file that really exists must not be served either.
    partial = os.path.join(proxy.data_dir, ".tmp-0123456789abcdef0123456789abcdef.csv.part")
    with open(partial, "w") as handle:
        handle.write("half a file")
    try:
        answer = raw_get(proxy.base, path)
    finally:
        os.remove(partial)
    assert answer.status == 404
    assert answer.json() == {"error": answer.json()["error"]}


def test_http_answers_carry_cors_headers_and_answer_preflight(proxy: Proxy, server_thread: ServerThread,
                                                              market: dict, tmp_path: typing.Any) -> None:
    for path in ("/data/x.csv", "/export/data/buyOffer"):
        preflight = raw_get(proxy.base, path, method="OPTIONS", Origin="https://ui.example",
                            Access_Control_Request_Method="GET", Access_Control_Request_Headers="Authorization")
        assert preflight.status == 204, path
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert get(proxy.base + "/export/data/buyOffer").headers["Access-Control-Allow-Origin"] == "*"
    strict = start_proxy(server_thread, "127.0.0.1:1", str(tmp_path), cors_origins=["https://ui.example"])
    for path in ("/data/x.csv", "/export/data/buyOffer"):
        preflight = raw_get(strict.base, path, method="OPTIONS", Origin="https://ui.example")
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://ui.example", path
        assert preflight.headers["Vary"] == "Origin"
    allowed = get(strict.base + "/data/x.csv", Origin="https://ui.example")
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    foreign = get(strict.base + "/export/data", Origin="https://evil.example")
    assert foreign.status == 401 and "Access-Control-Allow-Origin" not in foreign.headers


def test_exports_are_counted_in_metrics(proxy: Proxy, market: dict) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = value("proxy_export_requests_total", topic="buyOffer", outcome="ok")
    before_rows = value("proxy_export_rows_total", topic="buyOffer")
    before_401 = value("proxy_export_requests_total", topic="buyOffer", outcome="unauthorized")
    before_404 = value("proxy_export_requests_total", topic="other", outcome="unknown_topic")
    assert get(proxy.base + "/export/data/buyOffer", TOKENS[0]).status == 200
    assert get(proxy.base + "/export/data/buyOffer").status == 401
    assert get(proxy.base + "/export/data/someoneElsesTopic", TOKENS[0]).status == 404
    assert value("proxy_export_requests_total", topic="buyOffer", outcome="ok") == before_ok + 1
    assert value("proxy_export_rows_total", topic="buyOffer") == before_rows + 10
    assert value("proxy_export_requests_total", topic="buyOffer", outcome="unauthorized") == before_401 + 1
    assert value("proxy_export_requests_total", topic="other", outcome="unknown_topic") == before_404 + 1
    assert value("proxy_export_duration_seconds_count", topic="buyOffer") >= 1
    assert value("proxy_data_folder_bytes") > 0


# --- The data folder manages itself -------------------------------------------------------------------

def make_export_file(folder: str, label: str, age_seconds: float, size: int, now: float) -> str:
    name = f"{label}-20180316T100000Z-{hashlib.md5(label.encode()).hexdigest()}.csv"
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(b"x" * size)
    os.utime(path, (now - age_seconds, now - age_seconds))
    return name


def test_retention_deletes_only_expired_export_files(tmp_path: typing.Any) -> None:
    now = time.time()
    folder = DataFolder(str(tmp_path), retention_seconds=3600, max_bytes=1024 ** 3)
    expired = make_export_file(str(tmp_path), "old", 3601, 10, now)
    fresh = make_export_file(str(tmp_path), "new", 3599, 10, now)
    (tmp_path / "notes.txt").write_text("not an export")
    (tmp_path / ".gitkeep").write_text("")
    assert folder.sweep(now) == [expired]
    assert sorted(os.listdir(tmp_path)) == sorted([fresh, "notes.txt", ".gitkeep"])
    assert REGISTRY.get_sample_value("proxy_data_folder_bytes") == 10


def test_size_cap_deletes_the_oldest_files_first(tmp_path: typing.Any) -> None:
    now = time.time()
    folder = DataFolder(str(tmp_path), retention_seconds=3600, max_bytes=250)
    names = [make_export_file(str(tmp_path), f"file{age}", age, 100, now) for age in (50, 40, 30, 20, 10)]
    assert folder.sweep(now) == names[:3]
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])
    assert folder.total_bytes() == 200


def test_size_cap_keeps_the_newest_file_even_if_it_alone_is_too_big(tmp_path: typing.Any) -> None:
    now = time.time()
    folder = DataFolder(str(tmp_path), retention_seconds=3600, max_bytes=50)
    older = make_export_file(str(tmp_path), "older", 20, 100, now)
    newest = make_export_file(str(tmp_path), "newest", 10, 100, now)
    assert folder.sweep(now) == [older]
    assert os.listdir(tmp_path) == [newest]


def test_start_up_removes_crash_leftovers_and_sweeps_periodically(server_thread: ServerThread,
                                                                   tmp_path: typing.Any) -> None:
    now = time.time()
    leftover = tmp_path / ".tmp-0123456789abcdef0123456789abcdef.csv.part"
    leftover.write_text("half")
    kept = make_export_file(str(tmp_path), "kept", 0, 5, now)
    folder = DataFolder(str(tmp_path), retention_seconds=1.0, max_bytes=1024 ** 3)

    async def start() -> None:
        folder.start(interval=0.05)

    server_thread.run(start())
    try:
        assert not leftover.exists()
        assert os.path.exists(tmp_path / kept)
        # Expires one second after it was written; the periodic sweep must notice without help.
        wait_until(lambda: not os.path.exists(tmp_path / kept), timeout=5, message="the sweeper to delete it")
    finally:
        server_thread.loop.call_soon_threadsafe(folder.stop)
