"""Per-key rate limits on a real inference app (tiny GPT-2, the session broker): a burst past a
key's requests per minute gets 429 ``rate_limit_exceeded`` with Retry-After and the six
``x-ratelimit-*`` headers, each refusal audited with its 429; the official OpenAI client
(``max_retries=0``) raises its ``RateLimitError`` once a key's tokens per minute are spent."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.apps import cached_model, events_of, served_app
from tokenaudit.infra.keys import add_key, key_id_of, update_key_limits
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

SIX = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, kafka_bootstrap):
    tmp = tmp_path_factory.mktemp("rate-limits")
    model = cached_model("gpt2", load_settings().cache_dir)
    with served_app(tmp, kafka_bootstrap, model, "limited", "research") as server:
        server.keys_file = tmp / "keys.toml"
        yield server


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _await_headers(base_url: str, key: str, want: dict[str, str], timeout: float = 10.0) -> None:
    """Poll /v1/models (it reserves nothing) until the instance applies the key's new limits."""
    deadline = time.monotonic() + timeout
    while True:
        headers = httpx.get(base_url + "/v1/models", headers=_auth(key)).headers
        if all(headers.get(name) == value for name, value in want.items()):
            return
        assert time.monotonic() < deadline, f"limits not applied: {dict(headers)}"
        time.sleep(0.05)


def test_a_burst_past_the_requests_limit_gets_429s_with_the_headers_and_each_is_audited(gpt2, kafka_bootstrap):
    assert "x-ratelimit-limit-requests" not in httpx.get(gpt2.base_url + "/v1/models", headers=_auth(gpt2.key)).headers
    update_key_limits(gpt2.keys_file, key_id_of(gpt2.key), rpm=2, tpm=100_000)  # as `keys update` does
    _await_headers(gpt2.base_url, gpt2.key, {"x-ratelimit-limit-requests": "2", "x-ratelimit-limit-tokens": "100000"})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gpt2.base_url, headers=_auth(gpt2.key), timeout=60) as client:
            body = {"model": "gpt2", "prompt": "a short prompt", "max_tokens": 2}
            return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(5)])

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429, 429], statuses  # a request comes back every 30 s
    for r in responses:
        assert all(name in r.headers for name in SIX), dict(r.headers)
        assert r.headers["x-ratelimit-limit-requests"] == "2"
    refused = [r for r in responses if r.status_code == 429]
    for r in refused:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    streamed = httpx.post(  # the streamed chat route reserves the same way, before its first token
        gpt2.base_url + "/v1/chat/completions",
        headers=_auth(gpt2.key),
        json={"model": "gpt2", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2},
        timeout=60,
    )
    assert streamed.status_code == 429 and streamed.json()["error"]["code"] == "rate_limit_exceeded"
    assert all(name in streamed.headers for name in (*SIX, "retry-after"))
    responses = [*responses, streamed]
    events = events_of(gpt2, kafka_bootstrap, [r.headers["x-request-id"] for r in responses])
    for r in responses:
        event = events[r.headers["x-request-id"]]
        assert (event["status_code"], event["client_id"]) == (r.status_code, "limited")
        assert event["error_type"] == ("rate_limit_exceeded" if r.status_code == 429 else None)


def test_the_openai_client_raises_rate_limit_error_once_the_tokens_are_spent(gpt2):
    import openai

    tpm = 40
    raw = add_key(gpt2.keys_file, "limited", "research", tpm=tpm)  # a new key: the first request loads it
    client = openai.OpenAI(base_url=gpt2.base_url + "/v1", api_key=raw, max_retries=0)
    served: list[int] = []
    started = time.monotonic()

    def spend() -> None:
        for _ in range(tpm):  # each reserves its input + 20 and uses at least one token
            done = client.completions.create(model="gpt2", prompt="count to ten", max_tokens=20)
            served.append(done.usage.total_tokens)

    with pytest.raises(openai.RateLimitError) as refused:
        spend()
    assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    headers = refused.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == str(tpm) and "x-ratelimit-limit-requests" not in headers
    refill = (time.monotonic() - started) * tpm / 60
    assert served and sum(served) <= tpm + refill, "what passed fits the limit (plus what refilled meanwhile)"
