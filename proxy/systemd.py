"""systemd integration: readiness, stopping, status and watchdog pings (the sd_notify protocol).

The protocol is one datagram of newline-separated KEY=VALUE assignments sent to the AF_UNIX
socket named by $NOTIFY_SOCKET; a leading "@" names a socket in the abstract namespace. Written
with the stdlib because it is this small. Outside systemd ($NOTIFY_SOCKET unset) every call is a
no-op, and a failed send is only logged: notifying systemd must never take the proxy down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import tornado.ioloop

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Tells systemd (Type=notify) when the proxy is ready or stopping, and pings its watchdog."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._address = notify_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._pings: tornado.ioloop.PeriodicCallback | None = None
        self._withholding = False

    @property
    def enabled(self) -> bool:
        """True when started by systemd with a notify socket."""
        return self._address is not None

    def ready(self) -> bool:
        """Startup is finished: systemd starts the units ordered after this one."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        # A newline would start a new assignment.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Still alive: resets systemd's WatchdogSec timer."""
        return self.notify("WATCHDOG=1")

    def notify(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments in one datagram; False if not under systemd or it failed."""
        if self._address is None:
            return False
        try:
            if self._socket is None:
                # Non-blocking: a full queue on systemd's side must not stall the IOLoop.
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            log.debug("could not notify systemd (%s): %s", ", ".join(assignments), exc)
            return False
        return True

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec), None when there is no watchdog."""
        return self._watchdog_interval if self.enabled else None

    def start_watchdog(self, is_healthy: Callable[[], bool]) -> None:
        """Ping the watchdog on the current IOLoop while is_healthy() is true.

        Pings are withheld, not faked, while is_healthy() is false or the IOLoop is stuck, so
        systemd restarts a wedged proxy. No-op without a watchdog.
        """
        interval = self.watchdog_interval()
        if interval is None or self._pings is not None:
            return
        self._pings = tornado.ioloop.PeriodicCallback(lambda: self._ping_if(is_healthy), interval * 1000.0)
        self._pings.start()
        self._ping_if(is_healthy)

    def stop_watchdog(self) -> None:
        """Stop pinging (systemd does not watch a unit that has said STOPPING=1)."""
        if self._pings is not None:
            self._pings.stop()
            self._pings = None

    def close(self) -> None:
        """Stop pinging and close the socket."""
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _ping_if(self, is_healthy: Callable[[], bool]) -> None:
        try:
            healthy = bool(is_healthy())
        except Exception:
            log.exception("watchdog health check failed; counting it as unhealthy")
            healthy = False
        if not healthy:
            if not self._withholding:
                log.warning("not healthy: withholding systemd watchdog pings, systemd will restart the proxy")
            self._withholding = True
            return
        if self._withholding:
            log.info("healthy again: resuming systemd watchdog pings")
        self._withholding = False
        self.watchdog()


def notify_address(value: str) -> str | bytes | None:
    """The socket address for $NOTIFY_SOCKET: a path, or bytes with a NUL for "@abstract"."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        # systemd itself only hands out "/path" and "@name" (newer ones also "vsock:...").
        log.debug("ignoring unsupported NOTIFY_SOCKET %r", value)
    return None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        # Set by systemd for the main PID; a child that inherited the variable must not ping.
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000.0
