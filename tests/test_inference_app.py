"""The inference app end to end: real uvicorn, real TF model, real Kafka; events read back."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid

import httpx
import pytest

from tests.support.apps import ThreadedServer, cached_model, decode_events, read_events
from tokenaudit.inference.app import create_app
from tokenaudit.inference.identity import client_address
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.keys import KeyRegistry, add_key
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

CANARY = "CANARY-" + uuid.uuid4().hex


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record) + (str(record.exc_info) if record.exc_info else ""))


@pytest.fixture(scope="module")
def logs():
    handler = _Capture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def _settings(tmp, bootstrap, topic, model, **extra):
    return load_settings(
        data_dir=tmp / "data",
        kafka_bootstrap=bootstrap,
        topic_usage=topic,
        model=str(model),
        xla=False,
        max_input_tokens=64,
        batch_max_size=8,
        batch_max_wait_ms=20,
        max_body_bytes=4096,
        max_new_tokens_limit=32,
        kafka_partitions=2,
        **extra,
    )


@pytest.fixture(scope="module")
def t5_app(tmp_path_factory, kafka_bootstrap, logs):
    tmp = tmp_path_factory.mktemp("app")
    keys_file = tmp / "keys.toml"
    keys = {
        name: add_key(keys_file, name, dept)
        for name, dept in [("acme", "research"), ("globex", "sales"), ("initech", "ops")]
    }
    topic = f"test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, {topic: 2})
    s = _settings(tmp, kafka_bootstrap, topic, cached_model("t5", load_settings().cache_dir), api_keys_file=keys_file)
    app = create_app(s)
    with ThreadedServer(app) as server:
        server.wait_ready()
        server.app, server.keys, server.topic, server.registry = app, keys, topic, KeyRegistry.load(keys_file)
        yield server


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _events_for(server, bootstrap, request_ids, timeout=60):
    """Read the topic until every request id is seen; returns {request_id: [events]}."""
    want = set(request_ids)
    pairs = read_events(bootstrap, server.topic, expect=0, timeout=timeout, settle=0.5)
    for _ in range(20):
        if want <= {e["request_id"] for e in decode_events(pairs)}:
            break
        pairs = read_events(bootstrap, server.topic, expect=len(pairs) + 1, timeout=5, settle=0.5)
    by_id: dict[str, list] = {}
    for (key, _), e in zip(pairs, decode_events(pairs)):
        if e["request_id"] in want:
            assert key == e["client_id"].encode(), "message key is the client_id"
            by_id.setdefault(e["request_id"], []).append(e)
    return by_id


def test_concurrent_requests_from_several_keys_give_exactly_one_exact_event_each(t5_app, kafka_bootstrap):
    runner = t5_app.app.state.runner
    tok = runner.tokenizer
    prompts = [f"request number {i} " + "about licences and software " * (i % 5) for i in range(24)]
    prompts[3] = "a very long prompt that will be cut " * 30  # over max_input_tokens=64
    names = list(t5_app.keys)

    async def go():
        async with httpx.AsyncClient(base_url=t5_app.base_url, timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        "/v1/generate",
                        json={"prompt": p, "max_new_tokens": 3 + i % 6},
                        headers=_auth(t5_app.keys[names[i % 3]]),
                    )
                    for i, p in enumerate(prompts)
                ]
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * len(prompts)
    ids = [r.json()["request_id"] for r in responses]
    assert all(r.headers["x-request-id"] == rid for r, rid in zip(responses, ids))
    events = _events_for(t5_app, kafka_bootstrap, ids)
    assert sorted(events) == sorted(ids) and all(len(v) == 1 for v in events.values()), "exactly one event each"
    batches: dict[str, list] = {}
    for i, (prompt, resp) in enumerate(zip(prompts, responses)):
        e = events[resp.json()["request_id"]][0]
        usage = resp.json()["usage"]
        full = tok(prompt).input_ids
        assert e["untruncated_input_tokens"] == len(full)
        assert e["input_tokens"] == len(tok(prompt, truncation=True, max_length=64).input_ids) == usage["input_tokens"]
        assert e["truncated"] is (len(full) > 64)
        assert e["output_tokens"] == usage["output_tokens"] <= 3 + i % 6
        assert e["total_tokens"] == e["input_tokens"] + e["output_tokens"]
        # the ids the model returned, independently re-run alone: same count
        assert runner.generate([prompt], [3 + i % 6])[0].output_tokens == e["output_tokens"]
        key = t5_app.registry.lookup(t5_app.keys[names[i % 3]])
        assert (e["client_id"], e["department"], e["api_key_id"]) == (key.client_id, key.department, key.key_id)
        assert e["status_code"] == 200 and e["error_type"] is None and e["path"] == "/v1/generate"
        assert e["model"] == runner.model_name and e["device"].endswith("CPU:0")
        assert e["latency_ms"] >= e["inference_ms"] > 0 and e["queue_ms"] >= 0
        assert len(e["prompt_digest"]) == 64 and e["finish_reason"] in ("stop", "length")
        batches.setdefault(e["batch_id"], []).append(e)
    assert events[ids[3]][0]["truncated"]
    assert len(batches) < len(prompts), "concurrent requests must share generate calls"
    for members in batches.values():
        assert sorted(m["position_in_batch"] for m in members) == list(range(members[0]["batch_size"]))


def test_openai_client_completions_chat_and_streaming(t5_app, kafka_bootstrap):
    import openai

    client = openai.OpenAI(base_url=t5_app.base_url + "/v1", api_key=t5_app.keys["globex"], max_retries=0)
    comp = client.completions.create(model="t5-tiny", prompt="Say something", max_tokens=5)
    assert comp.usage.prompt_tokens > 0 and 0 < comp.usage.completion_tokens <= 5
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + comp.usage.completion_tokens
    chat = client.chat.completions.create(
        model="t5-tiny", max_tokens=4, messages=[{"role": "user", "content": "hello there"}]
    )
    assert chat.choices[0].message.role == "assistant" and 0 < chat.usage.completion_tokens <= 4
    chunks = list(
        client.chat.completions.create(
            model="t5-tiny",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "stream it"}],
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=t5_app.base_url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="t5-tiny", prompt="x", max_tokens=2
        )
    ids = [comp.id.removeprefix("cmpl-"), chat.id.removeprefix("chatcmpl-")]
    events = _events_for(t5_app, kafka_bootstrap, ids)
    assert events[ids[0]][0]["output_tokens"] == comp.usage.completion_tokens
    assert events[ids[0]][0]["path"] == "/v1/completions"
    assert events[ids[1]][0]["input_tokens"] == chat.usage.prompt_tokens


def _raw_request(port, data: bytes, wait_response=True, close_after: float = 0.15) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if not wait_response:
            # let the server read the body and start generating (32 eager steps take far
            # longer than this), then vanish before the answer
            time.sleep(close_after)
            return b""
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                if length and len(body) >= length[0]:
                    break
        return b"".join(chunks)


def test_bad_inputs_get_4xx_an_event_each_and_the_canary_leaks_nowhere(t5_app, kafka_bootstrap, logs):
    key = t5_app.keys["initech"]
    port = t5_app.port
    cases = [  # (label, request kwargs, status, error_type)
        (
            "invalid json",
            dict(content=b'{"prompt": "' + CANARY.encode() + b'"', headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        ),
        (
            "not utf-8",
            dict(
                content=b'{"prompt": "\xff\xfe ' + CANARY.encode() + b'"}', headers={"content-type": "application/json"}
            ),
            400,
            "invalid_utf8",
        ),
        (
            "wrong content type",
            dict(content=CANARY.encode(), headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        ("missing prompt", dict(json={"max_new_tokens": 3}), 400, "invalid_prompt"),
        ("empty prompt", dict(json={"prompt": "   "}), 400, "invalid_prompt"),
        ("prompt wrong type", dict(json={"prompt": 42}), 400, "invalid_prompt"),
        ("not an object", dict(json=[CANARY]), 400, "invalid_json"),
        ("max_new_tokens zero", dict(json={"prompt": CANARY, "max_new_tokens": 0}), 400, "invalid_max_new_tokens"),
        (
            "max_new_tokens too big",
            dict(json={"prompt": CANARY, "max_new_tokens": 10_000}),
            400,
            "invalid_max_new_tokens",
        ),
        ("max_new_tokens string", dict(json={"prompt": CANARY, "max_new_tokens": "5"}), 400, "invalid_max_new_tokens"),
        ("max_new_tokens bool", dict(json={"prompt": CANARY, "max_new_tokens": True}), 400, "invalid_max_new_tokens"),
        ("declared body too large", dict(json={"prompt": CANARY + "x" * 5000}), 413, "body_too_large"),
    ]
    with httpx.Client(base_url=t5_app.base_url, timeout=30, headers=_auth(key)) as client:
        results = []
        for label, kwargs, status, err in cases:
            r = client.post("/v1/generate", **kwargs)
            results.append((label, r, status, err))

        def stream_body():  # chunked, no Content-Length: the limit must bite while streaming
            for _ in range(10):
                yield b'{"prompt": "' + CANARY.encode() + b"y" * 1000

        results.append(
            (
                "streamed body too large",
                client.post("/v1/generate", content=stream_body(), headers={"content-type": "application/json"}),
                413,
                "body_too_large",
            )
        )
        results.append(
            ("no key", httpx.post(t5_app.base_url + "/v1/generate", json={"prompt": CANARY}), 401, "invalid_api_key")
        )
        results.append(
            (
                "bad key",
                httpx.post(t5_app.base_url + "/v1/generate", json={"prompt": CANARY}, headers=_auth("ta_wrong")),
                401,
                "invalid_api_key",
            )
        )
        results.append(("unknown route", client.get("/v1/nothing"), 404, "not_found"))
        results.append(("wrong method", client.get("/v1/generate"), 405, "method_not_allowed"))
        results.append(
            ("chat without messages", client.post("/v1/chat/completions", json={"messages": []}), 400, "invalid_prompt")
        )
        ok = client.post("/v1/generate", json={"prompt": CANARY + " fine", "max_new_tokens": 4})
        assert ok.status_code == 200 and CANARY not in ok.text
    for label, r, status, err in results:
        assert r.status_code == status, (label, r.status_code, r.text)
        body = r.json()
        assert body["error"]["code"] == err and body["error"]["message"], label
        assert CANARY not in r.text, f"{label}: the error must not echo the prompt"

    # a client that sends a request and leaves before the answer: 499, tokens still accounted
    body = json.dumps({"prompt": CANARY + " gone", "max_new_tokens": 32}).encode()
    gone_id = "gone-" + uuid.uuid4().hex[:8]
    _raw_request(
        port,
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nX-Request-ID: {gone_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
        wait_response=False,
    )

    ids = [r.headers["x-request-id"] for _, r, _, _ in results] + [ok.headers["x-request-id"], gone_id]
    assert len(set(ids)) == len(ids)
    events = _events_for(t5_app, kafka_bootstrap, ids)
    assert sorted(events) == sorted(ids) and all(len(v) == 1 for v in events.values())
    for label, r, status, err in results:
        e = events[r.headers["x-request-id"]][0]
        assert (e["status_code"], e["error_type"]) == (status, err), label
        assert e["input_tokens"] == e["output_tokens"] == 0 and e["batch_id"] is None, label
    by_label = {label: events[r.headers["x-request-id"]][0] for label, r, _, _ in results}
    assert by_label["bad key"]["client_id"] == by_label["no key"]["client_id"] == "unauthenticated"
    assert by_label["missing prompt"]["client_id"] == "initech" and by_label["missing prompt"]["department"] == "ops"
    gone = events[gone_id][0]
    assert gone["status_code"] == 499 and gone["error_type"] == "client_disconnect"
    assert gone["input_tokens"] > 0 and gone["output_tokens"] > 0, "the model ran: its tokens are accounted"
    # the canary is in no message on the topic and no log line
    pairs = read_events(kafka_bootstrap, t5_app.topic, expect=0, timeout=10, settle=0.5)
    assert pairs and not any(CANARY.encode() in v or CANARY.encode() in (k or b"") for k, v in pairs)
    assert logs.lines and not any(CANARY in line for line in logs.lines)


def test_request_id_echo_and_metrics(t5_app):
    key = t5_app.keys["acme"]
    with httpx.Client(base_url=t5_app.base_url, timeout=30, headers=_auth(key)) as client:
        sane = client.post(
            "/v1/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"X-Request-ID": "abc-123.x"}
        )
        insane = client.post(
            "/v1/generate",
            json={"prompt": "hi", "max_new_tokens": 2},
            headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200},
        )
        assert sane.headers["x-request-id"] == "abc-123.x" and sane.json()["request_id"] == "abc-123.x"
        assert insane.headers["x-request-id"] != "bad id" and len(insane.headers["x-request-id"]) == 32
        assert client.get("/healthz").headers["x-request-id"]
        ready = client.get("/readyz").json()
        assert ready["model_loaded"] and ready["producer"] == "direct"
        text = client.get("/metrics").text
    model = t5_app.app.state.model_name
    assert f'gen_ai_server_request_duration_seconds_count{{model="{model}",status="200"}}' in text
    assert "client_id" not in text and "acme" not in text, "no tenant in /metrics"
    for name in [
        "events_produced_total",
        "events_failed_total",
        "events_spooled_total",
        "events_replayed_total",
        "events_dropped_total",
        "producer_queue_depth",
    ]:
        assert f"tokenaudit_{name}" in text, name
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert values["tokenaudit_events_produced_total"] > 0 and values["tokenaudit_model_ready"] == 1


def _scope(peer, xff=None):
    headers = [(b"x-forwarded-for", xff.encode())] if xff else []
    return {"client": (peer, 1234), "headers": headers}


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies():
    from tokenaudit.inference.identity import parse_networks

    trusted = parse_networks("10.0.0.0/8, 192.168.1.1")
    assert client_address(_scope("203.0.113.9", "1.2.3.4"), trusted) == "203.0.113.9", "untrusted peer: ignore XFF"
    assert client_address(_scope("10.1.1.1", "1.2.3.4, 10.2.2.2"), trusted) == "1.2.3.4"
    assert client_address(_scope("192.168.1.1", "5.6.7.8"), trusted) == "5.6.7.8"
    assert client_address(_scope("10.1.1.1", "spoofed, 9.9.9.9"), trusted) == "9.9.9.9", "right-most untrusted hop"
    assert client_address(_scope("10.1.1.1"), trusted) == "10.1.1.1"
    assert client_address(_scope("10.1.1.1", "not-an-ip"), []) == "10.1.1.1"
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        parse_networks("10.0.0.0/8,nonsense")


def test_decoder_only_model_in_development_mode(tmp_path, kafka_bootstrap, topic_name):
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    s = _settings(
        tmp_path,
        kafka_bootstrap,
        topic_name,
        cached_model("gpt2", load_settings().cache_dir),
        trusted_proxies="127.0.0.1",
    )
    app = create_app(s)
    with ThreadedServer(app) as server:
        server.wait_ready()
        tok = app.state.runner.tokenizer
        prompts = ["short one", "decoder only models pad on the left " * 12]
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            plain = client.post("/v1/generate", json={"prompt": prompts[0], "max_new_tokens": 5})
            proxied = client.post(
                "/v1/generate",
                json={"prompt": prompts[1], "max_new_tokens": 7},
                headers={"X-Forwarded-For": "198.51.100.7"},
            )
        # a model failure (inputs past GPT-2's 1024 positions, forced past the runner's cap):
        # a JSON 500 and its event, and the app keeps serving
        app.state.runner.max_input_tokens = 1100
        failed = httpx.post(
            server.base_url + "/v1/generate", json={"prompt": "x " * 1500, "max_new_tokens": 2}, timeout=60
        )
        app.state.runner.max_input_tokens = 64
        after = httpx.post(server.base_url + "/v1/generate", json={"prompt": "still fine", "max_new_tokens": 2})
        # a registry that appears while a bare app runs is enforced from then on, with no restart
        key = add_key(s.default_api_keys_file, "late", "ops")
        deadline = time.monotonic() + 5
        while (
            late := httpx.post(server.base_url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 1})
        ).status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.05)
        keyed = httpx.post(
            server.base_url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 1}, headers=_auth(key), timeout=30
        )
    assert late.status_code == 401 and late.json()["error"]["code"] == "invalid_api_key"
    assert keyed.status_code == 200
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert after.status_code == 200
    assert plain.status_code == proxied.status_code == 200
    ids = [plain.json()["request_id"], proxied.json()["request_id"]]
    all_ids = ids + [failed.headers["x-request-id"], after.headers["x-request-id"]]
    events = {e["request_id"]: e for e in decode_events(read_events(kafka_bootstrap, topic_name, expect=4))}
    assert set(all_ids) <= set(events)
    assert (events[all_ids[2]]["status_code"], events[all_ids[2]]["error_type"]) == (500, "generation_failed")
    a, b = events[ids[0]], events[ids[1]]
    assert a["client_id"] == a["client_ip"] == "127.0.0.1" and a["api_key_id"] is None
    assert b["client_id"] == "198.51.100.7", "X-Forwarded-For from a trusted proxy names the client"
    assert a["input_tokens"] == len(tok(prompts[0]).input_ids) and not a["truncated"]
    assert (
        b["truncated"] and b["input_tokens"] == 64 and b["untruncated_input_tokens"] == len(tok(prompts[1]).input_ids)
    )
    assert (a["output_tokens"], b["output_tokens"]) == (
        plain.json()["usage"]["output_tokens"],
        proxied.json()["usage"]["output_tokens"],
    )
    assert 0 < a["output_tokens"] <= 5 and 0 < b["output_tokens"] <= 7
