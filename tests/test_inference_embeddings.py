"""/v1/embeddings with an encoder-only model (the tiny BERT): the official OpenAI client, exact
input-token accounting on the topic (output tokens: 0), batching, and the refusals."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from tests.support.apps import cached_model, events_of, served_app
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

MAX_INPUT = 48


@pytest.fixture(scope="module")
def bert(tmp_path_factory, kafka_bootstrap):
    tmp = tmp_path_factory.mktemp("embeddings")
    with served_app(
        tmp,
        kafka_bootstrap,
        cached_model("bert", load_settings().cache_dir),
        "embedder",
        "search",
        max_input_tokens=MAX_INPUT,
    ) as server:
        yield server


def _auth(server) -> dict:
    return {"Authorization": f"Bearer {server.key}"}


def test_openai_client_embeddings_are_exact_and_audited_once_per_request(bert, kafka_bootstrap):
    import openai

    runner = bert.app.state.runner
    tok = runner.tokenizer
    client = openai.OpenAI(base_url=bert.base_url + "/v1", api_key=bert.key, max_retries=0)
    texts = ["first text", "a second, longer text about licences " * 20, "x"]
    one = client.embeddings.create(model="bert-tiny", input="hello world")  # the client asks for base64
    many = client.embeddings.create(model="bert-tiny", input=texts, encoding_format="float")
    x_alone = client.embeddings.create(model="bert-tiny", input="x", encoding_format="float")

    assert one.usage.prompt_tokens == one.usage.total_tokens == len(tok("hello world").input_ids)
    fed = [len(tok(t, truncation=True, max_length=MAX_INPUT).input_ids) for t in texts]
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(fed)
    assert [d.index for d in many.data] == [0, 1, 2]
    dims = runner.model.config.hidden_size
    vectors = np.array([d.embedding for d in many.data])
    assert vectors.shape == (3, dims) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    direct = runner.embed_encoded([runner.tokenize("hello world")])[0]
    assert np.allclose(one.data[0].embedding, direct, atol=1e-5), "base64 float32 decodes to the same vector"
    assert np.allclose(vectors[2], x_alone.data[0].embedding, atol=1e-5), "padding in a batch changes nothing"

    raw = httpx.post(bert.base_url + "/v1/embeddings", json={"input": texts, "model": "bert-tiny"}, headers=_auth(bert))
    assert raw.status_code == 200 and raw.json()["usage"] == {"prompt_tokens": sum(fed), "total_tokens": sum(fed)}
    assert isinstance(raw.json()["data"][0]["embedding"], list), "float is the default without the client"
    b64 = httpx.post(
        bert.base_url + "/v1/embeddings",
        headers=_auth(bert),
        json={"input": ["x"], "model": "bert-tiny", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[2], atol=1e-5)
    rid = raw.headers["x-request-id"]
    e = events_of(bert, kafka_bootstrap, [rid])[rid]
    assert (e["status_code"], e["error_type"], e["path"]) == (200, None, "/v1/embeddings")
    assert e["input_tokens"] == sum(fed) and e["output_tokens"] == 0 and e["total_tokens"] == sum(fed)
    assert e["truncated"] and e["untruncated_input_tokens"] == sum(len(tok(t).input_ids) for t in texts)
    assert e["finish_reason"] is None and e["ttft_ms"] is None and e["batch_size"] >= 3


def test_concurrent_embedding_requests_share_one_model_call(bert, kafka_bootstrap):
    inputs = [[f"request {i} text {j}" for j in range(1 + i % 3)] for i in range(6)]

    async def go():
        async with httpx.AsyncClient(base_url=bert.base_url, headers=_auth(bert), timeout=60) as client:
            return await asyncio.gather(
                *[client.post("/v1/embeddings", json={"input": x, "model": "m"}) for x in inputs]
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * len(inputs)
    events = events_of(bert, kafka_bootstrap, [r.headers["x-request-id"] for r in responses])
    tok = bert.app.state.runner.tokenizer
    by_batch: dict[str, list[tuple[dict, int]]] = {}
    for x, r in zip(inputs, responses):
        e = events[r.headers["x-request-id"]]
        assert e["input_tokens"] == r.json()["usage"]["prompt_tokens"] == sum(len(tok(t).input_ids) for t in x)
        assert e["output_tokens"] == 0 and len(r.json()["data"]) == len(x)
        by_batch.setdefault(e["batch_id"], []).append((e, len(x)))
    assert len(by_batch) < len(inputs), "concurrent requests share an embedding call"
    for members in by_batch.values():  # the requests' rows lie side by side in the call, none lost
        assert {e["batch_size"] for e, _ in members} == {sum(rows for _, rows in members)}
        starts = sorted((e["position_in_batch"], rows) for e, rows in members)
        assert [pos for pos, _ in starts] == [sum(rows for _, rows in starts[:i]) for i in range(len(starts))]


def test_generate_routes_refuse_an_encoder_and_bad_inputs_get_400(bert, kafka_bootstrap):
    cases = [  # (path, body, code)
        ("/v1/completions", {"prompt": "hello", "max_tokens": 3}, "model_cannot_generate"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": True},
            "model_cannot_generate",
        ),
        ("/v1/generate", {"prompt": "hello"}, "model_cannot_generate"),
        ("/v1/embeddings", {"model": "m"}, "invalid_input"),
        ("/v1/embeddings", {"input": ""}, "invalid_input"),
        ("/v1/embeddings", {"input": []}, "invalid_input"),
        ("/v1/embeddings", {"input": ["fine", "  "]}, "invalid_input"),
        ("/v1/embeddings", {"input": [101, 2023, 102]}, "invalid_input"),
        ("/v1/embeddings", {"input": [[101, 102]]}, "invalid_input"),
        ("/v1/embeddings", {"input": 5}, "invalid_input"),
        ("/v1/embeddings", {"input": ["x"] * 2049}, "invalid_input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "invalid_parameter"),
        ("/v1/embeddings", {"input": "x", "dimensions": 32}, "invalid_parameter"),
        ("/v1/embeddings", b'{"input": ["ok", "fine \\ud800 text"]}', "invalid_input"),  # the tokenizer refuses it
    ]
    responses = []
    with httpx.Client(base_url=bert.base_url, headers=_auth(bert), timeout=30) as client:
        for path, body, code in cases:
            if isinstance(body, bytes):
                r = client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = client.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (path, body, r.text[:200])
            responses.append(r)
    assert "cannot generate" in responses[0].json()["error"]["message"]
    events = events_of(bert, kafka_bootstrap, [r.headers["x-request-id"] for r in responses])
    for (path, _, code), r in zip(cases, responses):
        e = events[r.headers["x-request-id"]]
        assert (e["status_code"], e["error_type"], e["path"]) == (400, code, path)
        assert e["input_tokens"] == e["output_tokens"] == 0, "nothing reached the model"
