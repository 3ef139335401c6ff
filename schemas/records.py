"""The four record types of the contract as typed records, and the one builder of each.

The records are :class:`typing.TypedDict`\\ s: at run time a record is the plain dict the Avro
codecs (``compiled``, ``_native``, fastavro) read and write, so typing them costs nothing.
Measured against the alternative (bench/bench_hot_path.py's build step, 27 fields): a
``dataclass(slots=True)`` is built in ~0.6 us but must become a dict for the codecs (~2.7 us
in all), against ~1.4 us for the dict literal.

One builder per record, used everywhere a record is made (the inference app, the stream
worker, the tests' synthetic streams). Each builder is the dict literal itself, taking the
object that holds the values (the request's audit context, a window's totals, the event)
rather than one keyword argument per field: a 27-keyword call measured ~2.6 us against
~1.4 us for the literal, and the event builder runs once per request on the inference hot
path (budget 10 us), the rollup builder once per emitted window in the worker.

Timestamps (``timestamp-millis``) are int epoch milliseconds, as every codec of the project
reads and writes them. ``tests/test_records.py`` checks every field and type here against the
current ``.avsc`` of each record, so a new schema version cannot drift from its builder.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, TypedDict

from tokenaudit.schemas import latency_hist

#: the longest path and method an event carries: a 16 KB URL must not make a 16 KB event
#: (keyless 401s during a broker outage would fill the spool that paid events need)
MAX_EVENT_PATH = 256
MAX_EVENT_METHOD = 16


class TokenUsageEvent(TypedDict):
    """token_usage_event v4: one per HTTP request, whatever its outcome."""

    request_id: str
    ts: int
    client_id: str
    department: str
    api_key_id: str | None
    client_ip: str
    method: str
    path: str
    status_code: int
    error_type: str | None
    model: str
    input_tokens: int
    untruncated_input_tokens: int
    truncated: bool
    output_tokens: int
    total_tokens: int
    latency_ms: float
    queue_ms: float
    inference_ms: float
    batch_id: str | None
    batch_size: int
    position_in_batch: int
    device: str
    prompt_digest: str | None
    finish_reason: str | None
    event_id: str | None
    instance: str
    ttft_ms: float | None
    tpot_ms: float | None


class UsageRollup(TypedDict):
    """usage_rollup v4: one window's totals (a version of them), or a one-event late delta."""

    client_id: str
    department: str
    api_key_id: str
    model: str
    window_start: int
    window_end: int
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    latency_ms_sum: float
    latency_ms_max: float
    max_input_tokens: int
    truncated: int
    version: int
    applied_offset: int
    delta_id: str | None
    event_ids: str
    latency_hist: str


class SampledRecord(TypedDict):
    """sampled_record v2: a detailed request record (the top fraction, or an anomaly's request)."""

    request_id: str
    ts: int
    client_id: str
    department: str
    model: str
    input_tokens: int
    output_tokens: int
    total_tokens: int
    latency_ms: float
    status_code: int
    sample_reason: str
    threshold: float
    untruncated_input_tokens: int
    truncated: bool
    queue_ms: float
    inference_ms: float
    path: str
    error_type: str
    batch_size: int
    device: str
    prompt_digest: str


class Anomaly(TypedDict):
    """anomaly v1: a rule that fired for a window or a request."""

    anomaly_id: str
    ts: int
    client_id: str
    department: str
    model: str
    rule: str
    severity: str
    observed: float
    threshold: float
    window_start: int | None
    request_id: str | None
    message: str


# --- the token-usage event ---------------------------------------------------------------------
class EventFields(Protocol):
    """What one request did (the inference app's ``AuditContext`` is one)."""

    request_id: str
    event_id: str
    ts_ms: int
    client_id: str
    department: str
    api_key_id: str | None
    client_ip: str
    model: str
    input_tokens: int
    untruncated_input_tokens: int
    truncated: bool
    output_tokens: int
    queue_ms: float
    inference_ms: float
    batch_id: str | None
    batch_size: int
    position_in_batch: int
    device: str
    prompt_digest: str | None
    finish_reason: str | None
    error_type: str | None
    ttft_ms: float | None
    tpot_ms: float | None


