"""``GET /v1/budgets`` on the usage API (in process, a real chDB store, the session broker):
budgets and the stream's spend are records the test writes to topics of its own; the answer
has limit, spent (summed over the usage-topic partitions of the current period), remaining and
when the period resets, scoped by the key."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer
from starlette.testclient import TestClient

from tokenaudit.infra.keys import add_key
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.reports import budgets_route
from tokenaudit.reports.usage_api import create_app
from tokenaudit.schemas import BUDGET, SPEND, encode
from tokenaudit.schemas.budgets import BudgetSpend, budget, budget_key, period_bounds, spend_key
from tokenaudit.settings import load_settings

PERIOD_S = 3600


def _spend(scope: str, scope_id: str, partition: int, tokens: tuple[int, int], period_start: int) -> BudgetSpend:
    return {
        "scope": scope,
        "scope_id": scope_id,
        "period_start": period_start,
        "period_end": period_start + PERIOD_S * 1000,
        "partition": partition,
        "offset": 10,
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "cost": 0.0,
        "unpriced_tokens": 0,
        "events": 2,
        "updated_at": period_start,
    }


@pytest.fixture
def api(ch_client, ch_database, tmp_path, kafka_bootstrap):
    store = Store(ch_client, ch_database)
    store.migrate()
    tag = uuid.uuid4().hex[:8]
    topics = {"topic_budgets": f"api-budgets-{tag}", "topic_spend": f"api-spend-{tag}"}
    registry = tmp_path / "api_keys.toml"
    keys = {
        "acme": add_key(registry, "acme", "research"),
        "globex": add_key(registry, "globex", "sales"),
        "admin": add_key(registry, "ops", "", role="admin"),
    }
    now = int(time.time() * 1000)
    start, end = period_bounds(now, "day", PERIOD_S)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for scope, scope_id, limit, hard in (
        ("client", "acme", 1000, True),
        ("department", "research", 5000, False),
        ("client", "globex", 200, True),
    ):
        record = budget(scope, scope_id, "tokens", limit, "day", hard, now)
        producer.produce(topics["topic_budgets"], encode(BUDGET, record), budget_key(scope, scope_id))
    for scope, scope_id, partition, tokens, period in (
        ("client", "acme", 0, (100, 50), start),
        ("client", "acme", 1, (300, 0), start),
        ("client", "globex", 0, (150, 100), start),  # over its limit: remaining 0, not negative
        ("department", "research", 0, (9, 9), start - PERIOD_S * 1000),  # the last period: not counted
    ):
        record = _spend(scope, scope_id, partition, tokens, period)
        producer.produce(topics["topic_spend"], encode(SPEND, record), spend_key(scope, scope_id, partition))
    producer.flush(10)
    settings = load_settings(
        data_dir=tmp_path,
        api_keys_file=registry,
        kafka_bootstrap=kafka_bootstrap,
        budget_period_seconds=PERIOD_S,
        **topics,
    )
    app = create_app(store, settings)
    yield TestClient(app), keys, end
    app.state.budgets_route.close()


def _budgets(http: TestClient, key: str, **params: str):
    return http.get("/v1/budgets", params=params, headers={"Authorization": f"Bearer {key}"})


def _by_scope(body: dict) -> dict[tuple[str, str], dict]:
    return {(row["scope"], row["scope_id"]): row for row in body["rows"]}


def test_budgets_show_limit_spent_remaining_and_the_reset(api):
    client, keys, period_end = api
    rows = _by_scope(_budgets(client, keys["admin"]).json())
    assert set(rows) == {("client", "acme"), ("department", "research"), ("client", "globex")}
    acme = rows[("client", "acme")]
    assert (acme["limit"], acme["spent"], acme["remaining"], acme["hard"]) == (1000, 450, 550, True)
    assert (acme["input_tokens"], acme["output_tokens"], acme["unit"], acme["period"]) == (400, 50, "tokens", "day")
    assert acme["resets_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(period_end / 1000))
    assert (rows[("client", "globex")]["spent"], rows[("client", "globex")]["remaining"]) == (250, 0)
    research = rows[("department", "research")]
    assert (research["spent"], research["remaining"], research["hard"]) == (0, 5000, False)


def test_a_client_key_sees_its_client_and_department_budgets_only(api):
    client, keys, _ = api
    body = _budgets(client, keys["acme"]).json()
    assert body["scope"] == "acme"
    assert set(_by_scope(body)) == {("client", "acme"), ("department", "research")}
    assert set(_by_scope(_budgets(client, keys["globex"]).json())) == {("client", "globex")}
    assert set(_by_scope(_budgets(client, keys["acme"], client="acme").json())) == {
        ("client", "acme"),
        ("department", "research"),
    }
    forbidden = _budgets(client, keys["acme"], client="globex")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden_client"
    assert set(_by_scope(_budgets(client, keys["admin"], client="globex").json())) == {("client", "globex")}


def test_bad_parameters_and_keys_are_refused_before_anything_is_read(api):
    client, keys, _ = api
    assert client.get("/v1/budgets").status_code == 401
    for params in ({"since": "1h"}, {"client": ""}):
        response = _budgets(client, keys["admin"], **params)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parameter", params
    twice = client.get("/v1/budgets?client=a&client=b", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert twice.status_code == 400


def test_unreadable_budget_topics_are_a_503_not_an_empty_list(ch_client, ch_database, tmp_path, monkeypatch):
    """Kafka unreachable: the first calls wait the view's catch-up time, later ones answer at once."""
    monkeypatch.setattr(budgets_route, "CATCH_UP_SECONDS", 2.0)
    registry = tmp_path / "api_keys.toml"
    key = add_key(registry, "ops", "", role="admin")
    settings = load_settings(data_dir=tmp_path, api_keys_file=registry, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    app = create_app(Store(ch_client, ch_database), settings)
    try:
        http = TestClient(app)
        first = _budgets(http, key)
        assert first.status_code == 503 and first.json()["error"]["code"] == "budgets_unavailable"
        t0 = time.monotonic()
        again = _budgets(http, key)
        assert again.status_code == 503 and time.monotonic() - t0 < budgets_route.CATCH_UP_SECONDS  # no wait
    finally:
        app.state.budgets_route.close()
