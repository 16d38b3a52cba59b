"""A/B of the history burst: two proxies on one broker, bursts alternated, CPU per connect of each.

A burst's CPU per connect moves with the machine's phase by +-15 % within minutes, more than the
connect-path changes being judged; two proxies measured in alternation share the phase. Each side
is a code tree (PYTHONPATH: a checkout or `git archive <commit> proxy | tar -x -C <folder>`) and/or
listener settings.

    PYTHONPATH=. python bench/ab_burst.py --a-path /tmp/base --b-path . [--a-listen '{"defer_accept": 0}']
        [--pairs 6] [--clients 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.history_burst import FILL_RECORDS, burst  # noqa: E402
from bench.processes import ProducerProcess, ProxyProcess  # noqa: E402
from proxy.config import default_topics  # noqa: E402
from proxy.demo.broker import TansuBroker  # noqa: E402

LAUNCHER = "import sys; sys.path.insert(0, {path!r}); from proxy.cli import main; sys.exit(main(sys.argv[1:]))"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-path", default=".")
    parser.add_argument("--b-path", default=".")
    parser.add_argument("--a-listen", default="{}")
    parser.add_argument("--b-listen", default="{}")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = parser.parse_args()
    topics = default_topics()
    sides = {"A": (os.path.abspath(args.a_path), json.loads(args.a_listen)),
             "B": (os.path.abspath(args.b_path), json.loads(args.b_listen))}
    figures: dict[str, list[dict]] = {"A": [], "B": []}
    with TansuBroker() as broker:
        broker.create_topics(topics, partitions=4)
        ProducerProcess(broker.bootstrap_servers, None, rate=0, topics=topics, count=FILL_RECORDS).start().result(
            120, stop=False)
        proxies = {name: ProxyProcess(broker.bootstrap_servers, config={"listen": listen}, fetch_wait_ms=None)
                   for name, (path, listen) in sides.items()}
        for name, proxy in proxies.items():  # python -m proxy would import the package from its cwd
            assert proxy.args[1:3] == ["-m", "proxy"]
            proxy.args = [sys.executable, "-c", LAUNCHER.format(path=sides[name][0]), *proxy.args[3:]]
        try:
            for proxy in proxies.values():
                proxy.start()
            for name, proxy in proxies.items():  # warm-up
                burst(proxy.port, args.clients, 4, len(topics), {"proxy": proxy.pid}, f"warm-{name}")
            for pair in range(args.pairs):
                order = "AB" if pair % 2 == 0 else "BA"
                for name in order:
                    proxy = proxies[name]
                    figures[name].append(burst(proxy.port, args.clients, 4, len(topics), {"proxy": proxy.pid},
                                               f"{name}{pair}"))
        finally:
            for proxy in proxies.values():
                proxy.stop()
    if args.json:
        print(json.dumps({name: {"path": sides[name][0], "listen": sides[name][1],
                                 "cpu_ms_per_connect": [r["server_cpu_ms_per_client"] for r in rounds],
                                 "p99_ms": [r["p99_ms"] for r in rounds], "complete": [r["complete"] for r in rounds]}
                          for name, rounds in figures.items()}))
        return
    for name, rounds in figures.items():
        cpu = [r["server_cpu_ms_per_client"] for r in rounds]
        p99 = [r["p99_ms"] for r in rounds]
        print(f"{name} ({sides[name][0]}, listen {sides[name][1]}): CPU per connect median "
              f"{statistics.median(cpu):.3f} ms (each {', '.join(f'{c:.2f}' for c in cpu)}); "
              f"p99 median {statistics.median(p99):.0f} ms (each {', '.join(f'{p:.0f}' for p in p99)})")


if __name__ == "__main__":
    main()
