"""A Price Wars market simulator that writes realistic marketplace traffic into Kafka.

Merchants buy stock from the producer, add offers and change prices; consumers buy; the
stream-analytics jobs publish per-merchant statistics. Every record has the shape and field order
of the real marketplace (see /work/shared/pricewars-data.md), and the market state stays
consistent: sales refer to existing offers at their current price and stock goes down.

Used by the proxy's ``--demo`` mode (in a background thread), the integration tests and the
benchmarks. Run it alone with ``python -m proxy.demo.simulator --kafka-url HOST:PORT``.
"""

from __future__ import annotations

import argparse
import base64
import logging
import random
import secrets
import string
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ujson
from confluent_kafka import KafkaError, Message, Producer

from proxy.policy import merchant_id_for

logger = logging.getLogger(__name__)

TOKEN_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
TOKEN_LENGTH = 64

MARKET_TOPICS = ("addOffer", "updateOffer", "buyOffer", "marketSituation", "producer")
STATISTICS_TOPICS = (
    "profit", "profitPerMinute", "profitPerHour",
    "revenuePerMinute", "revenuePerHour", "cumulativeRevenue",
    "cumulativeAmountBasedMarketshare", "cumulativeRevenueBasedMarketshare",
    "inventory_level",
)
PRODUCED_TOPICS = MARKET_TOPICS + STATISTICS_TOPICS

# Chances of the failures the real marketplace logs, per request.
ADD_OFFER_451 = 0.03
ADD_OFFER_500 = 0.02
UPDATE_OFFER_404 = 0.03
UPDATE_OFFER_500 = 0.015
BUY_OFFER_410 = 0.04
BUY_OFFER_409 = 0.04

MAX_OFFERS_PER_PRODUCT = 2  # per merchant; beyond this merchants reprice instead of adding
CONSUMER_COUNT = 10
FLUSH_TIMEOUT = 5.0


def iso_timestamp(now: float | None = None, milliseconds: bool = True) -> str:
    """UTC wall-clock time as the marketplace writes it: ``2018-03-16T10:01:01.673Z``."""
    millis = int((time.time() if now is None else now) * 1000)
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000))
    return f"{seconds}.{millis % 1000:03d}Z" if milliseconds else f"{seconds}Z"


@dataclass(frozen=True)
class Merchant:
    """A simulated merchant: the secret token it authenticates with and its public id."""

    token: str = field(repr=False)  # a credential: keep it out of logs and reprs
    merchant_id: str = field(init=False)
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "merchant_id", merchant_id_for(self.token))

    @classmethod
    def generate(cls, name: str = "") -> Merchant:
        """A merchant with a fresh random token from the ``secrets`` module."""
        token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))
        return cls(token=token, name=name)


@dataclass(frozen=True)
class Product:
    """A product merchants buy from the producer; unit_price is what quality 2 costs them."""

    product_id: int
    unit_price: float


DEFAULT_PRODUCTS: tuple[Product, ...] = (
    Product(1, 15.0), Product(2, 12.0), Product(3, 25.0), Product(4, 8.0),
)


class _Ledger:
    """One merchant's sales and costs, cumulative and per simulated minute and hour."""

    def __init__(self) -> None:
        self.revenue = 0.0
        self.cost = 0.0
        self.units = 0
        self.minute_revenue = 0.0
        self.minute_cost = 0.0
        self.hour: deque[tuple[float, float]] = deque(maxlen=60)  # (revenue, profit) per minute

    def close_minute(self) -> tuple[float, float]:
        """End the current simulated minute; returns its (revenue, profit)."""
        minute = (self.minute_revenue, self.minute_revenue - self.minute_cost)
        self.hour.append(minute)
        self.minute_revenue = self.minute_cost = 0.0
        return minute


