"""The ClickHouse sink: idempotent batched writes (a replay changes no query result, a
lower rollup version never wins, late deltas merge once) and the `tokenaudit sink` process
(readiness via the usage API's /healthz, graceful SIGTERM that flushes and commits)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.support import synth
from tests.support.sink_process import metric, sink_env, sink_settings, start_sink
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.schemas import ANOMALY, ROLLUP, SAMPLED, encode
from tokenaudit.sinks.sink import Sink

pytestmark = pytest.mark.timeout(120)
SINK_MESSAGES = "tokenaudit_sink_messages_total"
WS = int(time.time() * 1000) // 60_000 * 60_000  # recent: the TTLs (30 days for sampled) apply


def rollup(client: str, requests: int, ws: int = WS, delta_id: str | None = None) -> dict:
    return {
        "client_id": client,
        "department": "eng",
        "model": "m",
        "window_start": ws,
        "window_end": ws + 60_000,
        "requests": requests,
        "errors": 0,
        "input_tokens": 10 * requests,
        "output_tokens": 5 * requests,
        "total_tokens": 15 * requests,
        "latency_ms_sum": 2.0 * requests,
        "latency_ms_max": 2.0,
        "max_input_tokens": 10,
        "truncated": 0,
        "version": requests,
        "delta_id": delta_id,
        "applied_offset": int(delta_id.rsplit(":", 1)[1]) if delta_id else 100,
    }


def sampled(request_id: str) -> dict:
    e = synth.event(request_id, WS + 5, "c1", "m", input_tokens=300)
    return {
        "request_id": request_id,
        "ts": e["ts"],
        "client_id": "c1",
        "department": "eng",
        "model": "m",
        "input_tokens": 300,
        "output_tokens": 10,
        "total_tokens": 310,
        "latency_ms": 20.0,
        "status_code": 200,
        "sample_reason": "top_fraction",
        "threshold": 250.0,
    }


def anomaly(aid: str) -> dict:
    return {
        "anomaly_id": aid,
        "ts": WS,
        "client_id": "c1",
        "department": "eng",
        "model": "m",
        "rule": "error_rate",
        "severity": "warning",
        "observed": 0.9,
        "threshold": 0.5,
        "window_start": WS,
        "request_id": None,
        "message": "9 of 10 requests failed",
    }


def _settings(bootstrap: str, tag: str, **kw):
    return sink_settings(bootstrap, tag, sink_batch_rows=50, sink_batch_seconds=0.3, **kw)


def _produce_all(s) -> int:
    msgs = []
    for r in [rollup("c1", 3), rollup("c1", 5), rollup("c1", 4), rollup("c2", 2)]:  # 4 arrives after 5
        msgs.append((s.topic_rollups, r["client_id"].encode(), encode(ROLLUP, r)))
    for d in ["u:0:7", "u:0:8", "u:0:7"]:  # a very late delta for c3's retired window, one replayed
        msgs.append((s.topic_rollups, b"c3", encode(ROLLUP, rollup("c3", 1, delta_id=d))))
    for rid in ["a", "b", "a"]:
        msgs.append((s.topic_sampled, b"c1", encode(SAMPLED, sampled(rid))))
    for aid in ["x1", "x1", "x2"]:
        msgs.append((s.topic_anomalies, b"c1", encode(ANOMALY, anomaly(aid))))
    msgs.append((s.topic_anomalies, b"c1", b"not avro"))
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    for topic, key, value in msgs:
        producer.produce(topic, key=key, value=value)
        producer.flush(10)  # one at a time: keeps the order above across topics
    return len(msgs)


def _expected_state(query) -> None:
    rows = {
        r["client_id"]: r
        for r in query(
            "SELECT client_id, requests, version, total_tokens FROM {db}.usage_rollup FINAL ORDER BY client_id"
        )
    }
    assert {c: (r["requests"], r["total_tokens"]) for c, r in rows.items()} == {
        "c1": (5, 75),
        "c2": (2, 30),
        "c3": (2, 30),
    }
    assert [r["request_id"] for r in query("SELECT request_id FROM {db}.usage_sampled FINAL ORDER BY request_id")] == [
        "a",
        "b",
    ]
    assert [r["anomaly_id"] for r in query("SELECT anomaly_id FROM {db}.anomalies FINAL ORDER BY anomaly_id")] == [
        "x1",
        "x2",
    ]


def test_sink_is_idempotent_and_replays_change_nothing(kafka_bootstrap, ch_client, ch_database):
    tag = f"s{uuid.uuid4().hex[:8]}"
    s = _settings(kafka_bootstrap, tag)
    ensure_topics(kafka_bootstrap, {s.topic_rollups: 2, s.topic_sampled: 2, s.topic_anomalies: 2, s.topic_dlq: 1})
    store = Store(ch_client, ch_database)
    store.migrate()
    _produce_all(s)
    for run in range(2):  # the second run is a full replay by a fresh consumer group
        sink = Sink(s, store, group_id=f"{tag}-g{run}")
        stop = threading.Event()
        t = threading.Thread(target=sink.run, args=(stop,))
        t.start()
        deadline = time.monotonic() + 30
        while sink.counters.messages < 14 and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        t.join(30)
        assert sink.counters.messages == 14 and sink.counters.undecodable == 1
        _expected_state(store.query)
    assert sink.counters.deltas_replayed == 3  # all three deltas were already in the row


def test_sink_process_ready_then_sigterm_flushes(kafka_bootstrap, tmp_path):
    tag = f"p{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = sink_env(
        kafka_bootstrap,
        str(tmp_path / "data"),
        tag,
        port,
        TOKENAUDIT_SINK_BATCH_ROWS="100000",
        TOKENAUDIT_SINK_BATCH_SECONDS="60",
    )
    s = _settings(kafka_bootstrap, tag)
    ensure_topics(kafka_bootstrap, {s.topic_rollups: 2, s.topic_sampled: 2, s.topic_anomalies: 2, s.topic_dlq: 1})
    proc = start_sink(env, port)
    try:
        produced = _produce_all(s)
        # every record consumed, but the batch (60 s / 100k rows) is not due: SIGTERM must flush it
        deadline = time.monotonic() + 60
        while (metric(port, SINK_MESSAGES) or 0) < produced:
            assert time.monotonic() < deadline, (
                f"the sink consumed {(metric(port, SINK_MESSAGES) or 0)} of {produced} records"
            )
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The store belongs to no process now; read it from a fresh one (one chDB store per process).
    script = (
        "import json,sys; from tokenaudit.infra.store import Store; from tokenaudit.settings import get_settings;"
        "st=Store.from_settings(get_settings(), migrate_schema=False);"
        "print(json.dumps({t: st.query(f'SELECT count() AS n FROM {{db}}.{t} FINAL')[0]['n'] "
        "for t in ['usage_rollup','usage_sampled','anomalies']}))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"usage_rollup": 3, "usage_sampled": 2, "anomalies": 2}
