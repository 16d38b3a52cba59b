"""The health states /health reports, as a function of what the consumer thread has seen."""

from __future__ import annotations

import time

from proxy.live.health import STALL_SECONDS, IngestHealth


def health_in_state(*, connected: bool, loaded: bool, error: str | None, idle: float = 0.0) -> IngestHealth:
    health = IngestHealth()
    health.connected, health.history_loaded, health.last_error = connected, loaded, error
    health.last_turn = time.monotonic() - idle
    return health


def test_starting_until_the_history_is_loaded():
    assert health_in_state(connected=True, loaded=False, error=None).state()[0] == "starting"


def test_degraded_while_kafka_is_unreachable_even_before_the_history():
    state, reason = health_in_state(connected=False, loaded=False, error="_TRANSPORT: refused").state()
    assert state == "degraded" and "Kafka unreachable" in reason


def test_degraded_when_the_consumer_loop_stops_turning():
    state, reason = health_in_state(connected=True, loaded=True, error=None, idle=STALL_SECONDS + 1).state()
    assert state == "degraded" and "stalled" in reason


def test_ok_once_connected_loaded_and_turning():
    assert health_in_state(connected=True, loaded=True, error=None, idle=1).state() == ("ok", None)


def test_unreachable_then_reached_is_ok_again():
    health = health_in_state(connected=True, loaded=True, error=None)
    health.unreachable("_ALL_BROKERS_DOWN: down", all_brokers_down=True)
    assert health.state()[0] == "degraded"
    health.reached()
    assert health.state() == ("ok", None)
