"""The dashboard in a real browser (Debian's chromium through chromedriver) against the usage
API over a real chDB store with known traffic (the seeded rollups, samples and anomalies of the
query tests) and the session's Kafka broker for the live feed.

The page signs in, every panel draws, the numbers shown equal the usage API's, a client key
sees only its own client (in the page and at the API), text from the store is shown as text,
the key stays in session storage, an anomaly produced during the test appears in the feed, and
budgets and spend written to topics of the test's own (as `budgets set` and the worker write
them) show in the Budgets panel with ``GET /v1/budgets``'s numbers, scoped by the key.
Screenshots go to tests/artifacts/."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx
import pytest
from confluent_kafka import Producer

from tests.support.apps import ThreadedServer
from tests.support.browser import browser_missing, screenshot, start_chromium
from tests.support.usage_seed import (
    CLIENTS,
    ROLLUP_COLUMNS,
    rollup_rows,
    seed_anomalies,
    seed_rollups,
    seed_sampled,
    utcnow,
)
from tests.support.waiting import wait_for
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.store import Store
from tokenaudit.reports.dashboard import CONTENT_SECURITY_POLICY
from tokenaudit.reports.usage_api import create_app
from tokenaudit.schemas import ANOMALY, BUDGET, SPEND, encode
from tokenaudit.schemas.budgets import budget, budget_key, period_bounds, spend_key
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.browser]
# shown by the top-clients panel: must appear as these characters, never become markup
HOSTILE = '<img src=x onerror="window.__pwned=1">'
PANELS = ("tokens", "top", "cost", "latency-time", "latency-input", "scatter", "anomalies", "budgets")
BUDGET_PERIOD_S = 10_000_000  # epoch-aligned slices of ~4 months: none ends during the module
# (scope, name, unit, limit, hard, this period's spend: input tokens, output tokens, cost)
BUDGETS = (
    ("client", "acme-web", "tokens", 1000, True, (300, 150, 0.0)),
    ("department", "sales", "cost", 25.0, False, (0, 0, 5.5)),  # acme-web's department
    ("client", "beta-app", "tokens", 200, True, (150, 100, 0.0)),  # over: remaining 0
    ("department", "research", "tokens", 5000, False, None),  # nothing spent yet
)


def _write_budgets(bootstrap: str, topics: dict[str, str]) -> None:
    """As `budgets set` and the worker's spend publisher write them (one spend partition each)."""
    now = int(datetime.now(UTC).timestamp() * 1000)
    start, end = period_bounds(now, "day", BUDGET_PERIOD_S)
    producer = Producer({"bootstrap.servers": bootstrap})
    for scope, name, unit, limit, hard, spend in BUDGETS:
        record = budget(scope, name, unit, limit, "day", hard, now)
        producer.produce(topics["topic_budgets"], encode(BUDGET, record), budget_key(scope, name))
        if spend is not None:
            spent = {
                "scope": scope,
                "scope_id": name,
                "period_start": start,
                "period_end": end,
                "partition": 0,
                "offset": 5,
                "input_tokens": spend[0],
                "output_tokens": spend[1],
                "cost": spend[2],
                "unpriced_tokens": 0,
                "events": 3,
                "updated_at": now,
            }
            producer.produce(topics["topic_spend"], encode(SPEND, spent), spend_key(scope, name, 0))
    assert producer.flush(20) == 0


