"""Command line: kafka-reverse-proxy [--kafka-url ...] [--port ...] [--config ...] [--demo]."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import resource
import sys
import typing

from proxy.config import ConfigError, kafka_settings, load_config

log = logging.getLogger("proxy")
DEFAULT_CONFIG = "config.yaml"
# glibc's mallopt() parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

USAGE_HINT = ("no Kafka to read from: pass --kafka-url HOST:PORT, set KAFKA_URL or kafka_url in "
              "config.yaml, or try --demo")


def parse_args(argv: typing.Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kafka-reverse-proxy",
        description="Streams Price Wars Kafka topics to SockJS clients and exports merchant CSVs.")
    parser.add_argument("--kafka-url", help="bootstrap servers HOST:PORT[,HOST:PORT...] (env KAFKA_URL)")
    parser.add_argument("--port", type=int, help="HTTP port (default from config, 8001)")
    parser.add_argument("--config", help="config file (default: ./config.yaml if present, else the shipped defaults)")
    parser.add_argument("--data-dir", help="folder for CSV exports (default from config: data)")
    parser.add_argument("--demo", action="store_true",
                        help="run an embedded broker and a simulated market as well")
    return parser.parse_args(argv)


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config_path = args.config or DEFAULT_CONFIG
    try:
        config = load_config(config_path, required=args.config is not None)
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
        from proxy.demo.run import run_demo
        log_config_source(config, config_path)
        tune_process()
        return run_demo(config)
    if not config.kafka_url:
        print(f"kafka-reverse-proxy: {USAGE_HINT}", file=sys.stderr)
        return 2
    try:
        kafka_settings(config)  # a ${VAR} that is not set is a configuration error
    except ConfigError as exc:
        print(f"kafka-reverse-proxy: bad configuration: {config_path}: {exc}", file=sys.stderr)
        return 2
    log_config_source(config, config_path)
    tune_process()
    return run(config)


def log_config_source(config: typing.Any, looked_at: str) -> None:
    """Say which config file is in use: a missing one silently giving defaults confuses operators."""
    if config.source == "<defaults>":
        log.info("no config file (%s not found): using the shipped defaults", os.path.abspath(looked_at))
    else:
        log.info("config file: %s", os.path.abspath(config.source))


def tune_process() -> None:
    """Process-wide tuning, once at start-up.

    glibc allocator: let it reuse freed frame buffers instead of handing them back to the
    kernel. By default glibc maps every block over 128 KiB afresh and returns free heap tops to
    the kernel, so each large SockJS frame is page-faulted in (zero-filled) again on every write:
    200,000 faults a second at 1M messages/s, more CPU than the fan-out itself. A proxy that falls
    behind for a moment coalesces bigger frames, faults more, falls further behind and ends up
    closing every session as too slow. 16 MiB covers a full session queue (8 MiB by default); up
    to 64 MiB of free heap is kept. Nothing to do where the C library is not glibc.

    Open files: every client connection is a descriptor, and the soft limit is often 1,024 while
    the hard one is far higher (the systemd unit sets both to 65536 with LimitNOFILE). Raising the
    soft limit to the hard one needs no privilege; listen.max_connections is derived from it.
    """
    raise_open_files_limit()
    tune_garbage_collector()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 16 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)


# Allocations between young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections: a live stream allocates a future, a frame or a timer per
    session write, so CPython's default (a young collection every 700 allocations) ran hundreds of
    collections a second at 2,000 sessions, and each promotion made the full collections, which
    pause the IOLoop for every session's objects, come sooner. What exists at start-up (modules,
    configuration) lives as long as the process: frozen, no collection looks at it again.
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    gc.freeze()


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit; a refusal (a seccomp filter) only costs capacity."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return
    log.info("open files limit raised from %d to %d", soft, hard)


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
