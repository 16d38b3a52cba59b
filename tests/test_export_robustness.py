"""Files and logs under pressure: a full disk, percent-encoded file names, secrets in librdkafka's lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import typing
import urllib.parse
import uuid

import pytest

from proxy.config import TopicExportConfig
from proxy.export.data_folder import DataFolder
from proxy.export.service import ExportService
from proxy.policy import VisibilityPolicy
from proxy.testing import produce, unique_topics, wait_until

TOKEN = "ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7"
MERCHANT = "YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew="


@pytest.fixture
def small_disk(tmp_path: typing.Any) -> typing.Iterator[str]:
    """A real 256 KiB file system (tmpfs) for the data folder, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount_point)], check=True)
    try:
        yield str(mount_point)
    finally:
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_answers_507_and_leaves_no_partial_file(broker, small_disk, start_proxy):
    (topic,) = unique_topics("bulk")
    broker.create_topics([topic], partitions=2)
    # About 1.2 MB of CSV: far more than the 256 KiB file system holds.
    produce(broker.bootstrap_servers, topic, [{"merchant_id": MERCHANT, "n": n, "note": "x" * 100} for n in range(10_000)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": [topic], "data_dir": small_disk,
                                                   "export": {"topics": {topic: {"policy": "public"}}}})

    status, body, headers = proxy.get(f"/export/data/{topic}", {"Authorization": f"Token {TOKEN}"})

    assert status == 507, body
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {"error"} and "no room" in body["error"]
    assert os.listdir(small_disk) == [], "no partial or temporary file is left"
    # The space is free again: a smaller export fits.
    status, body, _ = proxy.get(f"/export/data/{topic}?limit=10", {"Authorization": f"Token {TOKEN}"})
    assert status == 200, body
    assert len(os.listdir(small_disk)) == 1
    _, metrics, _ = proxy.get("/metrics")
    assert f'proxy_export_requests_total{{outcome="insufficient_storage",topic="{topic}"}} 1.0' in metrics
    assert "Traceback" not in proxy.log()


def percent_encoded(text: str, every: int = 3) -> str:
    """text with every `every`-th character percent-encoded, as some clients and proxies send it."""
    return "".join(f"%{ord(c):02X}" if i % every == 0 else c for i, c in enumerate(text))


def test_the_access_log_never_shows_an_export_files_secret_however_it_is_encoded(broker, start_proxy):
    proxy = start_proxy(broker.bootstrap_servers, {"topics": ["buyOffer"]})
    status, body, _ = proxy.get("/export/data/buyOffer", {"Authorization": f"Token {TOKEN}"})
    assert status == 200
    name = body["url"].removeprefix("data/")
    secret = name.rsplit("-", 1)[1].removesuffix(".csv")
    encoded_secret = percent_encoded(secret)
    paths = [
        f"/data/{name.replace(secret, encoded_secret)}",                        # served: Tornado decodes it
        f"/data/{name.replace(secret, percent_encoded(secret, 1))}",            # every character encoded
        f"/data/{name.replace(secret, encoded_secret.replace('%', '%25'))}",    # encoded twice
        f"/%64ata/{name}",                                                      # another route: 404
        f"/data/{name.replace(secret, secret.upper())}",                        # upper case: 404
    ]
    statuses = [proxy.get(path)[0] for path in paths]
    assert statuses[:2] == [200, 200]

    log = wait_until(lambda: proxy.log().count("<secret>") >= len(paths) and proxy.log(), message="access lines")
    access = [line for line in log.splitlines() if "proxy.access" in line]
    for line in access:
        decoded = urllib.parse.unquote(urllib.parse.unquote(line))
        assert secret not in decoded.lower(), line


def test_expanded_values_are_scrubbed_from_every_librdkafka_line_of_ingest_and_exports(broker, start_proxy):
    (topic,) = unique_topics("scrub")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"merchant_id": MERCHANT, "n": 1}])
    # librdkafka echoes sasl.mechanisms in a configuration warning (the protocol is not SASL) and
    # puts client.id at the start of every line it logs.
    mechanism, client_id = "SCRAM-SHA-256", f"client-{uuid.uuid4().hex}"
    proxy = start_proxy(broker.bootstrap_servers, {
        "topics": [topic], "export": {"topics": {topic: {"policy": "public"}}},
        "kafka": {"sasl.mechanisms": "${PROXY_TEST_MECHANISM}", "client.id": "${PROXY_TEST_CLIENT_ID}"},
    }, env={"PROXY_TEST_MECHANISM": mechanism, "PROXY_TEST_CLIENT_ID": client_id})
    status, _, _ = proxy.get(f"/export/data/{topic}", {"Authorization": f"Token {TOKEN}"})
    assert status == 200

    # The export's consumer repeats the live one's warning, which the log keeps once per 30 s.
    log = wait_until(lambda: "CONFWARN" in proxy.log() and proxy.log(), message="librdkafka's warning")
    warnings = [line for line in log.splitlines() if "CONFWARN" in line]
    assert all("set to `***`" in line and "[***#consumer-" in line for line in warnings), warnings
    assert mechanism not in log and client_id not in log


def test_an_export_scrubs_its_consumers_lines_with_the_secrets_it_was_given(broker, tmp_path, caplog):
    """Without the live consumer that registers them first: the export passes its own secrets."""
    (topic,) = unique_topics("exportScrub")
    broker.create_topics([topic])
    produce(broker.bootstrap_servers, topic, [{"n": 1}])
    client_id = f"export-client-{uuid.uuid4().hex}"
    service = ExportService({"bootstrap.servers": broker.bootstrap_servers, "client.id": client_id,
                             "sasl.mechanisms": "PLAIN"},
                            VisibilityPolicy({topic: TopicExportConfig(policy="public")}),
                            DataFolder(str(tmp_path), 3600, 1024 ** 3), secrets={client_id})
    with caplog.at_level(logging.WARNING, logger="proxy.kafka"):
        result = asyncio.run(service.export_to_file(topic, MERCHANT))
    assert result.rows == 1
    lines = [record.getMessage() for record in caplog.records if record.name == "proxy.kafka"]
    assert any("CONFWARN" in line and "[***#consumer-" in line for line in lines), lines
    assert not any(client_id in line for line in lines)
    assert json.dumps(lines).count("***") >= 1
