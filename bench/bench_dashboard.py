"""Dashboard load for the last 30 days over 10 million usage_rollup rows, measured in the browser.

The store: 10M rollup rows generated inside ClickHouse as bench_usage_query.py does (2,000
clients x 5 models, windows over 35 days, merged: a running pipeline's steady state between
sink batches), 200k sampled requests and a few thousand anomalies. The usage API serves it
(with a price table for the cost panel) and Debian's chromium loads the dashboard with an
admin key already in the tab's session storage and ``#range=30d`` (today and the 29 UTC days
before it, as the page asks). Measured twice, side by side: first with every window read
(``_windows``: no daily pre-aggregate yet), then after one build of the daily pre-aggregate of
the settled days, as the sink's builder keeps it (infra/daily_rollup.py; today is still read
from the windows):

  dashboard_30d_all_panels_drawn_ms   navigation start -> every panel drawn (the page's own
                                      performance.now() when the last panel finished; median)
  panel_<name>_ms                     each panel's query, timed through the function the route
                                      calls (median of runs)
  daily_build_seconds                 building the pre-aggregate of every settled day
  panel_cost_full_month_ms            the cost panel's answer for the last full month, against
                                      the full /v1/report answer it used to download

and, with a Kafka broker of its own, the live feed's delay: an anomaly produced -> shown in
the page (median over a few). The goal for the load is < 1 s. With the broker, 50 budgets and
their spend are on the budget topics, so "every panel drawn" includes the Budgets panel's
``GET /v1/budgets`` (one small request beside the others; ``panel_budgets_ms``: its answer,
through the function the route calls; ``budgets_panel_after_the_others_ms``: how much later than
every other panel it was drawn in the same loads, <= 0 when it added nothing); with
``--no-feed`` that panel ends in its 503 (no Kafka).

    .venv/bin/python bench/bench_dashboard.py [--rows 10000000] [--runs 5] [--no-feed] [--screenshot docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, as the tests use it
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench's data generator

from bench_usage_query import PAIRS, generate

from tests.support.apps import ThreadedServer
from tests.support.browser import start_chromium, wait_for
from tokenaudit.infra.daily_rollup import DailyBuilder, settle_seconds
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.store import Store
from tokenaudit.reports import queries
from tokenaudit.reports.cost_view import department_answer
from tokenaudit.reports.openai_usage import fetch_page, parse_bucket_query
from tokenaudit.reports.params import parse_report_params
from tokenaudit.reports.prices import priced_answer
from tokenaudit.reports.usage_api import create_app
from tokenaudit.settings import load_settings

PRICES = 'currency = "USD"\n' + "".join(
    f'[models."model-{i}"]\ninput_per_1k = 0.000{i + 1}\noutput_per_1k = 0.00{i + 1}\n' for i in range(5)
)


def seed_samples_and_anomalies(store: Store, start_ms: int) -> None:
    store.command(
        "INSERT INTO {db}.usage_sampled (request_id, ts, client_id, department, model, input_tokens, output_tokens, "
        "total_tokens, latency_ms, status_code, sample_reason) "
        "SELECT concat('r', toString(n)), fromUnixTimestamp64Milli({s:Int64}, 'UTC') + toIntervalSecond(15 * n), "
        "concat('client-', toString(n % 2000)), concat('dept-', toString(n % 2000 % 17)), "
        "concat('model-', toString(n % 5)), 16 + n % 2000, 8 + n % 200, 24 + n % 2000 + n % 200, "
        "5 + (n % 2000) * 0.05 + (n % 97), if(n % 50 = 0, 500, 200), 'top' "
        "FROM (SELECT number AS n FROM numbers(200000))",
        {"s": start_ms},
    )
    store.command(
        "INSERT INTO {db}.anomalies (anomaly_id, ts, client_id, department, model, rule, severity, observed, "
        "threshold, message) SELECT concat('a', toString(n)), "
        "fromUnixTimestamp64Milli({s:Int64}, 'UTC') + toIntervalMinute(10 * n), concat('client-', toString(n % 2000)), "
        "concat('dept-', toString(n % 2000 % 17)), 'model-0', 'spike', 'warning', 9000, 1000, 'volume spike' "
        "FROM (SELECT number AS n FROM numbers(5000))",
        {"s": start_ms},
    )


def timed(fn: Any, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def panel_queries(store: Store, now: datetime, runs: int, prices: Path) -> dict[str, float]:
    """Each panel's query, as its route runs it (admin scope, last 30 days as the page asks)."""
    end = int(now.timestamp())
    start = end - end % 86400 - 29 * 86400
    raw = {"since": datetime.fromtimestamp(start, UTC).isoformat(), "until": now.isoformat()}
    out = {}
    total = parse_bucket_query([("start_time", str(start)), ("end_time", str(end)), ("limit", "31")], 60)
    stacked = parse_bucket_query(
        [("start_time", str(start)), ("end_time", str(end)), ("limit", "31"), ("group_by", "user_id")]
        + [("user_ids", f"client-{i}") for i in range(9)],
        60,
    )
    out["tokens_total"] = timed(lambda: fetch_page(store, total, None), runs)
    out["tokens_stacked"] = timed(lambda: fetch_page(store, stacked, None), runs)
    out["top"] = timed(lambda: queries.top(store, parse_report_params("top", {**raw, "limit": "10"})), runs)
    month = parse_report_params("report", {"month": now.strftime("%Y-%m"), "detail": "department"})
    out["cost"] = timed(lambda: department_answer(store, month, None, prices), runs)
    out["latency_time"] = timed(
        lambda: queries.latency(store, parse_report_params("latency", {**raw, "bucket": "day"})), runs
    )
    out["latency_input"] = timed(lambda: queries.latency(store, parse_report_params("latency", raw)), runs)
    out["scatter"] = timed(
        lambda: queries.samples(store, parse_report_params("samples", {**raw, "limit": "2000"})), runs
    )
    out["anomalies"] = timed(
        lambda: queries.anomalies(store, parse_report_params("anomalies", {**raw, "limit": "50"})), runs
    )
    return out


