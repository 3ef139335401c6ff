"""The dashboard's server side without a browser, broker or store: the page and its assets with
their security headers, the live stream's refusals (before any consumer starts), and the feed's
scope filter and bounded queue. The browser tests (test_dashboard_browser.py) cover the rest."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from starlette.testclient import TestClient

from tokenaudit.infra.keys import add_key
from tokenaudit.reports.anomaly_feed import Scope, Subscriber, jsonable_anomaly
from tokenaudit.reports.dashboard import ASSETS, CONTENT_SECURITY_POLICY, STREAM_PATH
from tokenaudit.reports.usage_api import create_app
from tokenaudit.settings import load_settings


@pytest.fixture
def http(tmp_path):
    registry = tmp_path / "api_keys.toml"
    keys = {"admin": add_key(registry, "ops", role="admin"), "acme": add_key(registry, "acme", "sales")}
    app = create_app(None, load_settings(data_dir=tmp_path, api_keys_file=registry))  # no route here reads the store
    return TestClient(app), keys, app


def test_page_and_assets_carry_the_policy(http):
    client, _, _ = http
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    for asset in ("app.js", "app.css", "vendor/chart.umd.min.js"):
        r = client.get(f"/dashboard/{asset}")
        assert r.status_code == 200, asset
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/dashboard/../usage_api.py").status_code == 404
    assert client.get("/dashboard/%2e%2e/usage_api.py").status_code == 404


def test_vendored_chart_library_is_the_pinned_one():
    version = (ASSETS / "vendor" / "VERSION").read_text().split()
    assert version[:2] == ["chart.js", "4.6.1"]
    head = (ASSETS / "vendor" / "chart.umd.min.js").read_text()[:200]
    assert "Chart.js v4.6.1" in head and "MIT" in head
    assert "MIT" in (ASSETS / "vendor" / "chart.js.LICENSE.md").read_text()


def test_stream_refuses_before_subscribing(http):
    client, keys, app = http

    def get(key=None, **params):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return client.get(STREAM_PATH, params=params, headers=headers)

    assert get().status_code == 401
    r = get(keys["acme"], client="beta")
    assert r.status_code == 403 and r.json()["error"]["param"] == "client"
    r = get(keys["admin"], since="1h")
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"
    r = get(keys["admin"], model="x' OR 1=1")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert app.state.anomaly_feed._thread is None  # no consumer was started for a refused caller


def test_scope_admits_only_its_own():
    anomaly = {"client_id": "acme", "department": "sales", "model": "t5-tiny"}
    assert Scope().admits(anomaly)
    assert Scope("acme").admits(anomaly) and Scope("acme", "sales", "t5-tiny").admits(anomaly)
    assert not Scope("beta").admits(anomaly)
    assert not Scope("acme", department="research").admits(anomaly)
    assert not Scope(None, model="gpt2-tiny").admits(anomaly)


def test_a_slow_subscriber_loses_its_oldest_not_the_newest():
    loop = asyncio.new_event_loop()
    try:
        subscriber = Subscriber(Scope(), loop, asyncio.Queue(3))
        for i in range(5):
            subscriber.offer({"n": i})
        assert subscriber.dropped == 2
        assert [subscriber.queue.get_nowait()["n"] for _ in range(3)] == [2, 3, 4]
    finally:
        loop.close()


def test_anomaly_times_read_as_the_report_shows_them():
    when = datetime(2026, 11, 28, 12, 0, 1, 250000, tzinfo=UTC)
    out = jsonable_anomaly({"ts": when, "window_start": 1_796_000_000_000, "client_id": "acme", "request_id": None})
    assert out == {
        "ts": "2026-11-28T12:00:01.250000Z",
        "window_start": "2026-11-30T00:53:20Z",
        "client_id": "acme",
        "request_id": None,
    }
