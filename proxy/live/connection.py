"""One browser on the live stream: its subscription, and in token mode who it is."""

from __future__ import annotations

import typing

import ujson
from sockjs.tornado import SockJSConnection

from proxy import metrics
from proxy.live import wire
from proxy.live.access import EVERYTHING, UNAUTHORIZED_CLOSE, Viewer

if typing.TYPE_CHECKING:
    from proxy.live.fanout import LiveHub


class LiveConnection(SockJSConnection):
    """One browser: gets every topic's history on open, then the topics it subscribed to.

    In token mode (live.access: token) it first has to say who it is: {"type": "auth", "token": T}.
    """

    hub: LiveHub  # set on the subclass made by LiveHub.router()

    def on_open(self, info: typing.Any) -> None:
        self.topics: frozenset[str] | None = None  # None: every topic
        self.transport = self.session.transport_name
        self.viewer: Viewer | None = None
        self._token: str | None = None
        self._auth_timer: typing.Any = None
        metrics.labelled(metrics.LIVE_SESSIONS, self.transport).inc()
        if self.hub.access.requires_token:
            self._auth_timer = self.session.server.io_loop.call_later(self.hub.access.auth_timeout,
                                                                      self._auth_timed_out)
        else:
            self.viewer = EVERYTHING
            self.hub.add(self)

    def on_message(self, message: str) -> None:
        try:
            request = ujson.loads(message)
        except (ValueError, TypeError):
            return self.send_error("message is not valid JSON")
        kind = request.get("type") if isinstance(request, dict) else None
        if kind == "auth":
            return self._authenticate(request.get("token"))
        if kind != "subscribe":
            return self.send_error('expected {"type": "subscribe", "topics": [...]}')
        if self.viewer is None:
            return self.send_error('authenticate first: send {"type": "auth", "token": "<token>"}')
        topics = request.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            return self.send_error('"topics" must be a list of topic names')
        unknown = [t for t in topics if t not in self.hub.history]
        if unknown:
            return self.send_error(f"unknown topics: {', '.join(unknown)}")
        hidden = [t for t in topics if t not in self.hub.visible_topics(self.viewer)]
        if hidden:
            return self.send_error(f"topics not visible to this merchant: {', '.join(hidden)}")
        self.hub.subscribe(self, [t for t in self.hub.topics if t in topics])

    def _authenticate(self, token: typing.Any) -> None:
        access = self.hub.access
        if not access.requires_token:
            return self.send_error("live access is open: no authentication needed")
        if self.viewer is not None:
            # The same token again is harmless; another one would change whose view this is.
            if isinstance(token, str) and self._token is not None and access.same_token(token, self._token):
                return self._send([self.viewer.auth_answer()])
            return self._refuse("already authenticated with another token")
        viewer = access.viewer_for(token)
        if viewer is None:
            return self._refuse('"token" must be a non-empty string')
        self._cancel_auth_timer()
        self.viewer, self._token = viewer, token
        self._send([viewer.auth_answer()])
        self.hub.add(self)

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.viewer is None:
            self._refuse(f"no auth message within {self.hub.access.auth_timeout:g} s")

    def _refuse(self, error: str) -> None:
        self._cancel_auth_timer()
        self.send_error(error)
        self.session.close_after_flush(*UNAUTHORIZED_CLOSE)

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None:
            self.session.server.io_loop.remove_timeout(self._auth_timer)
            self._auth_timer = None

    def on_close(self) -> None:
        transport = getattr(self, "transport", None)  # None: closed before it was opened
        if transport is not None:
            metrics.labelled(metrics.LIVE_SESSIONS, transport).dec()
            self._cancel_auth_timer()
        self.hub.remove(self)

    def send_error(self, error: str) -> None:
        self._send([{"type": "error", "error": error}])

    def _send(self, bodies: list[dict[str, typing.Any]]) -> None:
        self.session.enqueue([wire.control_message(body) for body in bodies])