def full_month_cost(store: Store, now: datetime, runs: int, prices: Path) -> str:
    """The cost panel on a full month (the last one): the department answer against the full
    answer it replaced (every client line and a token row per client, model and day, as JSON)."""
    last = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    department = parse_report_params("report", {"month": last, "detail": "department"})
    fast = timed(lambda: department_answer(store, department, None, prices), runs)
    full = parse_report_params("report", {"month": last})
    t0 = time.perf_counter()
    rows = queries.month_tokens(store, full)
    size = len(json.dumps({"rows": rows, **priced_answer(rows, prices)}))
    slow = (time.perf_counter() - t0) * 1000
    return f"{fast:.0f} (full answer: {slow:.0f} ms, {len(rows)} rows, {size / 1e6:.0f} MB; month {last})"


BUDGETED = 50  # budgets on the topic with the broker: a client each, half with spend


def seed_budgets(settings: Any) -> None:
    """As `budgets set` and the worker's spend publisher write them."""
    from confluent_kafka import Producer

    from tokenaudit.schemas import BUDGET, SPEND, encode
    from tokenaudit.schemas.budgets import budget, budget_key, period_bounds, spend_key

    now = int(time.time() * 1000)
    start, end = period_bounds(now, "day")
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for i in range(BUDGETED):
        name = f"client-{i}"
        record = budget("client", name, "tokens", 1_000_000, "day", i % 2 == 0, now)
        producer.produce(settings.topic_budgets, encode(BUDGET, record), budget_key("client", name))
        if i % 2:
            spend = {"scope": "client", "scope_id": name, "period_start": start, "period_end": end, "partition": 0}
            spend.update(offset=i, input_tokens=1000 * i, output_tokens=100 * i, cost=0.0, unpriced_tokens=0)
            spend.update(events=i, updated_at=now)
            producer.produce(settings.topic_spend, encode(SPEND, spend), spend_key("client", name, 0))
    producer.flush(10)


