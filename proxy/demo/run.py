"""--demo: an embedded Tansu broker, a simulated market and the proxy, in one process tree."""

from __future__ import annotations

import asyncio
import logging
import sys

from proxy.config import Config
from proxy.demo.broker import BrokerError, TansuBroker
from proxy.demo.simulator import MarketSimulator, Merchant

log = logging.getLogger(__name__)

DEMO_RATE = 50.0
# The embedded broker holds every fetch for the whole wait (Apache Kafka does not): a short one
# keeps the page live; 25 ms costs the idle broker about a tenth of a core.
DEMO_FETCH_WAIT_MS = 25
DEMO_MERCHANTS = 3


def run_demo(config: Config) -> int:
    """Run everything until Ctrl-C or SIGTERM, then stop it all (nothing is left running)."""
    from proxy.app import ProxyServer

    broker = TansuBroker()
    try:
        broker.start()
    except BrokerError as exc:
        print(f"kafka-reverse-proxy: cannot start the demo broker: {exc}", file=sys.stderr)
        return 1
    merchants = [Merchant.generate(f"merchant-{n}") for n in range(1, DEMO_MERCHANTS + 1)]
    simulator = MarketSimulator(broker.bootstrap_servers, merchants=merchants, rate=DEMO_RATE)
    config.kafka_url = broker.bootstrap_servers
    config.kafka.setdefault("fetch.wait.max.ms", DEMO_FETCH_WAIT_MS)
    # A demo is for this machine only.
    config.listen.address = "127.0.0.1"
    server = ProxyServer(config)
    try:
        simulator.start()

        async def serve() -> None:
            await server.start()
            shown = config.listen.address
            lines = [
                "",
                f"Kafka reverse proxy demo: http://{shown}:{server.port}/",
                f"  SockJS live stream:  http://{shown}:{server.port}{config.live.prefix}",
                f"  embedded broker:     {broker.bootstrap_servers} (in memory)",
                f"  market simulator:    {DEMO_RATE:.0f} records/s",
                "  demo merchants (try: curl -H 'Authorization: Token <token>' "
                f"http://{shown}:{server.port}/export/data/buyOffer):",
                *(f"    {m.name}: token {m.token}  id {m.merchant_id}" for m in merchants),
                "Press Ctrl-C to stop.",
                "",
            ]
            print("\n".join(lines), flush=True)
            await server.wait_for_signal()

        asyncio.run(serve())
    finally:
        simulator.stop()
        broker.stop()
    return 0
