"""The whole pipeline as a user runs it: `up` starts sink, worker and inference app as
background processes (against the session's real broker), HTTP requests go in, and
`tokenaudit usage --format json` must give exact per-client totals — also after the worker
was SIGKILLed mid-run and restarted. Then `up`/`down` idempotence and a busy port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tokenaudit.infra.procutil import free_port, pid_alive
from tokenaudit.settings import get_settings, load_settings

pytestmark = [pytest.mark.broker, pytest.mark.store, pytest.mark.model, pytest.mark.chaos]

CLI = [sys.executable, "-m", "tokenaudit.cli"]


@pytest.fixture(scope="module")
def model_path():
    from tests.support.apps import cached_model

    return cached_model("t5", load_settings().cache_dir)


@pytest.fixture
def pipeline_env(tmp_path, kafka_bootstrap, schema_registry_url, model_path, monkeypatch):
    env = {
        "TOKENAUDIT_DATA_DIR": str(tmp_path / "data"),
        "TOKENAUDIT_KAFKA_BOOTSTRAP": kafka_bootstrap,
        # the session's registry: every topic in the Confluent wire format, end to end
        "TOKENAUDIT_SCHEMA_REGISTRY_URL": schema_registry_url,
        "TOKENAUDIT_MODEL": str(model_path),
        "TOKENAUDIT_XLA": "false",
        "TOKENAUDIT_HTTP_PORT": str(free_port()),
        "TOKENAUDIT_USAGE_API_PORT": str(free_port()),
        "TOKENAUDIT_WORKER_WEB_PORT": str(free_port()),
        "TOKENAUDIT_WINDOW_SECONDS": "2",
        "TOKENAUDIT_GRACE_SECONDS": "1",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "2",
        # fresh topics and group per test: no other test's events or offsets
        "TOKENAUDIT_TOPIC_USAGE": f"e2e-usage-{tmp_path.name[-12:]}",
        "TOKENAUDIT_TOPIC_ROLLUPS": f"e2e-rollups-{tmp_path.name[-12:]}",
        "TOKENAUDIT_TOPIC_SAMPLED": f"e2e-sampled-{tmp_path.name[-12:]}",
        "TOKENAUDIT_TOPIC_ANOMALIES": f"e2e-anomalies-{tmp_path.name[-12:]}",
        "TOKENAUDIT_WORKER_ID": f"e2e-worker-{tmp_path.name[-12:]}",
        "TOKENAUDIT_SINK_GROUP_ID": f"e2e-sink-{tmp_path.name[-12:]}",
        "TOKENAUDIT_KAFKA_PARTITIONS": "2",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield env
    subprocess.run(CLI + ["down"], capture_output=True, text=True, timeout=180)
    get_settings.cache_clear()


def cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"tokenaudit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def add_key(client: str, department: str) -> str:
    return cli("keys", "add", "--client", client, "--department", department).stdout.strip().split()[0]


def send(base: str, keys: dict[str, str], n: int, expected: dict, offset: int) -> None:
    def one(i: int) -> None:
        client = list(keys)[i % len(keys)]
        words = " ".join(f"w{(i * 7 + j) % 13}" for j in range(3 + i % 11))
        r = httpx.post(
            f"{base}/v1/generate",
            json={"prompt": words, "max_new_tokens": 2 + i % 5},
            headers={"Authorization": f"Bearer {keys[client]}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        with_lock = expected[client]
        with_lock["requests"] += 1
        with_lock["input_tokens"] += usage["input_tokens"]
        with_lock["output_tokens"] += usage["output_tokens"]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(offset, offset + n)))


def long_document(chars: int = 10_000, seed: int = 15) -> str:
    """A document far longer than the model's input limit (512 tokens): words of random letters,
    as in the issue's report (10,000 characters, about 4,600 T5 tokens)."""
    import random

    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return " ".join(words)[:chars]


def usage_json() -> dict[str, dict]:
    rows = json.loads(cli("usage", "--since", "1h", "--by", "client", "--format", "json").stdout)
    return {r["client_id"]: r for r in rows}