def budgets_answer_ms(app: Any, runs: int) -> str:
    from tokenaudit.reports.budgets_route import budget_rows

    view = app.state.budgets_route.view()
    if view is None:
        return "n/a (budget topics unreadable)"
    return f"{timed(lambda: budget_rows(view, None), runs):.2f} ({len(budget_rows(view, None))} budgets)"


def budgets_lead_ms(panels: dict[str, float]) -> float:
    """How much later the Budgets panel was drawn than every other panel (<= 0: it added nothing
    to the load): the panel's cost, side by side with the others in the same load."""
    return panels["budgets"] - max(ms for name, ms in panels.items() if name != "budgets")


def browser_loads(
    url: str, key: str, runs: int, screenshot: Path | None, leads: list[float] | None = None
) -> list[float]:
    driver = start_chromium(1280, 1100)
    try:
        driver.get(url + "/#range=30d")
        driver.execute_script("window.sessionStorage.setItem('tokenaudit.key', arguments[0])", key)
        loads = []
        for _ in range(runs + 1):  # the first warms the page cache and the store's marks
            driver.get("about:blank")
            driver.get(url + "/#range=30d")
            perf = wait_for(
                lambda: driver.execute_script("return window.__dashboard.allDrawnMs && window.__dashboard"), 120, "load"
            )
            states = driver.execute_script(
                "return Object.fromEntries([...document.querySelectorAll('.panel')].map(p => [p.id, p.dataset.state]))"
            )
            # ready: the request search; the budgets' 503 without a broker (--no-feed)
            assert all(s in ("drawn", "absent", "ready") or p == "panel-budgets" for p, s in states.items()), states
            loads.append(perf["allDrawnMs"])
            if leads is not None and "budgets" in perf["panels"]:
                leads.append(budgets_lead_ms(perf["panels"]))
        if screenshot is not None:  # the README's picture: the last load, as drawn
            driver.save_screenshot(str(screenshot))
        return loads[1:]
    finally:
        driver.quit()


