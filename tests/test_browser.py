"""The live page in a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import sync_playwright

from proxy.testing import produce, unique_topics

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags that keep Chromium off the network this machine does not have.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    assert shutil.which(CHROMIUM), "Debian's chromium is required (apt-get install chromium; .ci/run does it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_page_shows_history_then_live_messages(broker, start_proxy, page):
    topics = unique_topics("buyOffer", "profit")
    broker.create_topics(topics)
    produce(broker.bootstrap_servers, topics[0], [{"offer_id": i, "http_code": 200} for i in range(3)])
    proxy = start_proxy(broker.bootstrap_servers, {"topics": topics})

    page.goto(proxy.base + "/")
    page.wait_for_selector("#state.open", timeout=15000)
    first = page.locator(f'section[data-topic="{topics[0]}"]')
    second = page.locator(f'section[data-topic="{topics[1]}"]')
    first.and_(page.locator('[data-count="3"]')).wait_for(timeout=10000)
    assert second.get_attribute("data-count") == "0"

    produce(broker.bootstrap_servers, topics[1], [{"merchant_id": "m", "profit": 12.5}])

    second.and_(page.locator('[data-count="1"]')).wait_for(timeout=10000)
    assert '"profit":12.5' in second.locator("li").first.inner_text()
    assert "websocket" in page.locator("#state").inner_text()