class _Market:
    """The marketplace's state (offers, stock, sales) and the requests merchants and consumers make."""

    def __init__(self, rng: random.Random, merchants: Sequence[Merchant], products: Sequence[Product],
                 actions_per_minute: int) -> None:
        self.rng = rng
        self.merchants = list(merchants)
        self.products = list(products)
        self.actions_per_minute = actions_per_minute
        # Consumer tokens never leave the simulator, so the seeded generator may make them.
        self.consumer_ids = [
            merchant_id_for("".join(rng.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH)))
            for _ in range(CONSUMER_COUNT)
        ]
        self.offers: dict[int, dict[str, Any]] = {}
        self.sold_out: deque[dict[str, Any]] = deque(maxlen=20)
        self.next_offer_id = 1
        self.actions = 0
        self.ledgers = {merchant.merchant_id: _Ledger() for merchant in self.merchants}

    def step(self) -> list[tuple[str, dict[str, Any]]]:
        """One market action, followed by the statistics when a simulated minute ends."""
        self.actions += 1
        records = self._act()
        if self.actions % self.actions_per_minute == 0:
            records.extend(self._statistics())
        return records

    def _act(self) -> list[tuple[str, dict[str, Any]]]:
        roll = self.rng.random()
        merchant = self.rng.choice(self.merchants)
        if not self.offers or roll < 0.2:
            return self._add_offer(merchant)
        if roll < 0.5:
            return self._update_offer(merchant)
        return self._buy_offer()

    @staticmethod
    def _unit_cost(product: Product, quality: int) -> float:
        # Quality 1 is the best and costs the most.
        return round(product.unit_price * (1.2 - 0.1 * quality), 2)

    def _own_offers(self, merchant_id: str, product_id: int | None = None) -> list[dict[str, Any]]:
        return [offer for offer in self.offers.values() if offer["merchant_id"] == merchant_id
                and (product_id is None or offer["product_id"] == product_id)]

    def _add_offer(self, merchant: Merchant) -> list[tuple[str, dict[str, Any]]]:
        rng = self.rng
        product = rng.choice(self.products)
        if len(self._own_offers(merchant.merchant_id, product.product_id)) >= MAX_OFFERS_PER_PRODUCT:
            return self._update_offer(merchant)
        quality = rng.randint(1, 4)
        unit_price = self._unit_cost(product, quality)
        quantity = rng.randint(5, 30)
        billing_amount = round(unit_price * quantity, 2)
        ledger = self.ledgers[merchant.merchant_id]
        ledger.cost += billing_amount
        ledger.minute_cost += billing_amount
        records: list[tuple[str, dict[str, Any]]] = [("producer", {
            "merchant_id": merchant.merchant_id,
            "product_id": product.product_id,
            "quantity": quantity,
            "unit_price": unit_price,
            "billing_amount": billing_amount,
            "timestamp": iso_timestamp(),
        })]
        offer = {
            "offer_id": self.next_offer_id,
            "uid": product.product_id * 10 + quality,
            "product_id": product.product_id,
            "quality": quality,
            "merchant_id": merchant.merchant_id,
            "amount": quantity,
            "price": round(unit_price * rng.uniform(1.3, 2.2), 2),
            "shipping_time_standard": rng.randint(3, 7),
            "shipping_time_prime": rng.randint(1, 2),
            "prime": rng.random() < 0.5,
        }
        signature = base64.b64encode(rng.randbytes(48)).decode("ascii")
        failure = rng.random()
        if failure < ADD_OFFER_451 + ADD_OFFER_500:
            # A rejected offer never got an id; the merchant has still paid the producer.
            request = {key: value for key, value in offer.items() if key != "offer_id"}
            http_code = 451 if failure < ADD_OFFER_451 else 500
            records.append(("addOffer", {**request, "signature": signature, "http_code": http_code,
                                         "timestamp": iso_timestamp()}))
            return records
        self.next_offer_id += 1
        self.offers[offer["offer_id"]] = offer
        records.append(("addOffer", {**offer, "signature": signature, "http_code": 200,
                                     "timestamp": iso_timestamp()}))
        records.append(self._market_situation("addOffer", merchant, product.product_id))
        return records

    def _update_offer(self, merchant: Merchant) -> list[tuple[str, dict[str, Any]]]:
        rng = self.rng
        own = self._own_offers(merchant.merchant_id)
        if not own:
            return self._add_offer(merchant)
        failure = rng.random()
        gone = [offer for offer in self.sold_out if offer["merchant_id"] == merchant.merchant_id]
        if failure < UPDATE_OFFER_404 and gone:
            # Repricing an offer that sold out in the meantime.
            stale = rng.choice(gone)
            return [("updateOffer", {**stale, "price": self._new_price(stale), "http_code": 404,
                                     "timestamp": iso_timestamp()})]
        offer = rng.choice(own)
        price = self._new_price(offer)
        if failure < UPDATE_OFFER_404 + UPDATE_OFFER_500:
            return [("updateOffer", {**offer, "price": price, "http_code": 500,
                                     "timestamp": iso_timestamp()})]
        offer["price"] = price
        return [
            ("updateOffer", {**offer, "http_code": 200, "timestamp": iso_timestamp()}),
            self._market_situation("updateOffer", merchant, offer["product_id"]),
        ]

    def _new_price(self, offer: dict[str, Any]) -> float:
        """Undercut the cheapest competitor most of the time, never below cost plus 5%."""
        rng = self.rng
        product = next(p for p in self.products if p.product_id == offer["product_id"])
        floor = self._unit_cost(product, offer["quality"]) * 1.05
        competitors = [other["price"] for other in self.offers.values()
                       if other["product_id"] == offer["product_id"]
                       and other["merchant_id"] != offer["merchant_id"]]
        if competitors and rng.random() < 0.6:
            price = min(competitors) - rng.uniform(0.01, 0.5)
        else:
            price = offer["price"] * rng.uniform(0.9, 1.1)
        return round(max(price, floor), 2)

    def _buy_offer(self) -> list[tuple[str, dict[str, Any]]]:
        rng = self.rng
        consumer_id = rng.choice(self.consumer_ids)
        amount = rng.choice((1, 1, 1, 2, 3))
        failure = rng.random()
        if failure < BUY_OFFER_410 and self.sold_out:
            # The consumer saw the offer before its last unit was sold.
            stale = rng.choice(self.sold_out)
            return [("buyOffer", self._sale(stale, stale["price"], amount, 0, consumer_id, 410))]
        product_id = rng.choice(sorted({offer["product_id"] for offer in self.offers.values()}))
        candidates = [offer for offer in self.offers.values() if offer["product_id"] == product_id]
        if rng.random() < 0.6:
            offer = min(candidates, key=lambda candidate: candidate["price"])
        else:
            offer = rng.choice(candidates)
        amount = min(amount, offer["amount"])
        if failure < BUY_OFFER_410 + BUY_OFFER_409:
            # The consumer asked for a price the merchant has changed since.
            stale_price = round(offer["price"] * rng.uniform(0.85, 0.98), 2)
            return [("buyOffer", self._sale(offer, stale_price, amount, offer["amount"], consumer_id, 409))]
        offer["amount"] -= amount
        ledger = self.ledgers[offer["merchant_id"]]
        revenue = offer["price"] * amount
        ledger.revenue += revenue
        ledger.minute_revenue += revenue
        ledger.units += amount
        if offer["amount"] == 0:
            del self.offers[offer["offer_id"]]
            self.sold_out.append(dict(offer))
        return [("buyOffer", self._sale(offer, offer["price"], amount, offer["amount"], consumer_id, 200))]

    @staticmethod
    def _sale(offer: dict[str, Any], price: float, amount: int, left_in_stock: int, consumer_id: str,
              http_code: int) -> dict[str, Any]:
        return {
            "offer_id": offer["offer_id"],
            "uid": offer["uid"],
            "product_id": offer["product_id"],
            "quality": offer["quality"],
            "price": price,
            "amount": amount,
            "merchant_id": offer["merchant_id"],
            "left_in_stock": left_in_stock,
            "consumer_id": consumer_id,
            "http_code": http_code,
            "timestamp": iso_timestamp(),
        }

    def _market_situation(self, trigger: str, merchant: Merchant, product_id: int) -> tuple[str, dict[str, Any]]:
        return ("marketSituation", {
            "timestamp": iso_timestamp(),
            "trigger": trigger,
            "merchant_id": merchant.merchant_id,
            "product_id": product_id,
            "offers": [dict(offer) for offer in self.offers.values() if offer["product_id"] == product_id],
        })

    def _statistics(self) -> list[tuple[str, dict[str, Any]]]:
        """What the stream-analytics jobs publish per merchant at the end of a simulated minute."""
        total_units = sum(ledger.units for ledger in self.ledgers.values())
        total_revenue = sum(ledger.revenue for ledger in self.ledgers.values())
        records: list[tuple[str, dict[str, Any]]] = []
        for merchant in self.merchants:
            merchant_id = merchant.merchant_id
            ledger = self.ledgers[merchant_id]
            minute_revenue, minute_profit = ledger.close_minute()
            hour_revenue = sum(revenue for revenue, _ in ledger.hour)
            hour_profit = sum(profit for _, profit in ledger.hour)
            level = sum(offer["amount"] for offer in self._own_offers(merchant_id))
            # The inventory job writes whole seconds now and then; consumers must parse both.
            level_timestamp = iso_timestamp(milliseconds=self.rng.random() >= 0.25)
            now = iso_timestamp()
            records.extend([
                ("profit", {"merchant_id": merchant_id, "profit": round(ledger.revenue - ledger.cost, 2),
                            "timestamp": now}),
                ("profitPerMinute", {"merchant_id": merchant_id, "profit": round(minute_profit, 2),
                                     "timestamp": now}),
                ("profitPerHour", {"merchant_id": merchant_id, "profit": round(hour_profit, 2),
                                   "timestamp": now}),
                ("revenuePerMinute", {"merchant_id": merchant_id, "revenue": round(minute_revenue, 2),
                                      "timestamp": now}),
                ("revenuePerHour", {"merchant_id": merchant_id, "revenue": round(hour_revenue, 2),
                                    "timestamp": now}),
                ("cumulativeRevenue", {"merchant_id": merchant_id, "revenue": round(ledger.revenue, 2),
                                       "timestamp": now}),
                ("cumulativeAmountBasedMarketshare", {
                    "merchant_id": merchant_id,
                    "marketshare": round(ledger.units / total_units, 4) if total_units else 0.0,
                    "timestamp": now}),
                ("cumulativeRevenueBasedMarketshare", {
                    "merchant_id": merchant_id,
                    "marketshare": round(ledger.revenue / total_revenue, 4) if total_revenue else 0.0,
                    "timestamp": now}),
                ("inventory_level", {"merchant_id": merchant_id, "level": level,
                                     "timestamp": level_timestamp}),
            ])
        return records


