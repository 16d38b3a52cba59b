"""A soak in small (issue 9): 200 SockJS sessions over websocket, xhr-streaming and xhr-polling, 15 s
of live traffic across the 13 shipped topics, then everyone leaves.

What does not depend on the machine's speed is asserted: every session gets every message, none
is closed, no server error, sessions and descriptors go back to the baseline. The timing figures
(latency, /health response time, RSS) are printed and attached as a test property; their targets
are `make soak`'s (bench/soak.py), not a timed test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing

import pytest
import websocket

from bench.processes import BENCH, ENV, LoadClients, ProducerProcess
from bench.soak import SoakPlan, judge, report, run_soak, sessions_open
from proxy.config import default_topics
from proxy.demo.broker import free_port, terminate
from proxy.testing import unique_topics

SESSIONS = 200
HISTORY_RECORDS = 300


@pytest.mark.timeout(240)
def test_two_hundred_sessions_on_three_transports_get_every_message_and_leave_nothing_behind(
        broker: typing.Any, start_proxy: typing.Callable[..., typing.Any], record_property: typing.Any) -> None:
    topics = unique_topics(*default_topics())
    suffix = topics[0][len(default_topics()[0]):]
    broker.create_topics(topics, partitions=4)
    # Some history first, so every session starts with 13 history messages that are not all empty.
    ProducerProcess(broker.bootstrap_servers, None, rate=0, topics=default_topics(), count=HISTORY_RECORDS,
                    topic_suffix=suffix).start().result(60, stop=False)
    # The test broker answers a fetch only after fetch.wait.max.ms: keep it short, as the bench does.
    proxy = start_proxy(broker.bootstrap_servers, {"topics": topics, "kafka": {"fetch.wait.max.ms": 10}})

    plan = SoakPlan.scaled(SESSIONS, duration=15.0, connect_rate=100.0)
    result = run_soak(proxy, broker.bootstrap_servers, plan, topic_suffix=suffix, broker_pid=broker.process.pid)
    report(result)
    record_property("soak", json.dumps({key: value for key, value in result.items() if key != "problems"}
                                       | {"targets": judge(result)}, default=str))

    assert result["producer_failed"] == 0 and result["produced"] > 0
    assert result["held"] == SESSIONS, "every session is open once the connects are done"
    assert result["all_histories"], "every session got its 13 history messages"
    assert result["closed"] == 0, f"sessions closed: {result['close_codes']}"
    assert result["sessions_complete"] == SESSIONS, (
        f"{SESSIONS - result['sessions_complete']} sessions missed messages: got {result['sessions_short']} "
        f"of {result['produced']}")
    assert result["delivered"] == result["expected"]
    assert result["errors"] == 0, "no HTTP error, refused or cut connection on the client side"
    assert result["health_ms"]["not_ok"] == 0, f"/health answered {result['health_ms']['statuses']}"
    assert not result["problems"], f"the proxy logged problems: {result['problems'][:5]}"
    assert result["back_to_baseline_seconds"] is not None, (
        f"after everyone left: {result['after']} (baseline {result['baseline']})")
    assert result["after"]["sessions"] == result["baseline"]["sessions"]
    assert result["after"]["fds"] <= result["baseline"]["fds"]


def test_load_clients_told_to_wait_for_go_connect_only_then(broker, start_proxy):
    """bench/history_burst.py's clients connect at once, on GO. Before that none may be connected:
    they were, as each load process started, and the 'burst' was four staggered groups of 50."""
    (topic,) = unique_topics("t")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    load = LoadClients(proxy.port, 20, histories=1, wait_for_go=True).start()
    try:
        watched_until = time.monotonic() + 1.0
        while time.monotonic() < watched_until:  # a second in which nothing may connect
            assert sessions_open(proxy) == 0
            time.sleep(0.05)  # pacing the probes of an invariant, not waiting for a condition
        load.send("GO")
        answer = json.loads(load.line(30))
        assert len(answer["history_ms"]) == 20 and answer["failed"] == 0
        # Each history's delivery (the kernel's receive time of the read that completed it) comes
        # after the connect began and no later than the client read it (clocks: realtime vs monotonic).
        assert len(answer["delivered_ms"]) == 20
        assert all(0 < delivered <= read + 5 for delivered, read in zip(answer["delivered_ms"], answer["history_ms"]))
        assert sessions_open(proxy) == 20
    finally:
        load.stop()


@pytest.mark.parametrize("lean", [False, True], ids=["tornado", "lean"])
def test_burst_ceiling_servers_answer_a_real_websocket_handshake_with_the_recorded_frames(tmp_path, lean):
    """bench/history_burst.py compares the proxy with servers that send the same recorded frames on
    connect. A ceiling is only one if it does that work: a valid upgrade (websocket-client checks
    Sec-WebSocket-Accept), "o", every frame, intact and in order."""
    frames = ['a["' + "x" * size + '"]' for size in (10, 200, 70_000)]  # 7-bit, 16-bit and 64-bit lengths
    recorded = tmp_path / "frames.json"
    recorded.write_text(json.dumps(frames))
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(BENCH, "broadcast_ceiling.py"), "--port", str(port),
                               "--replay", str(recorded), *(["--lean"] if lean else [])],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith("READY")
        connection = websocket.create_connection(f"ws://127.0.0.1:{port}/live/000/abcdefgh/websocket", timeout=10)
        try:
            assert [connection.recv() for _ in range(len(frames) + 1)] == ["o", *frames]
        finally:
            connection.close()
    finally:
        terminate(server, 10.0)


def test_machine_speed_times_the_reference_operation_on_this_thread():
    """make bench prints it before and after: it must time real work (more operations, more
    time in all) and report it per operation."""
    from bench.processes import machine_speed
    from bench.producer import realistic_values

    # The reference record is one the proxy forwards, so encoding it again is part of the operation.
    assert json.loads(realistic_values(1, shape="buyOffer")[0])["http_code"] == 200
    per_operation = machine_speed(repeats=3, operations=2000)
    assert 0.05 < per_operation < 1000


def test_connect_cost_times_real_fast_upgrades():
    """bench/connect_cost.py: connects that the fast upgrade accepts (it fails if one is declined)
    and read to the end of their histories; one CPU figure per round."""
    completed = subprocess.run([sys.executable, os.path.join(BENCH, "connect_cost.py"), "--connects", "5",
                                "--rounds", "2", "--json"], env=ENV, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(result["us_per_accept"]) == 2 and all(figure > 0 for figure in result["us_per_accept"])


def test_ab_burst_alternates_bursts_between_two_proxies():
    """bench/ab_burst.py: two proxies (here two listener settings) on one broker, a burst each in
    turn; every client of every burst gets its histories."""
    completed = subprocess.run([sys.executable, os.path.join(BENCH, "ab_burst.py"), "--a-listen", '{"defer_accept": 0}',
                                "--pairs", "1", "--clients", "8", "--json"], env=ENV, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["A"]["listen"] == {"defer_accept": 0} and result["B"]["listen"] == {}
    for side in result.values():
        assert side["complete"] == [8] and len(side["cpu_ms_per_connect"]) == 1


def test_burst_limit_names_the_machine_or_the_proxy_and_the_proxys_own_cpu():
    from bench.run import burst_bound

    result = {"passed": False, "clients": 200, "proxy_cpu_ms_per_client": 0.65, "cpu": {"proxy": 0.85, "clients": 0.98},
              "lean": {"p99_ms": 107.0, "server_cpu_ms_per_client": 0.27}}
    bound = burst_bound(result)
    assert bound.startswith("machine") and "200 x 0.65 ms = 130 ms" in bound and "over the target" in bound
    result["lean"]["p99_ms"], result["proxy_cpu_ms_per_client"] = 90.0, 0.45
    bound = burst_bound(result)
    assert bound.startswith("proxy's CPU per connect") and "= 90 ms" in bound and "within the target" in bound
    result["proxy_cpu_ms_per_client"] = 0.5000000000000004  # as the CPU meter's ticks give it
    assert "200 x 0.50 ms = 100 ms on one thread, at the target" in burst_bound(result)
    assert burst_bound(dict(result, passed=True)) is None