def token_usage_event(
    f: EventFields, method: str, path: str, status_code: int, instance: str, latency_ms: float
) -> TokenUsageEvent:
    """The event of one request. ``path`` is cut to :data:`MAX_EVENT_PATH` characters,
    ``method`` to :data:`MAX_EVENT_METHOD`; ``total_tokens`` is input plus output."""
    return {
        "request_id": f.request_id,
        "event_id": f.event_id,
        "instance": instance,
        "ts": f.ts_ms,
        "client_id": f.client_id,
        "department": f.department,
        "api_key_id": f.api_key_id,
        "client_ip": f.client_ip,
        "method": method[:MAX_EVENT_METHOD],
        "path": path[:MAX_EVENT_PATH],
        "status_code": status_code,
        "error_type": f.error_type,
        "model": f.model,
        "input_tokens": f.input_tokens,
        "untruncated_input_tokens": f.untruncated_input_tokens,
        "truncated": f.truncated,
        "output_tokens": f.output_tokens,
        "total_tokens": f.input_tokens + f.output_tokens,
        "latency_ms": latency_ms,
        "queue_ms": f.queue_ms,
        "inference_ms": f.inference_ms,
        "batch_id": f.batch_id,
        "batch_size": f.batch_size,
        "position_in_batch": f.position_in_batch,
        "device": f.device,
        "prompt_digest": f.prompt_digest,
        "finish_reason": f.finish_reason,
        "ttft_ms": f.ttft_ms,
        "tpot_ms": f.tpot_ms,
    }


# --- the worker's outputs ------------------------------------------------------------------------
class WindowTotals(Protocol):
    """A window's totals (the worker's window state is one)."""

    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    latency_ms_sum: float
    latency_ms_max: float
    max_input_tokens: int
    truncated: int
    applied_offset: int
    hist: dict[int, int]


def usage_rollup(
    client_id: str,
    department: str,
    api_key_id: str,
    model: str,
    window_start: int,
    window_end: int,
    w: WindowTotals,
    delta_id: str | None = None,
    event_ids: str = "",
) -> UsageRollup:
    """A window's rollup. Its ``version`` is the window's request count: it only grows, and the
    content for a given count is fixed by the partition's order, so the latest version is
    always the complete one. ``delta_id`` (topic:partition:offset) marks a one-event late
    delta; ``event_ids`` is the window's packed id set (:mod:`tokenaudit.schemas.event_ids`)."""
    return {
        "client_id": client_id,
        "department": department,
        "api_key_id": api_key_id,
        "model": model,
        "window_start": window_start,
        "window_end": window_end,
        "requests": w.requests,
        "errors": w.errors,
        "input_tokens": w.input_tokens,
        "output_tokens": w.output_tokens,
        "total_tokens": w.total_tokens,
        "latency_ms_sum": w.latency_ms_sum,
        "latency_ms_max": w.latency_ms_max,
        "max_input_tokens": w.max_input_tokens,
        "truncated": w.truncated,
        "version": w.requests,
        "delta_id": delta_id,
        "applied_offset": w.applied_offset,
        "event_ids": event_ids,
        "latency_hist": latency_hist.encode(w.hist),
    }


def sampled_record(ev: TokenUsageEvent, reason: str, threshold: float) -> SampledRecord:
    """The detailed record of a sampled request (``reason``: top_fraction or anomaly:<rule>)."""
    return {
        "request_id": ev["request_id"],
        "ts": ev["ts"],
        "client_id": ev["client_id"],
        "department": ev["department"],
        "model": ev["model"],
        "input_tokens": ev["input_tokens"],
        "output_tokens": ev["output_tokens"],
        "total_tokens": ev["total_tokens"],
        "latency_ms": ev["latency_ms"],
        "status_code": ev["status_code"],
        "sample_reason": reason,
        "threshold": threshold,
        "untruncated_input_tokens": ev["untruncated_input_tokens"],
        "truncated": bool(ev["truncated"]),
        "queue_ms": ev["queue_ms"],
        "inference_ms": ev["inference_ms"],
        "path": ev["path"],
        "error_type": ev["error_type"] or "",
        "batch_size": ev["batch_size"],
        "device": ev["device"],
        "prompt_digest": ev["prompt_digest"] or "",
    }


_SEP = "\x1f"


def anomaly_id(
    rule: str, client_id: str, model: str, window_start: int, department: str = "", api_key_id: str = ""
) -> str:
    """Deterministic: the same anomaly (rule, window) gets the same id in every replay. The
    department and key are part of the window's identity; left out when both are empty, so
    such ids are what they were before windows had them."""
    text = f"{rule}{_SEP}{client_id}{_SEP}{model}{_SEP}{window_start}"
    if department or api_key_id:
        text += f"{_SEP}{department}{_SEP}{api_key_id}"
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:24]


def anomaly(
    rule: str,
    client_id: str,
    department: str,
    model: str,
    window_start: int,
    observed: float,
    threshold: float,
    message: str,
    ts: int,
    request_id: str | None = None,
    api_key_id: str = "",
) -> Anomaly:
    """An anomaly of a window (or of one request, ``request_id``): ``critical`` when the observed
    value is at least twice the threshold, else ``warning``."""
    return {
        "anomaly_id": anomaly_id(rule, client_id, model, window_start, department, api_key_id),
        "ts": ts,
        "client_id": client_id,
        "department": department,
        "model": model,
        "rule": rule,
        "severity": "critical" if threshold > 0 and observed >= 2 * threshold else "warning",
        "observed": float(observed),
        "threshold": float(threshold),
        "window_start": window_start,
        "request_id": request_id,
        "message": message,
    }
