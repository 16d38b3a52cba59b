"""Command line: kafka-reverse-proxy [--kafka-url ...] [--port ...] [--config ...] [--demo]."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import typing

from proxy.config import ConfigError, kafka_properties, load_config

USAGE_HINT = ("no Kafka to read from: pass --kafka-url HOST:PORT, set KAFKA_URL or kafka_url in "
              "config.yaml, or try --demo")


def parse_args(argv: typing.Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kafka-reverse-proxy",
        description="Streams Price Wars Kafka topics to SockJS clients and exports merchant CSVs.")
    parser.add_argument("--kafka-url", help="bootstrap servers HOST:PORT[,HOST:PORT...] (env KAFKA_URL)")
    parser.add_argument("--port", type=int, help="HTTP port (default from config, 8001)")
    parser.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    parser.add_argument("--data-dir", help="folder for CSV exports (default from config: data)")
    parser.add_argument("--demo", action="store_true",
                        help="run an embedded broker and a simulated market as well")
    return parser.parse_args(argv)


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, required=args.config != "config.yaml")
    except ConfigError as exc:
        print(f"kafka-reverse-proxy: bad configuration: {exc}", file=sys.stderr)
        return 2
    config.kafka_url = args.kafka_url or os.environ.get("KAFKA_URL") or config.kafka_url
    if args.port is not None:
        config.listen.port = args.port
    if args.data_dir:
        config.data_dir = args.data_dir
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.demo:
        from proxy.demo import run_demo
        return run_demo(config)
    if not config.kafka_url:
        print(f"kafka-reverse-proxy: {USAGE_HINT}", file=sys.stderr)
        return 2
    try:
        kafka_properties(config)  # a ${VAR} that is not set is a configuration error
    except ConfigError as exc:
        print(f"kafka-reverse-proxy: bad configuration: {args.config}: {exc}", file=sys.stderr)
        return 2
    return run(config)


def run(config: typing.Any) -> int:
    """Run the proxy until SIGTERM/SIGINT; 0 on a clean stop, 2 on bad Kafka settings."""
    from proxy.app import ProxyServer

    server = ProxyServer(config)
    try:
        asyncio.run(server.run_until_signalled())
    except (ConfigError, ValueError) as exc:
        print(f"kafka-reverse-proxy: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Binding the port or creating the data folder.
        print(f"kafka-reverse-proxy: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
