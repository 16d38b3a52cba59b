"""The health states /health reports, as a function of what the consumer thread has seen."""

from __future__ import annotations

import time

from proxy.config import Config
from proxy.ingest import STALL_SECONDS, KafkaIngest


def ingest_in_state(*, connected: bool, loaded: bool, error: str | None, idle: float = 0.0) -> KafkaIngest:
    ingest = KafkaIngest(Config(kafka_url="127.0.0.1:9"), lambda h: None, lambda b: None, lambda *a: None)
    ingest.connected, ingest.history_loaded, ingest.last_error = connected, loaded, error
    ingest._last_turn = time.monotonic() - idle
    return ingest


def test_starting_until_the_history_is_loaded():
    assert ingest_in_state(connected=True, loaded=False, error=None).health()[0] == "starting"


def test_degraded_while_kafka_is_unreachable_even_before_the_history():
    state, reason = ingest_in_state(connected=False, loaded=False, error="_TRANSPORT: refused").health()
    assert state == "degraded" and "Kafka unreachable" in reason


def test_degraded_when_the_consumer_loop_stops_turning():
    state, reason = ingest_in_state(connected=True, loaded=True, error=None, idle=STALL_SECONDS + 1).health()
    assert state == "degraded" and "stalled" in reason


def test_ok_once_connected_loaded_and_turning():
    assert ingest_in_state(connected=True, loaded=True, error=None, idle=1).health() == ("ok", None)
