"""Worker + sink against a real broker and chDB: rollups equal the ground truth of the distinct
events exactly, also when events reach the topic two and three times (copies interleaved, after
a SIGKILL, and after their window closed), when the worker is SIGKILLed at random points, when
one of two workers dies, and when a fresh worker group replays the whole topic (no duplicate
anomalies or rows); poison never stops the worker."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.support import synth
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.schemas import EVENT, encode
from tokenaudit.settings import load_settings
from tokenaudit.sinks.sink import Sink
from tokenaudit.streams.app import ensure_worker_topics
from tokenaudit.streams.processor import Outputs, Processor
from tokenaudit.streams.state import MemoryState

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]  # SIGKILLs workers; broker and store by fixture

WINDOW_MS = 2000
T0 = 1_750_000_000_000  # fixed event-time origin (ms)


def _env(bootstrap: str, tag: str, data_dir: Path, worker_id: str) -> dict[str, str]:
    return {
        "TOKENAUDIT_KAFKA_BOOTSTRAP": bootstrap,
        "TOKENAUDIT_TOPIC_USAGE": f"{tag}-usage",
        "TOKENAUDIT_TOPIC_ROLLUPS": f"{tag}-rollups",
        "TOKENAUDIT_TOPIC_SAMPLED": f"{tag}-sampled",
        "TOKENAUDIT_TOPIC_ANOMALIES": f"{tag}-anomalies",
        "TOKENAUDIT_TOPIC_DLQ": f"{tag}-dlq",
        "TOKENAUDIT_WORKER_ID": worker_id,
        "TOKENAUDIT_WINDOW_SECONDS": "2",
        "TOKENAUDIT_GRACE_SECONDS": "1",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "1",
        "TOKENAUDIT_LATE_RETENTION_SECONDS": "6",
        "TOKENAUDIT_WORKER_SESSION_TIMEOUT": "6",
        "TOKENAUDIT_WORKER_BATCH_SIZE": "2000",
        "TOKENAUDIT_KAFKA_PARTITIONS": "4",
        "TOKENAUDIT_SAMPLE_WARMUP": "50",
        "TOKENAUDIT_ANOMALY_INPUT_TOKENS": "1000",
        "TOKENAUDIT_DATA_DIR": str(data_dir),
    }


class Pipeline:
    """Worker subprocesses plus an in-process sink writing to the test's chDB database."""

    def __init__(self, bootstrap: str, ch_client, database: str, tmp: Path):
        self.tag = f"t{uuid.uuid4().hex[:8]}"
        self.bootstrap, self.tmp = bootstrap, tmp
        self.env = _env(bootstrap, self.tag, tmp / "data", f"{self.tag}-worker")
        self.settings = load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in self.env.items()})
        ensure_worker_topics(self.settings)
        self.store = Store(ch_client, database)
        self.store.migrate()
        self.workers: list[subprocess.Popen] = []
        self.ports: dict[int, int] = {}  # worker pid -> its web port (/metrics)
        self.stop = threading.Event()
        self.sink = Sink(self.settings, self.store, group_id=f"{self.tag}-sink")
        self.thread = threading.Thread(target=self.sink.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def start_worker(self, worker_id: str | None = None) -> subprocess.Popen:
        port = free_port()
        env = dict(os.environ, **self.env, TOKENAUDIT_WORKER_WEB_PORT=str(port))
        if worker_id:
            env["TOKENAUDIT_WORKER_ID"] = worker_id
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenaudit.streams.app"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        self.ports[proc.pid] = port
        return proc

    def metric(self, proc: subprocess.Popen, name: str) -> int | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.ports[proc.pid]}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return int(float(line.split()[1]))
        return None

    def wait_metric(self, proc: subprocess.Popen, name: str, expected: int, timeout: float = 60.0) -> None:
        deadline, got = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            got = self.metric(proc, name)
            if got == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{name}: {got}, expected {expected}\n{self.logs()}")

    def topic_log(self, topic: str) -> dict[int, list]:
        """Every record of ``topic`` as (offset, key, value), per partition, in offset order."""
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": f"{self.tag}-read", "enable.auto.commit": False}
        )
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        out: dict[int, list] = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            consumer.assign([TopicPartition(topic, p, low)])
            records: list = []
            while len(records) < high - low:
                msg = consumer.poll(1.0)
                if msg is not None and not msg.error():
                    records.append((msg.offset(), msg.key(), msg.value()))
            out[p] = records
        consumer.close()
        return out

    def reference_duplicates(self) -> tuple[int, int]:
        """What a crash-free worker does with the topic as it is: (copies it drops, copies that
        reach the sink as deltas of a closed window and are skipped there)."""
        proc = Processor(self.settings, MemoryState())
        out = Outputs()
        for p, records in sorted(self.topic_log(self.settings.topic_usage).items()):
            proc.process_records(p, records, out)
        proc.end_batch(out)
        rows: dict = {}
        from tokenaudit.sinks import rows as R

        skipped = 0
        for r in out.rollups:
            k = R.rollup_key(r)
            if r["delta_id"]:
                why = R.delta_skip(rows.get(k), r)
                skipped += why == "duplicate"
                if why is None:
                    rows[k] = R.merge_delta(rows.get(k), r)
            elif k not in rows or rows[k]["version"] <= r["version"]:
                rows[k] = dict(r, late_ids=[])
        return proc.duplicates(), skipped

    def produce(self, events) -> None:
        synth.produce(self.bootstrap, self.settings.topic_usage, events)

    def rollups(self) -> dict:
        rows = self.store.query(
            "SELECT client_id, department, api_key_id, model, toUnixTimestamp64Milli(window_start) AS ws, requests, "
            "errors, input_tokens, output_tokens, total_tokens, latency_ms_sum, latency_ms_max, max_input_tokens, "
            "truncated FROM {db}.usage_rollup FINAL"
        )
        return {
            (r["client_id"], r["department"], r["api_key_id"], r["model"], r["ws"]): (
                r["requests"],
                r["errors"],
                r["input_tokens"],
                r["output_tokens"],
                r["total_tokens"],
                round(r["latency_ms_sum"], 3),
                r["latency_ms_max"],
                r["max_input_tokens"],
                r["truncated"],
            )
            for r in rows
        }

    def wait_exact(self, truth: dict, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        got: dict = {}
        while time.monotonic() < deadline:
            got = self.rollups()
            if got == truth:
                return got
            if self.workers and all(p.poll() not in (None, -9) for p in self.workers):
                break  # every worker exited on its own: no point waiting
            time.sleep(1.0)
        missing = [k for k in truth if k not in got][:3]
        wrong = [(k, truth[k], got[k]) for k in truth if k in got and got[k] != truth[k]][:3]
        extra = [k for k in got if k not in truth][:3]
        raise AssertionError(
            f"rollups differ: {len(truth)} expected, {len(got)} got; missing {missing}; "
            f"wrong {wrong}; extra {extra}\n{self.logs()}"
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("worker-*.log"))
        )

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def pipeline(kafka_bootstrap, ch_client, ch_database, tmp_path):
    p = Pipeline(kafka_bootstrap, ch_client, ch_database, tmp_path)
    yield p
    p.close()


