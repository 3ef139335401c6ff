"""Synthetic token-usage streams with known ground truth, for tests and benchmarks.

Not used by the worker itself. Events are the real Avro ``token_usage_event`` records;
``ground_truth`` computes the exact rollups the pipeline must produce from them.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable

from tokenaudit.inference.audit import AuditContext
from tokenaudit.schemas import EVENT, encode
from tokenaudit.schemas.records import token_usage_event

ROLLUP_FIELDS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "latency_ms_sum",
    "latency_ms_max",
    "max_input_tokens",
    "truncated",
)


def synthetic_event_id(request_id: str) -> str:
    """A deterministic UUIDv7-shaped id for a synthetic request id (the app makes real UUIDv7s):
    the same request id gives the same event id in every run, so copies and ground truth agree."""
    b = bytearray(hashlib.blake2b(request_id.encode(), digest_size=16).digest())
    b[6] = (b[6] & 0x0F) | 0x70  # version 7
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def event(
    request_id: str,
    ts_ms: int,
    client_id: str,
    model: str = "t5-tiny",
    input_tokens: int = 20,
    output_tokens: int = 10,
    latency_ms: float | None = None,
    status_code: int = 200,
    department: str = "eng",
    truncated: bool = False,
    api_key_id: str | None = None,
    untruncated_input_tokens: int | None = None,
) -> dict:
    """A synthetic request's event, made by the one event builder (schemas.records) from what
    the inference app's audit context would hold for it."""
    if latency_ms is None:
        latency_ms = 5.0 + 0.05 * input_tokens + 0.5 * output_tokens
    request = AuditContext(
        request_id,
        synthetic_event_id(request_id),
        ts_ms,
        0.0,
        client_id=client_id,
        department=department,
        api_key_id=api_key_id,
        client_ip="127.0.0.1",
        model=model,
        input_tokens=input_tokens,
        untruncated_input_tokens=(
            untruncated_input_tokens
            if untruncated_input_tokens is not None
            else input_tokens + (50 if truncated else 0)
        ),
        truncated=truncated,
        output_tokens=output_tokens,
        queue_ms=1.0,
        inference_ms=float(latency_ms) - 1.0,
        batch_id=None,
        batch_size=1,
        position_in_batch=0,
        device="cpu",
        prompt_digest=None,
        finish_reason="stop",
        error_type=None if status_code < 400 else "error",
    )
    return token_usage_event(request, "POST", "/v1/generate", status_code, "synth:0", float(latency_ms))


def mixed_stream(
    n: int,
    clients: int,
    models: int,
    start_ms: int,
    span_ms: int,
    seed: int = 7,
    late_share: float = 0.05,
    late_ms: int = 0,
    jitter_ms: int = 0,
    errors: float = 0.02,
    prefix: str = "r",
    dept_switch: float = 0.02,
) -> list[dict]:
    """Events in roughly increasing time with jitter (out of order) and a share of late ones.
    Each client has its department; ``dept_switch`` of its requests are charged to another one
    (a key moved between departments), so windows split by department now and then."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = start_ms + span_ms * i // n + (rnd.randint(-jitter_ms, jitter_ms) if jitter_ms else 0)
        if late_ms and rnd.random() < late_share:
            ts -= rnd.randint(late_ms // 2, late_ms)
        inp = rnd.randint(1, 400)
        client = rnd.randrange(clients)
        dept = client % 3 if rnd.random() >= dept_switch else rnd.randrange(3)
        out.append(
            event(
                f"{prefix}{i}",
                max(ts, 1),
                f"client-{client}",
                f"model-{rnd.randrange(models)}",
                input_tokens=inp,
                output_tokens=rnd.randint(1, 64),
                status_code=500 if rnd.random() < errors else 200,
                truncated=rnd.random() < 0.03,
                department=f"dept-{dept}",
            )
        )
    return out


def with_copies(events: list[dict], share: float, seed: int = 3, max_delay: int = 50) -> tuple[list[dict], int]:
    """The stream with a ``share`` of its events sent again (a producer retry, a spool replay):
    each copy (the same record, the same event_id) lands 1 to ``max_delay`` positions after its
    original. Returns the stream and how many copies it holds."""
    rnd = random.Random(seed)
    slots: list[list[dict]] = [[e] for e in events]
    copies = 0
    for i, e in enumerate(events):
        if rnd.random() < share:
            slots[min(len(slots) - 1, i + rnd.randint(1, max_delay))].append(dict(e))
            copies += 1
    return [e for slot in slots for e in slot], copies


def ground_truth(events: Iterable[dict], window_ms: int) -> dict[tuple[str, str, str, str, int], tuple]:
    """Exact rollups per window (client_id, department, api_key_id, model, window_start) of the
    *distinct* events (by event_id: copies count once)."""
    acc: dict = defaultdict(lambda: [0, 0, 0, 0, 0, 0.0, 0.0, 0, 0])
    seen: set[str] = set()
    for e in events:
        event_id = e.get("event_id")
        if event_id is not None:
            if event_id in seen:
                continue
            seen.add(event_id)
        ws = e["ts"] - e["ts"] % window_ms
        a = acc[(e["client_id"], e["department"], e.get("api_key_id") or "", e["model"], ws)]
        a[0] += 1
        a[1] += e["status_code"] >= 400
        a[2] += e["input_tokens"]
        a[3] += e["output_tokens"]
        a[4] += e["total_tokens"]
        a[5] += e["latency_ms"]
        a[6] = max(a[6], e["latency_ms"])
        a[7] = max(a[7], e["input_tokens"])
        a[8] += e["truncated"]
    return {k: (v[0], v[1], v[2], v[3], v[4], round(v[5], 3), v[6], v[7], v[8]) for k, v in acc.items()}


def ground_truth_hists(events: Iterable[dict], window_ms: int) -> dict[tuple[str, str, str, str, int], dict]:
    """Exact latency histograms per window of the distinct events (schemas/latency_hist.py)."""
    from tokenaudit.schemas.latency_hist import cell

    acc: dict = defaultdict(dict)
    seen: set[str] = set()
    for e in events:
        event_id = e.get("event_id")
        if event_id is not None:
            if event_id in seen:
                continue
            seen.add(event_id)
        ws = e["ts"] - e["ts"] % window_ms
        h = acc[(e["client_id"], e["department"], e.get("api_key_id") or "", e["model"], ws)]
        c = cell(e["input_tokens"], e["latency_ms"])
        h[c] = h.get(c, 0) + 1
    return dict(acc)


def encoded(events: Iterable[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["client_id"].encode(), encode(EVENT, e)) for e in events]


def produce(
    bootstrap: str, topic: str, events: Iterable[dict] | Iterable[tuple[bytes, bytes]], raw: bool = False
) -> int:
    """Produce events keyed by client_id with confluent-kafka (the inference app's producer)."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "enable.idempotence": True,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    n = 0
    for item in events:
        key, value = item if raw else (item["client_id"].encode(), encode(EVENT, item))
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 10000 == 0:
            producer.poll(0)
    producer.flush(60)
    return n
