"""Token streaming end to end: real uvicorn, the tiny T5 (eager: XLA is not what is tested here),
the official OpenAI client, real Kafka; the streamed text, the usage chunk and the event agree."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.apps import cached_model, events_of, served_app
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

LIMIT = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory, kafka_bootstrap):
    tmp = tmp_path_factory.mktemp("streaming")
    with served_app(
        tmp,
        kafka_bootstrap,
        cached_model("t5", load_settings().cache_dir),
        "streamer",
        "research",
        max_input_tokens=64,
        batch_max_wait_ms=50,
        max_new_tokens_limit=LIMIT,
    ) as server:
        yield server


def _non_streamed_text(server, prompt: str, limit: int = LIMIT) -> tuple[str, dict]:
    r = httpx.post(
        server.base_url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": limit},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.json()["usage"]


def test_a_streamed_answer_arrives_token_by_token_and_agrees_with_its_event(served, kafka_bootstrap):
    import openai

    prompt = "stream number 1 about licences"
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.key, max_retries=0)
    whole, whole_usage = _non_streamed_text(served, prompt)
    t0 = time.perf_counter()
    arrivals, pieces, chunks = [], [], []
    for chunk in client.chat.completions.create(
        model="t5-tiny",
        max_tokens=LIMIT,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}],
    ):
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
            pieces.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - t0
    assert len(pieces) > 1, "a 32-token answer in more than one chunk"
    # the first piece leaves when the first token exists, not after the whole generation
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1], total)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices and usage.completion_tokens == LIMIT
    e = events_of(served, kafka_bootstrap, [chunks[0].id.removeprefix("chatcmpl-")])[
        chunks[0].id.removeprefix("chatcmpl-")
    ]
    assert (e["status_code"], e["error_type"], e["path"]) == (200, None, "/v1/chat/completions")
    assert e["output_tokens"] == usage.completion_tokens and e["input_tokens"] == usage.prompt_tokens
    assert e["total_tokens"] == usage.total_tokens and e["finish_reason"] == "length"
    assert 0 < e["ttft_ms"] < e["latency_ms"], "time to first token is part of the request's latency"
    assert e["tpot_ms"] > 0 and e["ttft_ms"] + (LIMIT - 1) * e["tpot_ms"] <= e["latency_ms"] + 1e-6

    # the legacy completions stream: its pieces add up to the non-streamed text of the same prompt
    stream = client.completions.create(
        model="t5-tiny", prompt=prompt, max_tokens=LIMIT, stream=True, stream_options={"include_usage": True}
    )
    parts = list(stream)
    text = "".join(c.choices[0].text for c in parts if c.choices)
    assert text == whole and len([c for c in parts if c.choices and c.choices[0].text]) > 1
    assert parts[-1].usage.completion_tokens == whole_usage["completion_tokens"] == LIMIT
    assert parts[-1].usage.prompt_tokens == whole_usage["prompt_tokens"]


def test_concurrent_streams_decode_side_by_side_in_one_batch(served, kafka_bootstrap):
    prompts = [f"stream number {i} about licences" for i in range(4)]
    limits = [LIMIT - 8 * i for i in range(4)]  # each row stops at its own limit, the batch goes on
    wholes = [_non_streamed_text(served, p, n)[0] for p, n in zip(prompts, limits)]

    async def one(client: httpx.AsyncClient, prompt: str, limit: int) -> tuple[str, str, dict]:
        body = {"prompt": prompt, "max_tokens": limit, "stream": True, "stream_options": {"include_usage": True}}
        text, usage = "", None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            rid = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
        return rid, text, usage

    async def go():
        async with httpx.AsyncClient(
            base_url=served.base_url, timeout=60, headers={"Authorization": f"Bearer {served.key}"}
        ) as client:
            return await asyncio.gather(*[one(client, p, n) for p, n in zip(prompts, limits)])

    results = asyncio.run(go())
    events = events_of(served, kafka_bootstrap, [rid for rid, _, _ in results])
    for (rid, text, usage), whole, limit in zip(results, wholes, limits):
        e = events[rid]
        assert usage["completion_tokens"] == e["output_tokens"] == limit and e["finish_reason"] == "length"
        assert text == whole, "the same tokens as a non-streamed request, batched or not"
        assert e["ttft_ms"] is not None and e["ttft_ms"] < e["latency_ms"]
    batches = {events[rid]["batch_id"] for rid, _, _ in results}
    assert len(batches) < len(prompts), "concurrent streams share a step-wise batch"
    assert max(events[rid]["batch_size"] for rid, _, _ in results) > 1


def test_a_client_that_leaves_mid_stream_is_billed_what_the_model_made(served, kafka_bootstrap):
    rid = "left-" + uuid.uuid4().hex[:8]
    body = {"prompt": "stream number 3 about licences", "max_tokens": LIMIT, "stream": True}
    received = 0
    with (
        httpx.Client(base_url=served.base_url, timeout=60) as client,
        client.stream(
            "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {served.key}", "X-Request-ID": rid}
        ) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                received += 1
                break  # leave after the first chunk: the context manager closes the connection
    e = events_of(served, kafka_bootstrap, [rid])[rid]
    assert (e["status_code"], e["error_type"]) == (499, "client_disconnect")
    assert e["finish_reason"] == "cancelled", "the row stopped when the client left, not at its limit"
    assert received >= 1 and 1 <= e["output_tokens"] < LIMIT, e["output_tokens"]
    assert e["input_tokens"] > 0 and e["total_tokens"] == e["input_tokens"] + e["output_tokens"]


def test_metrics_carry_time_to_first_token_and_per_output_token_by_model_only(served):
    body = {"prompt": "metrics", "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        served.base_url + "/v1/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {served.key}"},
    ) as r:
        assert r.status_code == 200 and "data: [DONE]" in r.read().decode()
    text = httpx.get(served.base_url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"):
        samples = families[name].samples
        assert samples and all(set(s.labels) - {"le"} == {"model"} for s in samples), name
        count = [s.value for s in samples if s.name == name + "_count"]
        assert count == [pytest.approx(count[0])] and count[0] >= 1, name


def test_embeddings_on_a_generator_are_refused_with_an_event(served, kafka_bootstrap):
    r = httpx.post(
        served.base_url + "/v1/embeddings",
        json={"input": "hello", "model": "t5-tiny"},
        headers={"Authorization": f"Bearer {served.key}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_cannot_embed"
    assert "cannot embed" in r.json()["error"]["message"] or "does not embed" in r.json()["error"]["message"]
    e = events_of(served, kafka_bootstrap, [r.headers["x-request-id"]])[r.headers["x-request-id"]]
    assert (e["status_code"], e["error_type"], e["input_tokens"]) == (400, "model_cannot_embed", 0)