def _chunks(events, n):
    size = (len(events) + n - 1) // n
    return [events[i : i + size] for i in range(0, len(events), size)]


def _dead_letters(pipeline, expected: int, timeout: float = 30.0) -> list[tuple[bytes, dict]]:
    """Dead letters until ``expected`` distinct values arrived (replays may repeat some)."""
    consumer = Consumer(
        {
            "bootstrap.servers": pipeline.bootstrap,
            "group.id": f"{pipeline.tag}-dlq-{uuid.uuid4().hex[:4]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([pipeline.settings.topic_dlq])
    dead: dict[bytes, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(dead) < expected:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            dead[msg.value()] = dict(msg.headers())
    consumer.close()
    return list(dead.items())


def test_exact_with_copies_under_three_sigkills_then_full_replay_then_poison(pipeline):
    rnd = random.Random(11)
    events = synth.mixed_stream(
        24_000,
        clients=300,
        models=3,
        start_ms=T0,
        span_ms=40_000,
        seed=5,
        late_share=0.04,
        late_ms=12_000,
        jitter_ms=800,
    )
    # planted: one oversized request (anomaly + sampled record)
    events[5000] = synth.event("big-1", events[5000]["ts"], "client-7", "model-0", input_tokens=3000)
    truth = synth.ground_truth(events, WINDOW_MS)
    # Copies: 8% sent again within 30 events (most while their window is open), 3% of those
    # sent a third time, 2% ~2-5 s of event time later (after their window closed); chunks cut
    # the stream, so copies also cross the SIGKILLs below. And at the very end, copies of
    # early events (hours in a real spool replay; here 30 s after their window).
    stream, near = synth.with_copies(events, 0.08, seed=1, max_delay=30)
    stream, third = synth.with_copies(stream, 0.03 * 0.08, seed=2, max_delay=30)
    stream, far = synth.with_copies(stream, 0.02, seed=3, max_delay=3_000)
    tail = [dict(e) for e in events[:2_000:40]]
    copies = near + third + far + len(tail)
    poison = [b"\x00random-bytes", synth.encoded(events[:1])[0][1][:14], b"\xc3\x01" + b"\x11" * 8 + b"body"]
    chunks = _chunks(stream, 4)
    chunks[-1] = chunks[-1] + tail

    proc = pipeline.start_worker()
    synth.produce(pipeline.bootstrap, pipeline.settings.topic_usage, [(b"bad", v) for v in poison], raw=True)
    for i, chunk in enumerate(chunks):
        pipeline.produce(chunk)
        if i < 3:
            time.sleep(rnd.uniform(3.0, 7.0))  # includes start-up, so kills land before, during, after work
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = pipeline.start_worker()
    pipeline.wait_exact(truth, timeout=120)
    dropped, skipped = pipeline.reference_duplicates()
    assert dropped + skipped == copies and dropped > 0 and skipped >= len(tail)  # the test data's premise
    # The counter of copies dropped survived three SIGKILLs: exactly what a crash-free run drops.
    pipeline.wait_metric(proc, "tokenaudit_worker_duplicates_total", dropped)
    assert pipeline.sink.counters.deltas_duplicate >= len(tail)

    # The sampled records and anomalies are there, keyed so that replays do not duplicate them.
    big = pipeline.store.query("SELECT sample_reason FROM {db}.usage_sampled FINAL WHERE request_id = 'big-1'")
    assert big == [{"sample_reason": "anomaly:input_tokens"}]
    anomalies = pipeline.store.query(
        "SELECT anomaly_id, rule, request_id FROM {db}.anomalies FINAL WHERE rule = 'input_tokens'"
    )
    assert [(a["rule"], a["request_id"]) for a in anomalies] == [("input_tokens", "big-1")]
    sampled_before = pipeline.store.query("SELECT count() AS n FROM {db}.usage_sampled FINAL")[0]["n"]
    assert 0.07 * len(events) < sampled_before < 0.14 * len(events)
    live = pipeline.store.query("SELECT anomaly_id FROM {db}.anomalies FINAL")
    n_anomalies, live_ids = len(live), [a["anomaly_id"] for a in live]

    # Dead letters: exactly the three poison messages, each with a reason header.
    dead = _dead_letters(pipeline, len(poison))
    assert sorted(v for v, _ in dead) == sorted(poison)
    assert all(h["reason"].startswith(b"undecodable") for _, h in dead)

    # A fresh worker group replays the whole topic into the same outputs: nothing changes, and
    # it drops exactly the same copies.
    for p in pipeline.workers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(20)
    replay = pipeline.start_worker(worker_id=f"{pipeline.tag}-replay")
    pipeline.wait_metric(replay, "tokenaudit_worker_duplicates_total", dropped, timeout=90)
    pipeline.wait_exact(truth, timeout=60)
    after = pipeline.store.query(
        "SELECT count() AS n, uniqExact(rule, client_id, model, ifNull(toString(window_start), ''), "
        "ifNull(request_id, '')) AS keys, "
        "groupArray(anomaly_id) AS ids FROM {db}.anomalies FINAL"
    )[0]
    # Replays never duplicate an anomaly: one row per (rule, client, model, window/request),
    # because ids are derived from exactly those. (Whether a rule fires can still differ
    # between a crashed history and a clean replay in rare cases, so the count may only grow.)
    assert after["n"] == after["keys"]
    assert set(live_ids) <= set(after["ids"])
    assert after["n"] >= n_anomalies

    # Poison never stops the stream: each kind goes to the DLQ with its reason, the same worker
    # process goes on, every valid event after them is counted exactly, and the future-dated
    # one moves no watermark (the events after it are not late).
    everything = len(stream) + len(tail) + len(poison)  # what the replaying group has to read
    pipeline.wait_metric(replay, "tokenaudit_worker_consumed_total", everything)
    assert pipeline.metric(replay, "tokenaudit_worker_consumer_lag") is not None
    late_before = pipeline.metric(replay, "tokenaudit_worker_late_total")
    good = synth.event("p-0", T0 + 45_000, "client-1", "model-0")
    year_ahead = int(time.time() * 1000) + 365 * 86_400_000
    bad_events = {
        "separator": dict(good, request_id="p-sep", client_id="client\x1fx"),
        "control": dict(good, request_id="p-ctl", department="eng\n"),
        "negative": dict(good, request_id="p-neg", input_tokens=-5),
        "too_many": dict(good, request_id="p-big", total_tokens=10_000_001),
        "future": dict(good, request_id="p-fut", ts=year_ahead),
        "event_id": dict(good, request_id="p-eid", event_id="12345"),
    }
    valid_after = [synth.event(f"after-{i}", T0 + 45_000 + 10 * i, f"client-{i % 5}", "model-0") for i in range(40)]
    bad_values = {name: encode(EVENT, e) for name, e in bad_events.items()}
    synth.produce(
        pipeline.bootstrap, pipeline.settings.topic_usage, [(b"client-1", v) for v in bad_values.values()], raw=True
    )
    pipeline.produce(valid_after)
    pipeline.wait_exact({**truth, **synth.ground_truth(valid_after, WINDOW_MS)}, timeout=60)
    dead = dict(_dead_letters(pipeline, len(poison) + len(bad_values)))
    reasons = {name: dead[v]["reason"].decode() for name, v in bad_values.items() if v in dead}
    assert set(reasons) == set(bad_values), reasons
    assert reasons["separator"].startswith("invalid: client_id") and "control" in reasons["separator"]
    assert reasons["control"].startswith("invalid: department")
    assert reasons["negative"] == "invalid: negative input_tokens"
    assert reasons["too_many"] == "invalid: total_tokens 10000001 above the limit of 10000000"
    assert reasons["future"].startswith("invalid: event time") and "ahead of the worker's clock" in reasons["future"]
    assert reasons["event_id"].startswith("invalid: event_id is not UUID text")
    assert replay.poll() is None and pipeline.workers[-1] is replay  # never restarted
    assert pipeline.metric(replay, "tokenaudit_worker_late_total") == late_before
    assert pipeline.metric(replay, "tokenaudit_worker_dead_lettered_total") >= len(poison) + len(bad_values)


def test_two_workers_one_killed(pipeline):
    events = synth.mixed_stream(
        16_000,
        clients=200,
        models=2,
        start_ms=T0,
        span_ms=30_000,
        seed=9,
        late_share=0.03,
        late_ms=4_000,
        jitter_ms=500,
    )
    truth = synth.ground_truth(events, WINDOW_MS)
    first, second = _chunks(events, 2)
    a = pipeline.start_worker()
    pipeline.start_worker()
    pipeline.produce(first)
    # killed mid-work: once the two workers have consumed a share of the first half between them
    # (a may hold few partitions, or none while the group rebalances: it is killed all the same)
    deadline = time.monotonic() + 180
    while sum(pipeline.metric(w, "tokenaudit_worker_consumed_total") or 0 for w in pipeline.workers) < len(first) // 4:
        assert time.monotonic() < deadline, f"the workers never got going\n{pipeline.logs()}"
        time.sleep(0.2)
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    pipeline.produce(second)
    pipeline.wait_exact(truth, timeout=120)