class _TokenBucket:
    """Paces records to a rate, allowing bursts of 100 ms so a slow loop turn is caught up."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 10)
        self.tokens = 1.0
        self.last = time.monotonic()

    def take(self) -> float:
        """Take a token and return 0, or return how many seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class MarketSimulator:
    """Writes simulated Price Wars marketplace traffic into Kafka, in the foreground or a thread."""

    def __init__(
        self,
        bootstrap_servers: str,
        merchants: Sequence[Merchant] | None = None,
        products: Sequence[Product] = DEFAULT_PRODUCTS,
        rate: float | None = 50.0,
        duration: float | None = None,
        max_events: int | None = None,
        seed: int | str | None = None,
        producer_config: Mapping[str, Any] | None = None,
        actions_per_minute: int = 100,
    ) -> None:
        if rate is not None and rate < 0:
            raise ValueError(f"rate must be positive, 0 or None, not {rate}")
        if actions_per_minute < 1:
            raise ValueError("actions_per_minute must be at least 1")
        self.bootstrap_servers = bootstrap_servers
        self.merchants = list(merchants) if merchants is not None else [
            Merchant.generate(f"merchant-{number}") for number in range(1, 4)]
        if not self.merchants or not products:
            raise ValueError("a market needs at least one merchant and one product")
        self.products = list(products)
        self.rate = rate or None
        self.duration = duration
        self.max_events = max_events
        self.seed = seed
        self.producer_config = dict(producer_config or {})
        self.actions_per_minute = actions_per_minute
        self.produced: Counter[str] = Counter()
        self.delivery_errors = 0
        self.error: BaseException | None = None  # why the background thread ended, if it failed
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """An endless stream of (topic, record) from a fresh market; the same seed gives the same
        stream (timestamps aside). Touches neither Kafka nor the simulator's state."""
        market = _Market(random.Random(self.seed), self.merchants, self.products, self.actions_per_minute)
        while True:
            yield from market.step()

    def run(self) -> int:
        """Produce until duration, max_events or stop(); returns the number of records produced."""
        producer = self._create_producer()
        bucket = _TokenBucket(self.rate) if self.rate else None
        deadline = time.monotonic() + self.duration if self.duration is not None else None
        events = self.events()
        count = 0
        try:
            while not self._stop_requested.is_set():
                if self.max_events is not None and count >= self.max_events:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if bucket is not None:
                    wait = bucket.take()
                    if wait > 0:
                        producer.poll(0)
                        if deadline is not None:
                            wait = min(wait, max(0.0, deadline - time.monotonic()))
                        # Waiting on the event rather than sleeping keeps stop() prompt.
                        self._stop_requested.wait(wait)
                        continue
                topic, record = next(events)
                if not self._produce(producer, topic, ujson.dumps(record, escape_forward_slashes=False)):
                    break
                count += 1
                self.produced[topic] += 1
                if count % 100 == 0:
                    producer.poll(0)
        finally:
            undelivered = producer.flush(FLUSH_TIMEOUT)
            if undelivered:
                logger.warning("%d records were still undelivered after %.0f s", undelivered, FLUSH_TIMEOUT)
            if self.delivery_errors:
                logger.warning("%d records failed delivery", self.delivery_errors)
        logger.info("market simulator produced %d records", count)
        return count

    def start(self) -> None:
        """Run in a daemon thread until duration, max_events or stop()."""
        if self.running:
            raise RuntimeError("the market simulator is already running")
        self._stop_requested.clear()
        self.error = None
        self._thread = threading.Thread(target=self._run_in_thread, name="market-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the run to end, and wait for it to flush its producer and finish."""
        self._stop_requested.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("market simulator did not stop within %.1f s", timeout)

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a background thread has nobody else to tell
            self.error = exc
            logger.exception("market simulator failed")

    def _create_producer(self) -> Producer:
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": "pricewars-market-simulator",
            # Small batches a few milliseconds apart: high throughput without visible delay.
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 200000,
            # Only failures come back, so a fast run does not pay a callback per record.
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
        }
        config.update(self.producer_config)
        return Producer(config, logger=logger)

    def _produce(self, producer: Producer, topic: str, payload: str) -> bool:
        """Hand one record to the producer, waiting while its queue is full; False once stopped."""
        while True:
            try:
                producer.produce(topic, payload)
                return True
            except BufferError:
                # Serving delivery reports is what drains the local queue.
                producer.poll(0.1)
                if self._stop_requested.is_set():
                    return False

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            return
        self.delivery_errors += 1
        if self.delivery_errors == 1:
            logger.warning("delivery to %s failed: %s", message.topic(), error)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: simulate a market into a Kafka cluster."""
    parser = argparse.ArgumentParser(
        prog="python -m proxy.demo.simulator",
        description="Write simulated Price Wars marketplace traffic into Kafka.")
    parser.add_argument("--kafka-url", required=True, help="bootstrap servers, HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="records per second (default 50; 0 = as fast as possible)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--max-events", type=int, help="stop after this many records")
    parser.add_argument("--merchants", type=int, default=3, help="number of merchants (default 3)")
    parser.add_argument("--seed", type=int, help="seed for a reproducible market")
    args = parser.parse_args(argv)
    if args.merchants < 1:
        parser.error("--merchants must be at least 1")
    if args.rate < 0:
        parser.error("--rate must not be negative")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    merchants = [Merchant.generate(f"merchant-{number}") for number in range(1, args.merchants + 1)]
    simulator = MarketSimulator(args.kafka_url, merchants=merchants, rate=args.rate or None,
                                duration=args.duration, max_events=args.max_events, seed=args.seed)
    for merchant in merchants:
        print(f"{merchant.name}: token {merchant.token} merchant_id {merchant.merchant_id}", flush=True)
    try:
        count = simulator.run()
    except KeyboardInterrupt:
        count = sum(simulator.produced.values())
    print(f"produced {count} records", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
