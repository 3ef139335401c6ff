"""One bad request hurts only itself, against the real model and the real broker: a lone
surrogate inside a batch of honest requests, a flood beyond the queue bound, a 5 KB path;
metrics that name no client (on the API port and the local metrics port); a fuzz of bodies,
headers and query strings (status < 500, the OpenAI error shape); a revoked or expired key
refused by the inference app and the usage API within 2 s. One app for the whole module."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from datetime import UTC

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.apps import ThreadedServer, cached_model, decode_events, read_events
from tests.support.asgi import json_body, run
from tokenaudit.inference.app import create_app
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.keys import add_key, key_id_of
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas.records import MAX_EVENT_PATH
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

MAX_QUEUE = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory, kafka_bootstrap):
    tmp = tmp_path_factory.mktemp("isolation")
    keys_file = tmp / "keys.toml"
    keys = {name: add_key(keys_file, name, dept) for name, dept in [("acme", "research"), ("globex", "sales")]}
    topic = f"test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, {topic: 2})
    s = load_settings(
        data_dir=tmp / "data",
        kafka_bootstrap=kafka_bootstrap,
        topic_usage=topic,
        xla=False,
        model=str(cached_model("t5", load_settings().cache_dir)),
        max_input_tokens=64,
        batch_max_size=4,
        batch_max_wait_ms=30,
        max_queue=MAX_QUEUE,
        queue_timeout_seconds=60,
        max_new_tokens_limit=8,
        default_max_new_tokens=2,
        kafka_partitions=2,
        api_keys_file=keys_file,
        metrics_port=free_port(),
    )
    app = create_app(s)
    with ThreadedServer(app) as server:
        server.wait_ready()
        server.app, server.keys, server.topic, server.settings = app, keys, topic, s
        yield server


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _events(server, bootstrap, request_ids) -> dict[str, list[dict]]:
    want = set(request_ids)
    pairs = read_events(bootstrap, server.topic, expect=0, timeout=30, settle=0.3)
    deadline = time.monotonic() + 60
    while not want <= {e["request_id"] for e in decode_events(pairs)} and time.monotonic() < deadline:
        pairs = read_events(bootstrap, server.topic, expect=len(pairs) + 1, timeout=5, settle=0.3)
    by_id: dict[str, list[dict]] = {}
    for e in decode_events(pairs):
        if e["request_id"] in want:
            by_id.setdefault(e["request_id"], []).append(e)
    return by_id


async def _post_all(base: str, bodies: list[bytes], key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *[
                client.post(
                    "/v1/generate",
                    content=body,
                    headers={
                        **_auth(key),
                        "content-type": "application/json",
                        "x-request-id": f"r{i}-{uuid.uuid4().hex[:8]}",
                    },
                )
                for i, body in enumerate(bodies)
            ]
        )


def test_a_lone_surrogate_fails_alone_inside_a_batch_of_honest_requests(served, kafka_bootstrap):
    honest = [
        json.dumps({"prompt": f"honest request {i} about licences", "max_new_tokens": 4}).encode()
        for i in range(MAX_QUEUE - 2)
    ]  # within the queue bound: this test is not about back-pressure
    honest[1] = json.dumps({"prompt": "a long prompt to be cut " * 40, "max_new_tokens": 4}).encode()
    bad = b'{"prompt": "looks fine \\ud800 until the tokenizer sees it", "max_new_tokens": 4}'
    bodies = honest[:3] + [bad] + honest[3:]
    runner = served.app.state.runner
    backend, threads = runner._backend, Counter()

    class Counting:  # every call into the Rust tokenizer, by the thread that made it
        def encode_batch(self, *args, **kwargs):
            threads[threading.current_thread().name.split("_")[0]] += 1
            return backend.encode_batch(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(backend, name)

    runner._backend = Counting()
    try:
        responses = asyncio.run(_post_all(served.base_url, bodies, served.keys["acme"]))
    finally:
        runner._backend = backend
    assert threads == {"tokenize": len(bodies)}, "each prompt tokenized once, in the tokenizer pool only"
    assert responses[1].json()["usage"]["truncated"] is True
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 3 + [400] + [200] * (len(bodies) - 4), [r.text for r in responses]
    err = responses[3].json()["error"]
    assert err["code"] == "invalid_prompt" and err["type"] == "invalid_request_error" and err["param"] == "prompt"
    events = _events(served, kafka_bootstrap, [r.headers["x-request-id"] for r in responses])
    assert all(len(v) == 1 for v in events.values()) and len(events) == len(bodies)
    bad_event = events[responses[3].headers["x-request-id"]][0]
    assert (bad_event["status_code"], bad_event["error_type"], bad_event["client_id"]) == (
        400,
        "invalid_prompt",
        "acme",
    )
    assert bad_event["batch_id"] is None and bad_event["input_tokens"] == 0 and bad_event["prompt_digest"]
    ok = [events[r.headers["x-request-id"]][0] for r in responses if r.status_code == 200]
    assert all(e["status_code"] == 200 and e["output_tokens"] > 0 for e in ok)
    assert max(e["batch_size"] for e in ok) > 1, "honest requests still share batches"


def test_a_flood_beyond_the_queue_bound_gets_200_or_503_and_an_event_each(served, kafka_bootstrap):
    n = 40
    bodies = [
        json.dumps({"prompt": f"flood {i} " + "words " * (i % 7), "max_new_tokens": 8}).encode() for i in range(n)
    ]
    responses = asyncio.run(_post_all(served.base_url, bodies, served.keys["globex"]))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and statuses[200] >= 1 and statuses[503] >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            err = r.json()["error"]
            assert err["code"] == "queue_full" and err["type"] == "server_error" and err["message"]
            assert int(r.headers["retry-after"]) >= 1
    events = _events(served, kafka_bootstrap, [r.headers["x-request-id"] for r in responses])
    assert len(events) == n and all(len(v) == 1 for v in events.values()), "one event per request"
    for r in responses:
        e = events[r.headers["x-request-id"]][0]
        assert e["status_code"] == r.status_code and e["client_id"] == "globex"
        if r.status_code == 503:
            assert e["error_type"] == "queue_full" and e["batch_id"] is None and e["output_tokens"] == 0
        else:
            assert e["error_type"] is None and e["output_tokens"] > 0


def test_an_events_path_is_capped(served, kafka_bootstrap):
    long_path = "/v1/" + "x" * 5000
    r = httpx.get(served.base_url + long_path, headers=_auth(served.keys["acme"]), timeout=30)
    anonymous = httpx.get(served.base_url + long_path, timeout=30)
    assert r.status_code == 404 and anonymous.status_code == 401
    events = _events(served, kafka_bootstrap, [r.headers["x-request-id"], anonymous.headers["x-request-id"]])
    for got in events.values():
        assert got[0]["path"] == long_path[:MAX_EVENT_PATH] and len(got[0]["path"]) == MAX_EVENT_PATH


def test_metrics_name_no_client_and_keep_bounded_label_sets(served):
    from prometheus_client.parser import text_string_to_metric_families

    for i in range(3):  # more callers and more requests must not add series
        httpx.post(
            served.base_url + "/v1/generate",
            json={"prompt": f"metrics {i}"},
            headers=_auth(served.keys["acme" if i % 2 else "globex"]),
            timeout=60,
        )
    api = httpx.get(served.base_url + "/metrics", timeout=10).text
    local = httpx.get(f"http://127.0.0.1:{served.settings.metrics_port}/metrics", timeout=10).text
    for text in (api, local):
        assert "client_id" not in text and "acme" not in text and "globex" not in text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in (
            "gen_ai_server_request_duration_seconds",
            "gen_ai_client_token_usage",
            "tokenaudit_queue_time_seconds",
        ):
            assert families[name].type == "histogram", name
            for sample in families[name].samples:
                assert set(sample.labels) - {"le"} <= {"model", "status", "gen_ai_token_type"}, sample
        types = {s.labels["gen_ai_token_type"] for s in families["gen_ai_client_token_usage"].samples}
        assert types == {"input", "output"}
        ok = [
            s
            for s in families["gen_ai_server_request_duration_seconds"].samples
            if s.name.endswith("_count") and s.labels["status"] == "200"
        ]
        assert len(ok) == 1 and ok[0].value >= 3 and ok[0].labels["model"] == served.app.state.model_name
        assert families["tokenaudit_events_enqueued"].samples[0].value > 0
        assert "tokenaudit_events_dropped" in families and families["tokenaudit_model_ready"].samples[0].value == 1
    series = {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(api) for s in f.samples}
    statuses = {s[1] for s in series if s[0] == "gen_ai_server_request_duration_seconds_count"}
    assert len(statuses) <= 8, "one series per (model, status): bounded by the statuses the app answers"


# --- fuzz: bodies, headers, query strings --------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=30), JSON, st.lists(st.text(max_size=10), max_size=2)),
        "max_new_tokens": st.one_of(st.integers(-3, 12), st.integers(), JSON, st.floats()),
        "max_tokens": st.one_of(st.integers(0, 10), JSON),
        "messages": st.one_of(
            JSON,
            st.lists(st.fixed_dictionaries({"role": st.text(max_size=6), "content": st.text(max_size=20)}), max_size=3),
        ),
        "stream": JSON,
        "stream_options": JSON,
    },
)
BODIES = st.one_of(
    FIELDS.map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),
    st.integers(1, 60000).map(lambda n: b'{"prompt": "x", "max_new_tokens": ' + b"9" * n + b"}"),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
HEADER_VALUE = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"application/json", b"text/plain", b"", b"\xb2", b"99999999999999999999", b"-1", b"1e3"]),
)


def _fuzz_headers(key: str, *, auth_ok: bool):
    auth = (
        st.just(f"Bearer {key}".encode())
        if auth_ok
        else st.one_of(
            st.binary(max_size=30),
            st.just(b"Bearer"),
            st.just(("Bearer " + "\u00ff" * 3).encode("latin-1")),
            st.just(f"bearer   {key}  ".encode()),
        )
    )
    ctype = st.just(b"application/json") if auth_ok else st.one_of(st.just(b"application/json"), HEADER_VALUE)
    return st.fixed_dictionaries(
        {"content-type": ctype, "authorization": auth},
        optional={"content-length": HEADER_VALUE, "x-request-id": HEADER_VALUE, "x-forwarded-for": HEADER_VALUE},
    )


def _assert_openai_error(status: int, raw: bytes) -> None:
    assert status < 500 or status == 503, (status, raw[:300])
    if status >= 400:
        err = json_body(raw)["error"]
        assert set(err) == {"type", "message", "param", "code"} and err["message"] and err["code"], err
    if status == 503:  # only back-pressure may answer 503 here, never a crash
        assert json_body(raw)["error"]["code"] in ("queue_full", "queue_timeout"), raw


def _send(app, method, path, body, headers, query=b""):
    status, _, raw = run(
        app, method, path, query=query, body=body, headers=[(k.encode(), v) for k, v in headers.items()]
    )
    _assert_openai_error(status, raw)
    return status


def test_fuzzed_bodies_never_get_a_500(served):
    app, key = served.app, served.keys["acme"]
    seen: Counter = Counter()
    ok_headers = {"content-type": b"application/json", "authorization": f"Bearer {key}".encode()}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=st.sampled_from(["/v1/generate", "/v1/completions", "/v1/chat/completions"]),
        body=BODIES,
        headers=_fuzz_headers(key, auth_ok=True),
    )
    @example(path="/v1/generate", body=b"[" * 100000, headers=ok_headers)
    @example(path="/v1/generate", body=b'{"prompt": "x", "max_new_tokens": ' + b"1" * 5000 + b"}", headers=ok_headers)
    @example(path="/v1/generate", body=b'{"prompt": "x"}', headers={**ok_headers, "content-length": "\u00b2".encode()})
    @example(
        path="/v1/chat/completions", body=b'{"messages": [{"role": "user", "content": "\\udfff"}]}', headers=ok_headers
    )
    def check(path, body, headers):
        seen[_send(app, "POST", path, body, headers)] += 1

    check()
    assert seen[400] > 30 and seen[200] + seen[503] >= 1, seen  # the fuzz reached validation and the model


def test_fuzzed_headers_methods_paths_and_queries_never_get_a_500(served):
    app, key = served.app, served.keys["acme"]
    paths = st.one_of(
        st.sampled_from(["/v1/generate", "/v1/models", "/healthz", "/readyz", "/metrics", "/v1/nothing"]),
        st.text(max_size=30).map(lambda t: "/" + t),
    )
    seen: Counter = Counter()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=paths,
        method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
        body=BODIES,
        headers=st.one_of(_fuzz_headers(key, auth_ok=False), _fuzz_headers(key, auth_ok=True)),
        query=st.binary(max_size=30),
    )
    @example(
        path="/v1/nothing",
        method="GET",
        body=b"",
        headers={"authorization": f"Bearer {key}".encode(), "content-type": b""},
        query=b"\x80",
    )
    def check(path, method, body, headers, query):
        seen[_send(app, method, path, body, headers, query)] += 1

    check()
    assert {401, 404, 405} <= set(seen), seen


# --- keys: revoked or expired, refused everywhere within 2 s -----------------------------------
def test_revoked_or_expired_keys_get_401_on_the_app_and_the_usage_api_within_2s(
    served, ch_client, ch_database, monkeypatch
):
    import threading

    import uvicorn

    from tokenaudit.cli import main
    from tokenaudit.infra.store import Store
    from tokenaudit.reports.usage_api import create_app as usage_app
    from tokenaudit.settings import get_settings

    keys_file = served.settings.api_keys_file
    store = Store(ch_client, ch_database)
    store.migrate()
    api_port = free_port()
    api = uvicorn.Server(
        uvicorn.Config(
            usage_app(store, served.settings), host="127.0.0.1", port=api_port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=api.run, daemon=True)
    thread.start()
    monkeypatch.setenv("TOKENAUDIT_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("TOKENAUDIT_DATA_DIR", str(served.settings.data_dir))
    get_settings.cache_clear()
    try:
        deadline = time.monotonic() + 20
        while not api.started and time.monotonic() < deadline:
            time.sleep(0.02)
        doomed = add_key(keys_file, "doomed", "ops")
        short = add_key(keys_file, "short", "ops", expires=_in(4))  # stored to the second
        targets = {
            "inference": (served.base_url + "/v1/models", {}),
            "usage API": (f"http://127.0.0.1:{api_port}/v1/top", {"since": "1h"}),
        }

        def status(target: str, raw: str) -> int:
            url, params = targets[target]
            return httpx.get(url, params=params, headers=_auth(raw), timeout=10).status_code

        assert {status(t, doomed) for t in targets} == {status(t, short) for t in targets} == {200}
        revoked = CliRunner().invoke(main, ["keys", "revoke", key_id_of(doomed)])
        assert revoked.exit_code == 0, revoked.output
        revoked_at = time.monotonic()
        delays = {t: _until_401(lambda t=t: status(t, doomed), revoked_at) for t in targets}
        expires_at = time.monotonic() + max(0.0, _parse_left(short, keys_file))
        expiry = {t: _until_401(lambda t=t: status(t, short), expires_at) for t in targets}
    finally:
        api.should_exit = True
        thread.join(10)
        get_settings.cache_clear()
    print(f"\nRESULT key_revocation_delay_s={max(delays.values()):.3f} key_expiry_delay_s={max(expiry.values()):.3f}")
    assert max(delays.values()) < 2.0 and max(expiry.values()) < 2.0, (delays, expiry)


def _in(seconds: float):
    from datetime import datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=seconds)


def _parse_left(raw: str, keys_file) -> float:
    from tokenaudit.infra.keys import KeyRegistry

    return KeyRegistry.load(keys_file).lookup(raw).expires_at - time.time()


def _until_401(probe, since: float, limit: float = 5.0) -> float:
    """Seconds from ``since`` until ``probe()`` answers 401 (polled, never a fixed sleep)."""
    while time.monotonic() < since:
        time.sleep(0.01)
    while probe() != 401:
        if time.monotonic() - since > limit:
            return limit
        time.sleep(0.02)
    return time.monotonic() - since
