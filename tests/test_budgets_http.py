"""Hard budgets on a real inference app (tiny GPT-2, the session broker): budgets and stream
spend are records the test writes to the app's own budgets and spend topics, as `budgets set`
and the worker do. A spent budget refuses with 429 ``insufficient_quota`` (and the refusal is
audited); concurrent requests cannot pass the limit together (each reserves its worst case
before dispatch); a changed or removed budget applies without a restart. An embeddings request
(a second app, with the tiny BERT, on the same topics) is refused the same way."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from tests.support.apps import cached_model, events_of, served_app
from tokenaudit.schemas import BUDGET, SPEND, encode
from tokenaudit.schemas.budgets import BudgetSpend, budget, budget_key, period_bounds, spend_key
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

CLIENT, DEPARTMENT = "capped", "finance"
EMBEDDER, SEARCH = "capped-embedder", "search"  # the BERT app's key: budgets of its own
PERIOD_S = 3600  # long: no period ends during the module
PROMPT = "a short prompt"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def topics() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {"topic_budgets": f"test-budgets-{suffix}", "topic_spend": f"test-spend-{suffix}"}


@contextmanager
def _budgeted_app(tmp: Path, bootstrap: str, arch: str, client: str, department: str, topics: dict[str, str]):
    model = cached_model(arch, load_settings().cache_dir)
    with served_app(tmp, bootstrap, model, client, department, budget_period_seconds=PERIOD_S, **topics) as server:
        server.producer = Producer({"bootstrap.servers": bootstrap})
        server.topics = topics
        assert server.app.state.budgets.view.wait_caught_up(30)
        yield server


@pytest.fixture(scope="module")
def app(tmp_path_factory, kafka_bootstrap, topics):
    with _budgeted_app(
        tmp_path_factory.mktemp("budgets-http"), kafka_bootstrap, "gpt2", CLIENT, DEPARTMENT, topics
    ) as s:
        yield s


@pytest.fixture(scope="module")
def bert(tmp_path_factory, kafka_bootstrap, topics):
    with _budgeted_app(
        tmp_path_factory.mktemp("budgets-embed"), kafka_bootstrap, "bert", EMBEDDER, SEARCH, topics
    ) as s:
        yield s


def _set(app, scope: str, scope_id: str, limit: float | None) -> None:
    """As `budgets set --hard` does (None: `budgets remove`, a tombstone)."""
    value = None if limit is None else encode(BUDGET, budget(scope, scope_id, "tokens", limit, "day", True, 0))
    app.producer.produce(app.topics["topic_budgets"], value, budget_key(scope, scope_id))
    app.producer.flush(10)


def _stream_spend(app, scope: str, scope_id: str, tokens: int) -> None:
    """As the worker publishes it: this period's spend of partition 0, nothing of ours counted."""
    start, end = period_bounds(int(time.time() * 1000), "day", PERIOD_S)
    record: BudgetSpend = {
        "scope": scope,
        "scope_id": scope_id,
        "period_start": start,
        "period_end": end,
        "partition": 0,
        "offset": -1,
        "input_tokens": tokens,
        "output_tokens": 0,
        "cost": 0.0,
        "unpriced_tokens": 0,
        "events": 1,
        "updated_at": start,
    }
    app.producer.produce(app.topics["topic_spend"], encode(SPEND, record), spend_key(scope, scope_id, 0))
    app.producer.flush(10)


