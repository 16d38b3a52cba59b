"""The OpenAPI document: valid, served at /openapi.yaml, names every route, and a live proxy keeps
to it under requests schemathesis generates from it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
import yaml
from openapi_spec_validator import validate

from proxy.app import ProxyServer
from proxy.config import default_topic_rules, parse_config
from proxy.http_api import openapi_document
from proxy.testing import produce, unique_topics

TOKEN = "ddObEKSew8sIa9aZvJrdSs78K5zVIuCvYaXlu0Rs8KBjUlJQ5B3W4AeOGetYZ6U7"
MERCHANT_ID = "YWKtz6tuqjA6hfYSSZ2Uf+9jmi0PrzlWNKQfoRv1oew="
# Per operation; with the explicit examples and the coverage phase this runs in about 30 s here.
MAX_EXAMPLES = 15
# What "keeps to the document" means: no 5xx, and every status, content type, header and body
# is one the document declares for that operation.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")


def schemathesis(schema_path: typing.Any, base: str, *args: str) -> subprocess.CompletedProcess:
    """Run the schemathesis CLI against the proxy at base; the merchant token on every request."""
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", str(schema_path), "--url", base,
         "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--exclude-tag", "streaming", "--workers", "1",
         "--seed", "20181016", "--request-timeout", "10", "--header", f"Authorization: Token {TOKEN}",
         "--suppress-health-check", "all", "--no-color", *args],
        cwd=os.path.dirname(schema_path), capture_output=True, text=True, timeout=150)


def shipped_document() -> dict[str, typing.Any]:
    return yaml.safe_load(openapi_document())


def example_path(template: str, document: dict[str, typing.Any]) -> str:
    """A concrete path for a templated one, from the parameters' first example."""
    examples = {}
    for operation in document["paths"][template].values():
        for parameter in operation.get("parameters", []):
            if "$ref" in parameter:
                parameter = document["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
            if parameter["in"] == "path":
                examples[parameter["name"]] = parameter["schema"]["examples"][0]
    return re.sub(r"\{(\w+)\}", lambda match: examples[match.group(1)], template)


def app_route_patterns() -> list[tuple[re.Pattern, str]]:
    """Every route of the application as (regex, handler name), built as the proxy builds it."""

    async def build() -> list[tuple[re.Pattern, str]]:
        app = ProxyServer(parse_config({"kafka_url": "127.0.0.1:9"})).make_app()
        return [(rule.matcher.regex, rule.target.__name__) for rule in app.wildcard_router.rules]

    return asyncio.run(build())


def test_shipped_document_is_valid_openapi():
    validate(shipped_document())


def test_every_route_is_described_and_every_described_path_is_routed():
    document = shipped_document()
    examples = {template: example_path(template, document) for template in document["paths"]}
    routes = app_route_patterns()

    undocumented = [(regex.pattern, name) for regex, name in routes
                    if not any(regex.fullmatch(path) for path in examples.values())]
    unrouted = [template for template, path in examples.items()
                if not any(regex.fullmatch(path) for regex, _ in routes)]

    assert undocumented == []
    assert unrouted == []


def test_proxy_serves_the_shipped_document(broker, start_proxy):
    proxy = start_proxy(broker.bootstrap_servers, {"topics": unique_topics("served")})

    status, body, headers = proxy.get("/openapi.yaml")

    assert status == 200
    assert headers["Content-Type"].startswith("application/yaml")
    assert yaml.safe_load(body) == shipped_document()


@pytest.mark.timeout(180)
def test_live_proxy_keeps_to_the_document_under_generated_requests(broker, start_proxy, tmp_path):
    sales, situations, live = unique_topics("buyOffer", "marketSituation", "live")
    rules = default_topic_rules()
    export_topics = {
        sales: dataclasses.asdict(rules["buyOffer"]),
        situations: dataclasses.asdict(rules["marketSituation"]),
    }
    broker.create_topics([sales, situations, live])
    produce(broker.bootstrap_servers, sales, [
        {"offer_id": n, "uid": 11, "product_id": 1, "quality": 1, "price": 30.0 + n, "amount": 1,
         "merchant_id": MERCHANT_ID, "left_in_stock": 10, "consumer_id": "c", "http_code": 200,
         "timestamp": f"2018-03-16T10:00:0{n}.000Z"} for n in range(5)])
    produce(broker.bootstrap_servers, live, [{"n": n} for n in range(3)])
    proxy = start_proxy(broker.bootstrap_servers, {
        "topics": [live],
        "export": {"topics": export_topics},
        # xhr polls of a session that has nothing queued wait for the next heartbeat.
        "live": {"heartbeat_interval": 1},
    })
    status, body, _ = proxy.get(f"/export/data/{sales}", headers={"Authorization": f"Token {TOKEN}"})
    assert status == 200, body

    # The document as the proxy serves it, with examples that exist on this broker, so the
    # examples phase reaches the 200 answers of the export and the download too.
    document = yaml.safe_load(proxy.get("/openapi.yaml")[1])
    document["components"]["parameters"]["Topic"]["schema"]["examples"] = [sales, situations]
    file_parameter = document["paths"]["/data/{file}"]["get"]["parameters"][0]
    file_parameter["schema"]["examples"] = [body["url"].removeprefix("data/")]
    schema_path = tmp_path / "openapi.yaml"
    schema_path.write_text(yaml.safe_dump(document, sort_keys=False))

    full = schemathesis(schema_path, proxy.base, "--phases", "examples,coverage,fuzzing")

    assert full.returncode == 0, full.stdout[-6000:] + full.stderr[-2000:]
    assert "Traceback" not in proxy.log()
