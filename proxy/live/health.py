"""The ingest's health: connected, loaded, stalled; written by the consumer thread, read by the IOLoop."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("proxy.live.ingest")

# The consumer loop has not turned for this long (IOLoop stuck, thread wedged): call it stalled.
STALL_SECONDS = 30.0


class IngestHealth:
    """State of the Kafka connection and the consumer loop, for /health and the systemd watchdog."""

    def __init__(self) -> None:
        self.connected = False
        self.history_loaded = False
        self.last_error: str | None = None
        self.last_turn = time.monotonic()

    def turned(self) -> None:
        """The consumer loop went round once (waiting for Kafka counts: it is progress, not a stall)."""
        self.last_turn = time.monotonic()

    def reached(self) -> None:
        """Kafka answered."""
        if not self.connected or self.last_error:
            log.info("connected to Kafka")
        self.connected = True
        self.last_error = None

    def unreachable(self, reason: str, all_brokers_down: bool = True) -> None:
        """Kafka could not be reached (all_brokers_down: none at all, not one connection failing)."""
        if all_brokers_down:
            self.connected = False
        self.last_error = reason

    def state(self) -> tuple[str, str | None]:
        """("ok" | "starting" | "degraded", reason)."""
        if self.last_error and not self.connected:
            return "degraded", f"Kafka unreachable: {self.last_error}"
        if not self.history_loaded:
            return "starting", "loading the initial history from Kafka"
        if self.last_error:
            return "degraded", f"Kafka unreachable: {self.last_error}"
        if self.stalled():
            return "degraded", f"consumer stalled: no progress for over {STALL_SECONDS:.0f}s"
        return "ok", None

    def stalled(self) -> bool:
        return time.monotonic() - self.last_turn > STALL_SECONDS