@pytest.fixture(scope="module")
def dashboard(ch_client, kafka_bootstrap, tmp_path_factory):
    why = browser_missing()
    if why:  # never a silent skip: `make setup` installs chromium and its driver (apt, as root)
        pytest.fail(why)
    tmp = tmp_path_factory.mktemp("dashboard")
    database = f"t_{uuid.uuid4().hex[:10]}"
    store = Store(ch_client, database)
    store.migrate()
    now = utcnow()
    seed_rollups(store, now)
    seed_sampled(store, now)
    seed_anomalies(store, now)
    hostile = rollup_rows(now, windows=2, seed=3)[:1]
    hostile[0][0], hostile[0][1] = HOSTILE, "sales"
    store.insert("usage_rollup", [r + ["key-hostile"] for r in hostile], ROLLUP_COLUMNS + ["api_key_id"])
    topic = f"test-anomalies-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, {topic: 1})  # one partition: anomalies arrive in produced order
    tag = uuid.uuid4().hex[:8]
    budget_topics = {"topic_budgets": f"dash-budgets-{tag}", "topic_spend": f"dash-spend-{tag}"}
    _write_budgets(kafka_bootstrap, budget_topics)
    registry = tmp / "api_keys.toml"
    keys = {client: add_key(registry, client, dept) for client, dept in CLIENTS.items()}
    keys["admin"] = add_key(registry, "ops", "", role="admin")
    prices = tmp / "prices.toml"
    prices.write_text(
        'currency = "USD"\n[models."t5-tiny"]\ninput_per_1k = 0.0004\noutput_per_1k = 0.0016\n'
        '[models."gpt2-tiny"]\ninput_per_1k = 0.001\noutput_per_1k = 0.002\n'
    )
    settings = load_settings(
        data_dir=tmp,
        api_keys_file=registry,
        price_table=prices,
        kafka_bootstrap=kafka_bootstrap,
        topic_anomalies=topic,
        budget_period_seconds=BUDGET_PERIOD_S,
        **budget_topics,
    )
    app = create_app(store, settings)
    driver = start_chromium()
    try:
        with ThreadedServer(app) as server:
            wait_for(lambda: _healthy(server.base_url), 60, "usage API up")
            yield SimpleNamespace(
                url=server.base_url, keys=keys, driver=driver, topic=topic, bootstrap=kafka_bootstrap, app=app
            )
            driver.get("about:blank")  # closes the page's live stream before the server stops
    finally:
        driver.quit()
        app.state.anomaly_feed.close()
        app.state.budgets_route.close()
        ch_client.command(f"DROP DATABASE IF EXISTS {database}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _api(dash, key: str, path: str, **params):
    r = httpx.get(dash.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _sign_in(dash, key: str, fragment: str = "") -> dict:
    from selenium.webdriver.common.by import By

    d = dash.driver
    d.get("about:blank")  # a fresh document even when only the #fragment differs
    d.get(dash.url + "/" + fragment)
    if d.execute_script("return window.sessionStorage.getItem('tokenaudit.key')"):  # the previous test's key
        wait_for(lambda: d.execute_script("return document.body.dataset.loaded"), 60, "signed in again")
        d.find_element(By.ID, "signout").click()
        assert d.execute_script("return window.sessionStorage.length") == 0
    field = d.find_element(By.ID, "api-key")
    field.send_keys(key)
    d.find_element(By.ID, "signin-button").click()
    wait_for(lambda: d.execute_script("return document.body.dataset.loaded"), 60, "first load of every panel")
    return d.execute_script("return window.__dashboard")


def _panel_states(driver) -> dict[str, str]:
    return {p: driver.execute_script(f"return document.getElementById('panel-{p}').dataset.state") for p in PANELS}


def _texts(driver, selector: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector
    )


def _budgets_shown(driver) -> dict[str, list[str]]:
    """The Budgets panel's rows, by ``scope:name``: the cells' text (spent and remaining as the
    numbers the page was given)."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#budget-rows tr')].map(tr => [tr.dataset.scope,"
        " [...tr.children].map(td => td.dataset.value !== undefined ? td.dataset.value : td.textContent.trim())]))"
    )


def _assert_budgets_match_the_api(dash, key: str) -> dict[str, list[str]]:
    shown = _budgets_shown(dash.driver)
    rows = _api(dash, key, "/v1/budgets")["rows"]
    assert set(shown) == {f"{r['scope']}:{r['scope_id']}" for r in rows}
    for r in rows:
        cells = shown[f"{r['scope']}:{r['scope_id']}"]
        assert cells[:2] == [r["scope"], r["scope_id"]]
        assert (float(cells[3]), float(cells[4])) == (r["spent"], r["remaining"])
        assert cells[5] == f"{100 * r['spent'] / r['limit']:.1f} %"
        assert cells[6] == ("hard" if r["hard"] else "soft")
        assert cells[7] == r["resets_at"].replace("T", " ").replace("Z", " UTC")
    return shown


def test_page_is_served_with_a_strict_policy(dashboard):
    r = httpx.get(dashboard.url + "/")
    assert r.status_code == 200 and r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert "<script>" not in r.text and " style=" not in r.text  # no inline script or style
    js = httpx.get(dashboard.url + "/dashboard/app.js")
    assert js.status_code == 200 and js.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in js.text and "localStorage" not in js.text
    assert httpx.get(dashboard.url + "/dashboard/vendor/chart.umd.min.js").status_code == 200


def test_admin_sees_every_panel_with_the_api_numbers(dashboard):
    d = dashboard.driver
    perf = _sign_in(dashboard, dashboard.keys["admin"], "#range=1h")  # the seeded traffic is the last half hour
    assert _panel_states(d) == dict.fromkeys(PANELS, "drawn"), d.execute_script(
        "return [...document.querySelectorAll('.panel .error')].map(e => e.textContent)"
    )
    assert d.execute_script("return document.getElementById('whoami').textContent") == "admin: all clients"
    assert perf["range"]["end_time"] - perf["range"]["start_time"] == 3600
    assert "per 1m" in d.execute_script("return document.getElementById('tokens-stack').textContent")
    # the tokens panel's total equals /v1/usage over the same range
    rng = perf["range"]
    usage = _api(dashboard, dashboard.keys["admin"], "/v1/usage", since=rng["since"], until=rng["until"])["rows"]
    shown = int(d.execute_script("return document.getElementById('total-tokens').dataset.value"))
    assert shown == sum(r["total_tokens"] for r in usage) > 0
    top = _api(dashboard, dashboard.keys["admin"], "/v1/top", since=rng["since"], until=rng["until"], limit=10)["rows"]
    assert _texts(d, "#top-rows td:nth-child(2)") == [r["client_id"] for r in top]
    assert _texts(d, "#top-rows td:nth-child(4)") == [f"{r['total_tokens']:,}" for r in top]
    # the store's text is shown as text: the hostile client id is in the table, not in the DOM as markup
    assert HOSTILE in _texts(d, "#top-rows td:nth-child(2)")
    assert d.execute_script("return document.querySelectorAll('#top-rows img').length") == 0
    assert d.execute_script("return window.__pwned === undefined")
    # the cost panel shows the server's priced report
    month = datetime.now(UTC).strftime("%Y-%m")
    cost = _api(dashboard, dashboard.keys["admin"], "/v1/report", month=month)["cost"]["rows"]
    assert _texts(d, "#cost-rows td:nth-child(3)")[-1] == f"{cost[-1]['cost']} USD"
    # the key: in this tab's session storage, not in local storage or a cookie
    assert d.execute_script("return window.sessionStorage.getItem('tokenaudit.key')") == dashboard.keys["admin"]
    assert d.execute_script("return window.localStorage.length + document.cookie.length") == 0
    assert not [e for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    # the ledger's route answers: the request search is shown, and an unknown id says so
    wait_for(
        lambda: d.execute_script("return document.getElementById('panel-requests').dataset.state") == "ready",
        30,
        "the request search shown",
    )
    from selenium.webdriver.common.by import By

    d.find_element(By.ID, "request-id").send_keys("no-such-request")
    d.find_element(By.CSS_SELECTOR, "#request-form button").click()
    wait_for(
        lambda: "no request" in d.execute_script("return document.querySelector('#panel-requests .error').textContent"),
        30,
        "the search's not-found answer",
    )
    # the Budgets panel: every budget, with the API's spent and remaining
    budgets = _assert_budgets_match_the_api(dashboard, dashboard.keys["admin"])
    assert set(budgets) == {"client:acme-web", "department:sales", "client:beta-app", "department:research"}
    assert budgets["client:acme-web"][2:6] == ["1,000 tokens / day", "450", "550", "45.0 %"]
    assert budgets["department:sales"][2:5] == ["25.00 in cost / day", "5.5", "19.5"]
    assert budgets["client:beta-app"][3:6] == ["250", "0", "125.0 %"]  # over the limit: nothing remains
    assert d.execute_script("return document.getElementById('budgets-none').classList.contains('hidden')")
    screenshot(d, "dashboard-admin")


def test_client_key_sees_only_its_own_client(dashboard):
    d = dashboard.driver
    key = dashboard.keys["acme-web"]
    perf = _sign_in(dashboard, key)
    assert _panel_states(d) == dict.fromkeys(PANELS, "drawn")
    assert d.execute_script("return document.getElementById('whoami').textContent") == "client: acme-web"
    assert d.execute_script("return document.getElementById('admin-filters').classList.contains('hidden')")
    assert _texts(d, "#top-rows td:nth-child(2)") == ["acme-web"]
    rng = perf["range"]
    usage = _api(dashboard, key, "/v1/usage", since=rng["since"], until=rng["until"])["rows"]
    shown = int(d.execute_script("return document.getElementById('total-tokens').dataset.value"))
    assert [r["client_id"] for r in usage] == ["acme-web"] and shown == usage[0]["total_tokens"]
    assert "stacked by model" in d.execute_script("return document.getElementById('tokens-stack').textContent")
    assert {a.split(" ")[3] for a in _texts(d, "#anomaly-list li")} <= {"acme-web"}
    # the page's own key cannot reach another client's data, whatever the page sends
    status = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/v1/usage?client=beta-app', {headers: {Authorization: 'Bearer ' + arguments[0]}})"
        ".then(r => done(r.status));",
        key,
    )
    assert status == 403
    # its client's budget and its department's (sales), never another client's or department's
    assert set(_assert_budgets_match_the_api(dashboard, key)) == {"client:acme-web", "department:sales"}
    screenshot(d, "dashboard-client")


def test_an_anomaly_produced_now_appears_in_the_live_feed(dashboard):
    d = dashboard.driver
    _sign_in(dashboard, dashboard.keys["acme-web"])
    wait_for(
        lambda: d.execute_script("return document.getElementById('panel-anomalies').dataset.feed") == "live",
        60,
        "live feed at the end of the anomaly topic",
    )
    other, mine = (
        {
            "anomaly_id": f"spike:{client}:{uuid.uuid4().hex[:8]}",
            "ts": datetime.now(UTC),
            "client_id": client,
            "department": CLIENTS[client],
            "model": "t5-tiny",
            "rule": "spike",
            "severity": "critical",
            "observed": 91234.0,
            "threshold": 12000.0,
            "window_start": None,
            "request_id": None,
            "message": "tokens 7.6x the client's baseline",
        }
        for client in ("beta-app", "acme-web")
    )
    producer = Producer({"bootstrap.servers": dashboard.bootstrap, "acks": "all"})
    for anomaly in (other, mine):  # one partition: the other client's arrives first
        producer.produce(dashboard.topic, key=anomaly["client_id"].encode(), value=encode(ANOMALY, anomaly))
    assert producer.flush(20) == 0
    selector = f"#anomaly-list li[data-anomaly-id='{mine['anomaly_id']}']"
    wait_for(lambda: d.execute_script("return document.querySelector(arguments[0])", selector), 30, "anomaly shown")
    shown = _texts(d, "#anomaly-list li")
    assert "acme-web spike" in shown[0] and "critical" in shown[0]
    assert not [t for t in shown if "beta-app" in t]  # another client's anomaly never reaches this browser
    assert dashboard.app.state.anomaly_feed.delivered >= 2  # both were consumed, one was filtered out
    screenshot(d, "dashboard-live-anomaly")
