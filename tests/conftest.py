"""Shared fixtures: one real Tansu broker per test session, proxies started per test."""

from __future__ import annotations

import typing

import pytest

from proxy.demo.broker import TansuBroker
from proxy.testing import ProxyProcess, SockJSClient


@pytest.fixture(scope="session")
def broker() -> typing.Iterator[TansuBroker]:
    """A real Kafka-protocol broker on a free loopback port; tests use their own topics."""
    with TansuBroker() as running:
        yield running


@pytest.fixture
def start_proxy(tmp_path: typing.Any) -> typing.Iterator[typing.Callable[..., ProxyProcess]]:
    """start_proxy(bootstrap, config, ...) runs the proxy process; all are stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(bootstrap: str | None, config: dict[str, typing.Any], wait_healthy: bool = True,
              **kwargs: typing.Any) -> ProxyProcess:
        proxy = ProxyProcess(bootstrap, config, tmp_path, **kwargs)
        started.append(proxy)
        return proxy.start(wait_healthy=wait_healthy)

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def sockjs() -> typing.Iterator[typing.Callable[..., SockJSClient]]:
    """sockjs(base, transport) opens a SockJS client; all are closed at teardown."""
    clients: list[SockJSClient] = []

    def connect(base: str, transport: str = "websocket") -> SockJSClient:
        client = SockJSClient(base, transport)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