def test_http_to_usage_exact_across_worker_kill(pipeline_env):
    up = cli("up")
    assert "tokenaudit is up" in up.stdout
    s = load_settings()
    base = f"http://{s.http_host}:{s.http_port}"
    keys = {
        "acme-web": add_key("acme-web", "sales"),
        "acme-etl": add_key("acme-etl", "data"),
        "globex": add_key("globex", "research"),
    }
    expected: dict[str, dict] = defaultdict(lambda: {"requests": 0, "input_tokens": 0, "output_tokens": 0})
    # The running app picks up the new keys (its registry follows the file): wait until an
    # unknown key is refused (keyed mode) and each new key is admitted. A refused call is billed
    # to no client of ours; an admitted one is a request of its client (no tokens).
    deadline = time.monotonic() + 30
    for client, key in [("", "sk-ta-unknown"), *keys.items()]:
        while True:
            status = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
            if status == (200 if client else 401):
                break
            assert time.monotonic() < deadline, f"the inference app never took up the new keys ({client}: {status})"
            time.sleep(0.1)
        if client:
            expected[client]["requests"] += 1
    send(base, keys, 30, expected, 0)
    # The seed's alert on default settings: a 10,000-character document is truncated to 512
    # tokens for the model, and the input_tokens rule (threshold 2048) reads what was sent.
    long = httpx.post(
        f"{base}/v1/generate",
        json={"prompt": long_document(), "max_new_tokens": 2},
        headers={"Authorization": f"Bearer {keys['globex']}", "X-Request-ID": "long-document-1"},
        timeout=120,
    )
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["input_tokens"] == 512
    expected["globex"]["requests"] += 1
    expected["globex"]["input_tokens"] += 512
    expected["globex"]["output_tokens"] += long.json()["usage"]["output_tokens"]

    worker_pid = int((s.run_dir / "worker.pid").read_text())
    os.kill(worker_pid, signal.SIGKILL)
    send(base, keys, 30, expected, 30)
    restarted = cli("up")
    assert "worker" in restarted.stdout and "ready" in restarted.stdout
    assert "inference  already running" in restarted.stdout

    deadline = time.monotonic() + 120
    got = {}
    while time.monotonic() < deadline:
        got = usage_json()
        if all(got.get(c, {}).get("requests", 0) >= e["requests"] for c, e in expected.items()):
            break
        time.sleep(1)
    # any double count would show up as more than expected: `verify` (topic vs ClickHouse, per
    # client and hour) says when the store holds every event on the topic exactly once
    deadline = time.monotonic() + 90
    while (checked := cli("verify", "--since", "1h", "--format", "json", check=False)).returncode != 0 or json.loads(
        checked.stdout
    ).get("pending"):
        assert time.monotonic() < deadline, f"verify never agreed:\n{checked.stdout}\n{checked.stderr}"
        time.sleep(1)
    got = usage_json()
    for client, e in expected.items():
        row = got[client]
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (
            e["requests"],
            e["input_tokens"],
            e["output_tokens"],
        ), client
        assert row["total_tokens"] == e["input_tokens"] + e["output_tokens"]
    assert got["globex"]["truncated"] == 1
    deadline = time.monotonic() + 60  # anomalies travel on their own topic: wait for the row
    while not (
        fired := [
            a
            for a in json.loads(cli("anomalies", "--since", "1h", "--format", "json").stdout)
            if a["rule"] == "input_tokens"
        ]
    ):
        assert time.monotonic() < deadline, "the input_tokens anomaly never reached ClickHouse"
        time.sleep(0.5)
    found = fired
    assert [(a["client_id"], a["request_id"], a["threshold"]) for a in fired] == [
        ("globex", "long-document-1", 2048.0)
    ], found
    assert fired[0]["observed"] > 4000, fired  # the untruncated length, not the 512 fed
    # the ledger: every request findable (verify above already counted its events per hour)
    (ledger_row,) = json.loads(cli("request", "long-document-1", "--format", "json").stdout)
    assert (ledger_row["client_id"], ledger_row["input_tokens"], ledger_row["truncated"]) == ("globex", 512, True)
    assert ledger_row["untruncated_input_tokens"] == fired[0]["observed"]
    for client, e in expected.items():
        listed = json.loads(cli("requests", "--since", "1h", "--client", client, "--format", "json").stdout)
        assert len(listed) == e["requests"], client
    # latency percentiles over every request, from the rollups' histograms
    latency = [  # (the refused probe with an unknown key is a request too, of no client of ours)
        r for r in json.loads(cli("latency", "--since", "1h", "--format", "json").stdout) if r["client_id"] in expected
    ]
    assert sum(r["requests"] for r in latency) == sum(e["requests"] for e in expected.values())
    assert all(r["input_tokens"] != "not covered" and r["p50_latency_ms"] <= r["p99_latency_ms"] for r in latency)


