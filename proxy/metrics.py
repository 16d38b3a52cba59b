"""Prometheus metrics of the proxy (official prometheus_client), served at GET /metrics."""

from __future__ import annotations

import functools
import typing

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# One registry for the process; tests read values through it.
REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES_CONSUMED = Counter(
    "proxy_messages_consumed_total", "Kafka records read, by topic", ["topic"], registry=REGISTRY)
MESSAGES_SKIPPED = Counter(
    "proxy_messages_skipped_total",
    "Kafka records not forwarded live, by topic and reason (proxy.records.REASONS)",
    ["topic", "reason"], registry=REGISTRY)
LIVE_SESSIONS = Gauge(
    "proxy_live_sessions", "Open SockJS sessions, by transport", ["transport"], registry=REGISTRY)
MESSAGES_DELIVERED = Counter(
    "proxy_messages_delivered_total", "Messages queued to SockJS sessions (live and history)",
    registry=REGISTRY)
SLOW_SESSIONS_DROPPED = Counter(
    "proxy_slow_sessions_dropped_total",
    "Sessions closed because they stayed too far behind (their own limit, or the total budget)",
    registry=REGISTRY)
FAST_UPGRADES = Counter(
    "proxy_websocket_fast_upgrades_total",
    "SockJS websocket upgrades accepted without Tornado's HTTP machinery (proxy.live.upgrade)",
    registry=REGISTRY)
LIVE_QUEUED_BYTES = Gauge(
    "proxy_live_queued_bytes", "Bytes queued or in flight to SockJS sessions, each shared chunk counted once",
    registry=REGISTRY)
LIVE_FLUSH_SECONDS = Histogram(
    "proxy_live_flush_seconds",
    "CPU seconds of live flush ticks (fan-out of the records since the last tick, then one write per ready session)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=REGISTRY)
INGEST_BACKPRESSURE_SECONDS = Counter(
    "proxy_ingest_backpressure_seconds_total",
    "Seconds the Kafka consumer waited because live sessions were too far behind", registry=REGISTRY)
EXPORT_REQUESTS = Counter(
    "proxy_export_requests_total", "Export requests, by topic and outcome", ["topic", "outcome"],
    registry=REGISTRY)
EXPORT_DURATION = Histogram(
    "proxy_export_duration_seconds", "Duration of export requests", ["topic"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
ROWS_EXPORTED = Counter(
    "proxy_export_rows_total", "CSV rows written by exports, by topic", ["topic"], registry=REGISTRY)
EXPORT_RECORDS_SKIPPED = Counter(
    "proxy_export_records_skipped_total", "Kafka records exports skipped, by topic and reason (proxy.records.REASONS)",
    ["topic", "reason"], registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "proxy_consumer_lag_messages", "Messages between the consumer position and the partition end",
    ["topic", "partition"], registry=REGISTRY)
HISTORY_SIZE = Gauge(
    "proxy_history_messages", "Messages in each topic's history buffer", ["topic"], registry=REGISTRY)
DATA_FOLDER_BYTES = Gauge(
    "proxy_data_folder_bytes", "Bytes of export files in the data folder", registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "proxy_http_requests_total", "HTTP requests, by route and status", ["route", "status"],
    registry=REGISTRY)
OPEN_CONNECTIONS = Gauge(
    "proxy_open_connections", "Client connections open (HTTP, SockJS and websocket)", registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "proxy_connections_refused_total",
    "Connections answered 503 and closed at once: listen.max_connections reached, none idle for 1 s",
    registry=REGISTRY)
IDLE_CONNECTIONS_CLOSED = Counter(
    "proxy_idle_connections_closed_total",
    "Idle connections closed to make room for a new one, by reason (limit, descriptors)", ["reason"],
    registry=REGISTRY)
ACCEPT_PAUSES = Counter(
    "proxy_accept_pauses_total", "Times accepting paused: out of file descriptors, none idle for 1 s",
    registry=REGISTRY)


@functools.lru_cache(maxsize=4096)
def labelled(metric: typing.Any, *values: str) -> typing.Any:
    """metric.labels(*values), looked up once: labels() validates and locks on every call, and
    the hot paths (a connect, a request, a flush tick) would pay that each time. Bounded: label
    values here come from configuration and code (topics, routes, statuses, transports)."""
    return metric.labels(*values)
