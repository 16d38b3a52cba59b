"""Merchant exports through the whole proxy process, fed by the market simulator."""

from __future__ import annotations

import io
import urllib.request

import pandas

from proxy.demo.broker import TansuBroker
from proxy.demo.simulator import MarketSimulator, Merchant
from proxy.testing import produce, unique_topics


def test_merchant_sdk_download_gets_only_its_own_sales_and_every_market_situation(start_proxy, tmp_path):
    merchants = [Merchant.generate(f"m{n}") for n in range(3)]
    with TansuBroker() as broker:
        simulator = MarketSimulator(broker.bootstrap_servers, merchants=merchants, rate=None, max_events=1500, seed=7)
        simulator.run()
        proxy = start_proxy(broker.bootstrap_servers, {})  # the shipped defaults: 13 topics, default rules
        me = merchants[0]
        headers = {"Authorization": "Token " + me.token}

        status, body, _ = proxy.get("/export/data/buyOffer", headers)
        assert status == 200 and body["url"].startswith("data/buyOffer-") and body["url"].endswith(".csv")
        sales = pandas.read_csv(proxy.base + "/" + body["url"], parse_dates=["timestamp"])

        status, body, _ = proxy.get("/export/data/marketSituation", {"Authorization": "Bearer " + me.token})
        situations = pandas.read_csv(proxy.base + "/" + body["url"], parse_dates=["timestamp"])

        streamed = urllib.request.urlopen(urllib.request.Request(
            proxy.base + "/export/data/buyOffer", headers=dict(headers, Accept="text/csv")), timeout=30)
        streamed_sales = pandas.read_csv(io.StringIO(streamed.read().decode()))

    assert simulator.produced["buyOffer"] > 0
    assert len(sales) > 0 and set(sales["merchant_id"]) == {me.merchant_id}
    assert {"offer_id", "timestamp", "amount", "price", "http_code"} <= set(sales.columns)
    assert len(streamed_sales) == len(sales)
    assert {"timestamp", "product_id", "offer_id", "merchant_id", "price", "quality"} <= set(situations.columns)
    # Market situations are public: competitors' offers are in them.
    assert len(set(situations["merchant_id"])) > 1


def test_export_errors_through_the_proxy_are_json(broker, start_proxy):
    (unlisted,) = unique_topics("producer")
    produce(broker.bootstrap_servers, unlisted, [{"merchant_id": "m", "quantity": 1}])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": ["addOffer"]})
    token = {"Authorization": "Token " + "x" * 64}

    status, body, headers = proxy.get("/export/data/buyOffer")
    assert status == 401 and "token" in body["error"].lower()
    assert headers["Content-Type"].startswith("application/json")
    assert proxy.get(f"/export/data/{unlisted}", token)[0] == 403
    assert proxy.get("/export/data/no-such-topic-anywhere", token)[0] == 404
    status, body, _ = proxy.get("/export/data/buyOffer?limit=-1", token)
    assert status == 400 and "limit" in body["error"]
    assert proxy.get("/data/..%2Fconfig.yaml")[0] == 404
    metrics_text = proxy.get("/metrics")[1]
    # Topics outside the config are labelled "other": a URL must not mint new metric series.
    assert 'proxy_export_requests_total{outcome="not_exportable",topic="other"} 1.0' in metrics_text
    assert 'proxy_export_requests_total{outcome="bad_request",topic="buyOffer"} 1.0' in metrics_text