def _post(app, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return httpx.post(
        app.base_url + "/v1/completions",
        headers={"Authorization": f"Bearer {app.key}", "X-Request-ID": uuid.uuid4().hex},
        json={"model": "gpt2", "prompt": PROMPT, "max_tokens": max_tokens},
        timeout=60,
    )


def _embed(app) -> httpx.Response:
    return httpx.post(
        app.base_url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {app.key}", "X-Request-ID": uuid.uuid4().hex},
        json={"model": "bert-tiny", "input": ["a text to embed", "and another one"]},
        timeout=60,
    )


def _await_status(
    app, status: int, timeout: float = 15.0, send: Callable[[Any], httpx.Response] = _post
) -> httpx.Response:
    """Send requests until one gets ``status`` (the app applies topic changes within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        response = send(app)
        if response.status_code == status:
            return response
        assert time.monotonic() < deadline, f"still {response.status_code}: {response.text}"
        time.sleep(0.1)


def _worst_case(app) -> int:
    """The prompt's input tokens plus MAX_TOKENS, as the app reserves it."""
    state = app.app.state
    return len(state.runner.tokenize(PROMPT).ids) + MAX_TOKENS


def test_a_spent_hard_budget_refuses_with_insufficient_quota_and_the_refusal_is_audited(app, kafka_bootstrap):
    assert _post(app).status_code == 200
    _set(app, "department", DEPARTMENT, 1000)
    _stream_spend(app, "department", DEPARTMENT, 999)  # the stream says 999 of 1000 are spent
    refused = _await_status(app, 429)
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert f"department '{DEPARTMENT}'" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= PERIOD_S
    streamed = httpx.post(  # a streamed request reserves before its first token, so it gets a plain 429
        app.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {app.key}"},
        json={"model": "gpt2", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2},
        timeout=60,
    )
    assert streamed.status_code == 429 and streamed.json()["error"]["code"] == "insufficient_quota"
    rid = refused.headers["x-request-id"]
    event = events_of(app, kafka_bootstrap, [rid])[rid]
    assert (event["status_code"], event["error_type"], event["client_id"]) == (429, "insufficient_quota", CLIENT)
    assert event["output_tokens"] == 0
    _set(app, "department", DEPARTMENT, None)  # removed: requests pass again, no restart
    _await_status(app, 200)


def test_concurrent_requests_cannot_pass_the_limit_together(app):
    worst = _worst_case(app)
    _set(app, "client", CLIENT, 3 * worst)  # room for three worst cases, nothing spent yet
    _stream_spend(app, "client", CLIENT, 0)
    deadline = time.monotonic() + 15
    while app.app.state.budgets.view.budget("client", CLIENT) is None:
        assert time.monotonic() < deadline, "the budget never reached the app"
        time.sleep(0.05)

    async def burst() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {app.key}"}
        async with httpx.AsyncClient(base_url=app.base_url, headers=headers, timeout=60) as client:
            body = {"model": "gpt2", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
            return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(8)])

    responses = asyncio.run(burst())
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refused) == len(responses), [r.status_code for r in responses]
    assert len(served) >= 3 and refused, [r.status_code for r in responses]
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    used = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert used <= 3 * worst  # checked after the fact, all eight would have run

    _set(app, "client", CLIENT, 1000 * worst)  # raised: applies without a restart
    _await_status(app, 200)
    _set(app, "client", CLIENT, None)


def test_an_exhausted_client_s_embeddings_request_is_refused_and_audited(bert, kafka_bootstrap):
    assert _embed(bert).status_code == 200
    _set(bert, "client", EMBEDDER, 500)
    _stream_spend(bert, "client", EMBEDDER, 500)  # the stream says all 500 are spent
    refused = _await_status(bert, 429, send=_embed)
    body = refused.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}
    error = body["error"]
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert f"client '{EMBEDDER}'" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= PERIOD_S
    rid = refused.headers["x-request-id"]
    event = events_of(bert, kafka_bootstrap, [rid])[rid]
    assert (event["status_code"], event["error_type"], event["path"]) == (429, "insufficient_quota", "/v1/embeddings")
    assert (event["client_id"], event["department"], event["output_tokens"]) == (EMBEDDER, SEARCH, 0)
    _set(bert, "client", EMBEDDER, None)  # removed: embeddings pass again, no restart
    _await_status(bert, 200, send=_embed)