def _an_event_is_confluent_with_cloudevents(s) -> None:
    """One request (refused without a key: still an event) and its event on the topic: magic
    byte 0 and the registry id, CloudEvents headers."""
    from confluent_kafka import Consumer

    httpx.post(f"http://{s.http_host}:{s.http_port}/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
    consumer = Consumer(
        {"bootstrap.servers": s.kafka_bootstrap, "group.id": "e2e-peek", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([s.topic_usage])
    try:
        deadline = time.monotonic() + 60
        msg = None
        while msg is None or msg.error():
            assert time.monotonic() < deadline, "the event never reached the topic"
            msg = consumer.poll(0.5)
    finally:
        consumer.close()
    assert msg.value()[:1] == b"\x00" and len(msg.value()) > 5
    headers = dict(msg.headers())
    assert headers["ce_specversion"] == b"1.0" and headers["content-type"] == b"application/avro"
    assert headers["ce_type"] == b"io.tokenaudit.TokenUsageEvent" and headers["ce_source"].startswith(b"tokenaudit/")


def test_up_twice_down_twice_and_busy_port(pipeline_env, monkeypatch):
    # no registry configured: `up` starts the local one (on free ports) and hands it to the services
    monkeypatch.delenv("TOKENAUDIT_SCHEMA_REGISTRY_URL")
    monkeypatch.setenv("TOKENAUDIT_REGISTRY_PORT", str(free_port()))
    monkeypatch.setenv("TOKENAUDIT_REGISTRY_MANAGEMENT_PORT", str(free_port()))
    get_settings.cache_clear()
    s = load_settings()
    first = cli("up")
    assert "registry   started" in first.stdout, first.stdout
    registry_pid = int((s.data_dir / "registry" / "registry.pid").read_text())
    pids = {name: int((s.run_dir / f"{name}.pid").read_text()) for name in ("sink", "worker", "inference")}
    _an_event_is_confluent_with_cloudevents(s)
    second = cli("up")
    assert "registry   already running" in second.stdout
    for name in pids:
        assert f"{name:<10} already running" in second.stdout
        assert int((s.run_dir / f"{name}.pid").read_text()) == pids[name]
    assert "nothing was running" not in cli("down").stdout
    assert not any(pid_alive(p) for p in [*pids.values(), registry_pid]), "down must stop every process"
    assert "nothing was running" in cli("down").stdout

    with socket.socket() as sock:  # someone else holds the inference port
        sock.bind((s.http_host, s.http_port))
        sock.listen()
        busy = cli("up", check=False)
    assert busy.returncode == 1
    assert f"port {s.http_port}" in busy.stderr and "already in use" in busy.stderr
    assert not list(s.run_dir.glob("*.pid")), "a failed up leaves no pid files"
    for name in ("sink", "worker"):
        started = [ln for ln in busy.stdout.splitlines() if ln.startswith(name) and "pid" in ln]
        pid = int(started[0].rsplit("pid ", 1)[1].rstrip(")"))
        assert not pid_alive(pid), f"{name} left running after a failed up"
    assert first.returncode == 0
