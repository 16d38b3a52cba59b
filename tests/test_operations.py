"""Running the proxy as a service: shutdown, metrics, secrets, broker outages, bad settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from proxy.demo.broker import TansuBroker
from proxy.testing import REPO, SockJSClosed, produce, unique_topics, wait_until


def test_sigterm_closes_sessions_with_3000_and_exits_0_within_10_seconds(broker, start_proxy, sockjs):
    (topic,) = unique_topics("shutdown")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    clients = [sockjs(proxy.base, "websocket"), sockjs(proxy.base, "xhr_streaming")]
    for client in clients:
        client.receive(1)

    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    closes = []
    for client in clients:
        with pytest.raises(SockJSClosed) as closed:
            client.receive(1, timeout=10)
        closes.append(closed.value.args)
    exit_code = proxy.process.wait(10)
    elapsed = time.monotonic() - started

    assert closes == [(3000, "server shutting down")] * 2
    assert exit_code == 0
    assert elapsed < 10


def test_metrics_are_served_in_prometheus_format(broker, start_proxy, sockjs):
    (topic,) = unique_topics("metrics")
    broker.create_topics([topic])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})
    client = sockjs(proxy.base)
    client.receive(1)
    produce(broker.bootstrap_servers, topic, [{"n": 1}, b"junk", {"n": 2, "http_code": 500}])
    client.receive(1)

    status, text, headers = proxy.get("/metrics")

    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert f'proxy_messages_consumed_total{{topic="{topic}"}} 3.0' in text
    assert f'proxy_messages_skipped_total{{reason="invalid_json",topic="{topic}"}} 1.0' in text
    assert f'proxy_messages_skipped_total{{reason="failed_request",topic="{topic}"}} 1.0' in text
    assert 'proxy_live_sessions{transport="websocket"} 1.0' in text
    assert f'proxy_history_messages{{topic="{topic}"}} 1.0' in text
    for name in ("proxy_messages_delivered_total", "proxy_slow_sessions_dropped_total",
                 "proxy_export_requests_total", "proxy_export_duration_seconds", "proxy_export_rows_total",
                 "proxy_consumer_lag_messages", "proxy_data_folder_bytes", "proxy_http_requests_total"):
        assert f"# TYPE {name}" in text


def test_secrets_from_the_environment_never_appear_in_logs_or_answers(start_proxy):
    secret = "Sup3r-S3cret-Passw0rd-" + os.urandom(4).hex()
    with TansuBroker() as own_broker:
        proxy = start_proxy(own_broker.bootstrap_servers, {
            "topics": ["t"],
            "log_level": "DEBUG",
            "kafka": {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "PLAIN",
                      "sasl.username": "merchant", "sasl.password": "${PROXY_TEST_SASL_PASSWORD}"},
        }, wait_healthy=False, env={"PROXY_TEST_SASL_PASSWORD": secret})
        # The broker does not speak SASL: the proxy reports it is degraded, with a reason.
        wait_until(lambda: proxy.get("/health")[1].get("status") == "degraded", 30, message="degraded")
        answers = [str(proxy.get(path)) for path in ("/health", "/health?verbose=1", "/status", "/metrics")]
        proxy.stop()
    assert all(secret not in answer for answer in answers)
    assert secret not in proxy.log()


def test_a_secret_in_an_invalid_kafka_setting_is_not_echoed(tmp_path):
    secret = "Another-S3cret-" + os.urandom(4).hex()
    config = tmp_path / "config.yaml"
    config.write_text("kafka:\n  security.protocol: ${PROXY_TEST_SECRET}\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), "--kafka-url", "127.0.0.1:9",
                             "--data-dir", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PROXY_TEST_SECRET=secret))
    assert result.returncode == 2
    assert "security.protocol" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_clients_survive_a_broker_restart_and_get_messages_produced_after_it(start_proxy, sockjs):
    with TansuBroker() as own_broker:
        own_broker.create_topics(["sales"])
        produce(own_broker.bootstrap_servers, "sales", [{"before": i} for i in range(10)])
        proxy = start_proxy(own_broker.bootstrap_servers, {"topics": ["sales"]})
        client = sockjs(proxy.base)
        assert len(client.receive(1)[0]["messages"]) == 10

        own_broker.stop()
        wait_until(lambda: proxy.get("/health")[1]["status"] == "degraded", 30, message="degraded")
        # History is still served while the broker is away.
        assert len(sockjs(proxy.base).receive(1)[0]["messages"]) == 10

        own_broker.start()  # same port, empty: offsets are out of range now
        own_broker.create_topics(["sales"])
        produce(own_broker.bootstrap_servers, "sales", [{"after": i} for i in range(3)])

        messages = client.receive(3, timeout=40)
        assert [m["message"]["value"] for m in messages] == [{"after": i} for i in range(3)]
        wait_until(lambda: proxy.get("/health")[0] == 200, 30, message="healthy again")


@pytest.mark.parametrize("content, fragment", [
    ("listen:\n  port: eighty\n", "'listen.port' must be an integer"),
    ("topcs: [a]\n", "unknown key 'topcs'"),
    ("history_size: [1]\n", "'history_size' must be an integer"),
    ("topics: [a\n", "not valid YAML"),
    ("listen:\n  port: 8001\n  max_body_size: 1024\n  port: 8002\n", "key 'port' is given twice"),
])
def test_bad_config_exits_2_naming_the_key_and_file(tmp_path, content, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), "--kafka-url", "127.0.0.1:9",
                             "--data-dir", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert fragment in result.stderr and str(config) in result.stderr


def test_unreadable_config_and_missing_kafka_url_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_URL"}
    env["PYTHONPATH"] = REPO
    missing = subprocess.run([sys.executable, "-m", "proxy", "--config", str(tmp_path / "nope.yaml"),
                              "--data-dir", str(tmp_path / "data")],
                             cwd=REPO, capture_output=True, text=True, timeout=30, env=env)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr

    # No config.yaml in the working directory, no --kafka-url, no KAFKA_URL.
    no_url = subprocess.run([sys.executable, "-m", "proxy"], cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=30, env=env)
    assert no_url.returncode == 2
    assert no_url.stderr.count("\n") == 1 and "--kafka-url" in no_url.stderr


def test_an_unset_environment_variable_in_the_kafka_settings_exits_2(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("kafka:\n  sasl.password: ${PROXY_TEST_NOT_SET}\n")
    env = {k: v for k, v in os.environ.items() if k != "PROXY_TEST_NOT_SET"}
    result = subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), "--kafka-url", "127.0.0.1:9",
                             "--data-dir", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2
    assert "PROXY_TEST_NOT_SET" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr


def test_request_log_names_the_merchant_by_id_never_by_token_or_file_secret(broker, start_proxy):
    token = "ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7"
    proxy = start_proxy(broker.bootstrap_servers, {"topics": ["buyOffer"]})
    status, body, _ = proxy.get("/export/data/buyOffer", {"Authorization": "Token " + token})
    assert status == 200
    assert proxy.get("/" + body["url"])[0] == 200
    secret = body["url"].rsplit("-", 1)[1].removesuffix(".csv")

    # The access line is written once the answer is out: wait for it.
    log = wait_until(lambda: "route=DataFileHandler" in proxy.log() and proxy.log(), message="the download's log line")
    assert "merchant_id=YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew=" in log
    assert token not in log
    assert secret not in log
    assert "path=/data/buyOffer-" in log and "<secret>" in log


def test_every_route_answers_errors_and_preflight_in_json(broker, start_proxy):
    proxy = start_proxy(broker.bootstrap_servers, {"topics": ["t"]})
    for path in ("/static/nope.js", "/nope", "/data/nope.csv"):
        status, body, headers = proxy.get(path)
        assert status == 404 and "error" in body and headers["Access-Control-Allow-Origin"] == "*", path
    request = urllib.request.Request(proxy.base + "/metrics", method="OPTIONS", headers={"Origin": "http://ui"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204
        assert "GET" in response.headers["Access-Control-Allow-Methods"]


def test_sigterm_cancels_a_running_export_removes_its_file_and_exits_0_within_10_seconds(broker, start_proxy, tmp_path):
    (topic,) = unique_topics("bigExport")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [b'{"merchant_id":"m","n":%d}' % n for n in range(300_000)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "export": {"topics": {topic: {"policy": "public"}}}})
    data_dir = tmp_path / "data"
    answers: list = []
    request = threading.Thread(target=lambda: answers.append(proxy.get(f"/export/data/{topic}", {"Authorization": "t0k"})))
    request.start()
    wait_until(lambda: list(data_dir.glob(".tmp-*")), 30, interval=0.01, message="the export's temporary file")

    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    exit_code = proxy.process.wait(10)
    elapsed = time.monotonic() - started
    request.join(10)

    assert exit_code == 0 and elapsed < 10
    assert list(data_dir.iterdir()) == [], "no temporary or partial file is left"
    assert answers and answers[0][0] == 503 and "error" in answers[0][1]


def test_verbose_health_reports_lag_per_partition(broker, start_proxy):
    (topic,) = unique_topics("lag")
    broker.create_topics([topic], partitions=2)
    produce(broker.bootstrap_servers, topic, [{"n": n} for n in range(5)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic]})

    lag = wait_until(lambda: proxy.get("/health?verbose=1")[1].get("lag", {}).get(topic), 20, message="lag figures")
    assert set(lag) == {"0", "1"} and all(behind == 0 for behind in lag.values())
    assert proxy.get("/health")[1]["status"] == "ok" and "reason" not in proxy.get("/health")[1]


def test_live_messages_keep_flowing_while_exports_run(broker, start_proxy, sockjs, tmp_path):
    big, live = unique_topics("bigExport", "live")
    broker.create_topics([big, live])
    produce(broker.bootstrap_servers, big, [b'{"merchant_id":"m","n":%d}' % n for n in range(300_000)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [live], "export": {"topics": {big: {"policy": "public"}}}})
    client = sockjs(proxy.base)
    client.receive(1)
    statuses: list[int] = []

    def export(token: str) -> None:
        # Exports of 300k records may take longer than proxy.get's 10 s: wait for them, and check them.
        request = urllib.request.Request(f"{proxy.base}/export/data/{big}", headers={"Authorization": token})
        with urllib.request.urlopen(request, timeout=120) as response:
            statuses.append(response.status)

    exports = [threading.Thread(target=export, args=(f"t{i}",)) for i in range(2)]
    for thread in exports:
        thread.start()
    wait_until(lambda: len(list((tmp_path / "data").glob(".tmp-*"))) == 2, 30, interval=0.01,
               message="both exports to be writing")

    produce(broker.bootstrap_servers, live, [{"during": "export"}])
    (message,) = client.receive(1, timeout=5)
    still_exporting = len(list((tmp_path / "data").glob(".tmp-*")))
    for thread in exports:
        thread.join(120)

    assert statuses == [200, 200]
    assert message["message"]["value"] == {"during": "export"}
    assert still_exporting >= 1, "the live message arrived while an export was still running"
