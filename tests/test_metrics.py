"""The metrics module without a server: the hand-written histograms expose exactly what
prometheus_client's Histogram would for the same observations, no per-caller label exists, and
every integer counter of the publisher's stats is exported (new ones too)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenaudit.inference.audit import AuditContext
from tokenaudit.inference.metrics import (
    QUEUE_TIME,
    REQUEST_DURATION,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOKEN_USAGE,
    AppMetrics,
)


def _samples(text: bytes | str, name: str) -> dict[tuple, float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        if f.name == name
        for s in f.samples
        if not s.name.endswith("_created")
    }


def _event(rng: random.Random, client: str) -> dict:
    ctx = AuditContext.new()
    ctx.client_id, ctx.model = client, "t5-tiny"
    ctx.input_tokens, ctx.output_tokens = rng.choice([0, 1, 4, 5, 300, 70000]), rng.choice([0, 1, 16, 17])
    if rng.random() < 0.7:
        ctx.batch_id, ctx.queue_ms = "b", rng.choice([0.0, 1.0, 2.5, 7.0, 65000.0])
    if rng.random() < 0.4:  # a streamed response: time to first token, and per token when two or more
        ctx.ttft_ms = rng.choice([0.5, 1.0, 60.0, 90.0, 12000.0])
        ctx.tpot_ms = rng.choice([None, 10.0, 30.0, 2500.0, 9000.0])
    event = ctx.to_event("POST", "/v1/generate", rng.choice([200, 400, 503]))
    event["latency_ms"] = rng.choice([0.0, 10.0, 15.0, 640.0, 100000.0])  # on and between bucket bounds
    return event


def test_histograms_match_prometheus_client_and_name_no_client():
    rng = random.Random(7)
    metrics = AppMetrics(lambda: None, dict)
    reference = CollectorRegistry()
    ref = {
        spec.name: Histogram(spec.name, spec.doc, spec.labels, buckets=spec.buckets, registry=reference)
        for spec in (REQUEST_DURATION, TOKEN_USAGE, QUEUE_TIME, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN)
    }
    for i in range(2000):
        event = _event(rng, f"client-{i}")  # 2000 distinct callers
        metrics.observe(event)
        m, st = event["model"], str(event["status_code"])
        ref[REQUEST_DURATION.name].labels(m, st).observe(event["latency_ms"] / 1000)
        if event["batch_id"] is not None:
            ref[QUEUE_TIME.name].labels(m, st).observe(event["queue_ms"] / 1000)
        for kind in ("input", "output"):
            if event[f"{kind}_tokens"]:
                ref[TOKEN_USAGE.name].labels(m, st, kind).observe(event[f"{kind}_tokens"])
        if event["ttft_ms"] is not None and st == "200":  # "for successful responses", by model only
            ref[TIME_TO_FIRST_TOKEN.name].labels(m).observe(event["ttft_ms"] / 1000)
            if event["tpot_ms"] is not None:
                ref[TIME_PER_OUTPUT_TOKEN.name].labels(m).observe(event["tpot_ms"] / 1000)
    ours, theirs = metrics.render(), generate_latest(reference)
    for spec in (REQUEST_DURATION, TOKEN_USAGE, QUEUE_TIME, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN):
        got, want = _samples(ours, spec.name), _samples(theirs, spec.name)
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-6 for k in want), spec.name
    assert b"client_id" not in ours and b"client-" not in ours
    assert len(_samples(ours, REQUEST_DURATION.name)) == 3 * (len(REQUEST_DURATION.buckets) + 3), (
        "one series per status, however many callers"
    )
    assert len(_samples(ours, TIME_TO_FIRST_TOKEN.name)) == len(TIME_TO_FIRST_TOKEN.buckets) + 3, (
        "one series: the model"
    )
    assert _samples(ours, TIME_PER_OUTPUT_TOKEN.name), "time per output token observed"


def test_every_integer_publisher_counter_is_exported():
    @dataclass
    class Stats:
        enqueued: int = 3
        dropped: int = 2
        quarantined: int = 4
        surprises: int = field(default=5, metadata={"doc": "A counter added later, named for itself."})
        problem: str = "disk full"
        broken: bool = True

    class Spool:
        bytes = 10

    class Publisher:
        stats, spool, produced, queue_depth, state = Stats(), Spool(), 1, 0, "direct"

    text = AppMetrics(Publisher, lambda: {"model_ready": (1, "ready")}).render().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["tokenaudit_events_enqueued_total"] == 3 and values["tokenaudit_events_dropped_total"] == 2
    assert values["tokenaudit_spool_quarantined_total"] == 4, "named as the fault docs and alerts know it"
    assert values["tokenaudit_events_surprises_total"] == 5 and "A counter added later, named for itself." in text
    assert values["tokenaudit_events_produced_total"] == 1 and values["tokenaudit_model_ready"] == 1
    assert "problem" not in text and "broken" not in text