def feed_delay(app: Any, url: str, key: str, settings: Any, samples: int) -> list[float]:
    from confluent_kafka import Producer

    from tokenaudit.schemas import ANOMALY, encode

    driver = start_chromium()
    try:
        driver.get(url + "/")
        driver.execute_script("window.sessionStorage.setItem('tokenaudit.key', arguments[0])", key)
        driver.get("about:blank")  # a fresh document: only the #fragment would differ
        driver.get(url + "/#range=1h")
        wait_for(
            lambda: driver.execute_script("return document.getElementById('panel-anomalies').dataset.feed") == "live",
            60,
            "live feed",
        )
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
        delays = []
        for _ in range(samples):
            anomaly_id = f"bench-{uuid.uuid4().hex[:8]}"
            record = {
                "anomaly_id": anomaly_id,
                "ts": datetime.now(UTC),
                "client_id": "client-1",
                "department": "dept-1",
                "model": "model-0",
                "rule": "spike",
                "severity": "critical",
                "observed": 1.0,
                "threshold": 0.5,
                "window_start": None,
                "request_id": None,
                "message": "bench",
            }
            sent_ms = time.time() * 1000
            producer.produce(settings.topic_anomalies, value=encode(ANOMALY, record))
            producer.flush(10)
            shown = wait_for(
                lambda aid=anomaly_id: driver.execute_script(
                    "return (window.__dashboard.feed.find(f => f.anomaly_id === arguments[0]) || {}).shownAt", aid
                ),
                30,
                "anomaly shown",
            )
            delays.append(shown - sent_ms)
        return delays
    finally:
        driver.get("about:blank")
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-feed", action="store_true", help="skip the live-feed delay (needs a Kafka broker)")
    ap.add_argument("--screenshot", type=Path, default=None, help="save the loaded dashboard as this PNG")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    now = datetime.now(UTC)
    start_ms = int(now.timestamp() * 1000) - 35 * 86_400_000
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        broker = None
        bootstrap = "127.0.0.1:1"
        if not args.no_feed:
            from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
            from tokenaudit.infra.procutil import free_port

            base = load_settings()
            broker = KafkaBroker(
                BrokerConfig(
                    home=Path(tmp) / "broker",  # not <data_dir>/kafka: that would read as a local cluster
                    cache_dir=base.cache_dir,
                    version=base.kafka_version,
                    port=free_port(),
                    controller_port=free_port(),
                    heap="512m",
                )
            )
            broker.start()
            bootstrap = broker.bootstrap
        try:
            store = Store.open(f"chdb://{tmp}/ch", "tokenaudit")
            store.migrate()
            t0 = time.perf_counter()
            batch = args.rows // 20
            for k in range(20):
                generate(store, k * batch, batch if k < 19 else args.rows - k * batch, start_ms)
            store.command("OPTIMIZE TABLE {db}.usage_rollup FINAL")
            seed_samples_and_anomalies(store, start_ms)
            print(f"RESULT rows={args.rows} pairs={PAIRS} seed_seconds={time.perf_counter() - t0:.1f}")
            prices = Path(tmp) / "prices.toml"
            prices.write_text(PRICES)
            windows = panel_queries(store, now, args.runs, prices)
            registry = Path(tmp) / "keys.toml"
            key = add_key(registry, "ops", "", role="admin")
            settings = load_settings(
                data_dir=Path(tmp), api_keys_file=registry, price_table=prices, kafka_bootstrap=bootstrap
            )
            if broker is not None:
                from tokenaudit.infra.kafka_admin import ensure_topics
                from tokenaudit.infra.topics import ensure_declared

                ensure_topics(bootstrap, {settings.topic_anomalies: 1})
                ensure_declared(settings, ("budgets", "spend"))
                seed_budgets(settings)
            app = create_app(store, settings)
            with ThreadedServer(app) as server:
                wait_for(lambda: _up(server.base_url), 60, "usage API")
                print(f"RESULT panel_budgets_ms={budgets_answer_ms(app, args.runs)}")
                loads_windows = browser_loads(server.base_url, key, args.runs, None)
                t0 = time.perf_counter()
                built = DailyBuilder(store, settle_seconds(settings), quiet_seconds=0, max_days=400).run_once()
                print(f"RESULT daily_build_seconds={time.perf_counter() - t0:.1f} days={len(built)}")
                for table in ("usage_rollup_daily", "usage_rollup_days", "usage_rollup_day_writes"):
                    # merged, as usage_rollup is above: the steady state, long after those builds,
                    # not background merges of a just-built month racing the measured loads
                    store.command(f"OPTIMIZE TABLE {{db}}.{table} FINAL")
                daily = panel_queries(store, now, args.runs, prices)
                for name, ms in daily.items():
                    print(f"RESULT panel_{name}_ms={ms:.0f} (every window: {windows[name]:.0f})")
                print(f"RESULT panel_cost_full_month_ms={full_month_cost(store, now, args.runs, prices)}")
                leads: list[float] = []
                loads = browser_loads(server.base_url, key, args.runs, args.screenshot, leads)
                print(
                    f"RESULT budgets_panel_after_the_others_ms={statistics.median(leads[1:]):.0f} (runs: "
                    f"{', '.join(f'{x:.0f}' for x in leads[1:])}; <= 0: drawn before the last other panel)"
                )
                med, med_windows = statistics.median(loads), statistics.median(loads_windows)
                print(
                    f"RESULT dashboard_30d_all_panels_drawn_ms={med:.0f} (runs: {', '.join(f'{x:.0f}' for x in loads)}; "
                    f"every window: {med_windows:.0f}, ratio {med_windows / med:.1f}x)"
                )
                print(f"RESULT target_1s={'met' if med < 1000 else 'missed'}")
                if broker is not None:
                    delays = feed_delay(app, server.base_url, key, settings, 5)
                    print(f"RESULT live_feed_delay_ms={statistics.median(delays):.0f} (max {max(delays):.0f})")
            app.state.anomaly_feed.close()
            app.state.budgets_route.close()
            store.close()
        finally:
            if broker is not None:
                broker.stop()


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
