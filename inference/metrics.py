"""Prometheus metrics of the inference app: the one place that defines them.

What operators need and nothing a tenant would mind: no client_id (or any other per-caller)
label, every label set bounded (the served model x the HTTP statuses the app answers with);
per-tenant usage belongs to the scoped usage API. Request histograms are named after the
OpenTelemetry GenAI semantic conventions in Prometheus form, with their advised buckets:

======================================================  =========================================
``gen_ai_server_request_duration_seconds``              request latency, by model and status
``gen_ai_client_token_usage``                           tokens per request, by model, status and
                                                        ``gen_ai_token_type`` (input / output)
``gen_ai_server_time_to_first_token_seconds``           streamed responses: arrival to first token,
                                                        by model
``gen_ai_server_time_per_output_token_seconds``         streamed responses: per token after the
                                                        first, by model
``tokenaudit_queue_time_seconds``                       time waiting for a micro-batch
======================================================  =========================================

The two streaming histograms count successful (200) streamed responses only, as the conventions
define them ("for successful responses"); the event carries both times for every streamed
response that produced a token.

Each app instance has a registry of its own (tests and benchmarks run several apps in one
process). Publisher counters are read at scrape time by a collector over the publisher's
stats dataclass, which keeps the publishing hot path free of metric calls.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tokenaudit.schemas.records import TokenUsageEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: OpenTelemetry GenAI advice for gen_ai.server.request.duration (seconds)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
#: OpenTelemetry GenAI advice for gen_ai.client.token.usage (tokens)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
#: OpenTelemetry GenAI advice for gen_ai.server.time_to_first_token (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: OpenTelemetry GenAI advice for gen_ai.server.time_per_output_token (seconds)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    doc: str
    buckets: tuple[float, ...]
    labels: tuple[str, ...]


REQUEST_DURATION = HistogramSpec(
    "gen_ai_server_request_duration_seconds",
    "Time from request arrival to the end of the response, by model and HTTP status.",
    DURATION_BUCKETS,
    ("model", "status"),
)
TOKEN_USAGE = HistogramSpec(
    "gen_ai_client_token_usage",
    "Tokens per request: input fed to the model, output generated.",
    TOKEN_BUCKETS,
    ("model", "status", "gen_ai_token_type"),
)
TIME_TO_FIRST_TOKEN = HistogramSpec(
    "gen_ai_server_time_to_first_token_seconds",
    "Streamed responses: time from request arrival to the first generated token.",
    TTFT_BUCKETS,
    ("model",),
)
TIME_PER_OUTPUT_TOKEN = HistogramSpec(
    "gen_ai_server_time_per_output_token_seconds",
    "Streamed responses: time per output token after the first.",
    TPOT_BUCKETS,
    ("model",),
)
QUEUE_TIME = HistogramSpec(
    "tokenaudit_queue_time_seconds",
    "Time a request waited in the micro-batch queue (requests that reached it).",
    QUEUE_BUCKETS,
    ("model", "status"),
)

#: publisher stats field -> help text; a field missing here is still exported (generic help)
#: publisher_stats.PublisherStats field -> (metric name without ``tokenaudit_`` and ``_total``, help text)
PUBLISHER_COUNTERS = {
    "enqueued": ("events_enqueued", "Events handed to the Kafka producer."),
    "failed": ("events_failed", "Deliveries that failed (the event was then spooled)."),
    "spooled": ("events_spooled", "Events written to the on-disk spool."),
    "replayed": ("events_replayed", "Spooled events delivered to Kafka on replay."),
    "replay_failed": ("events_replay_failed", "Replayed deliveries that failed (the event stays spooled)."),
    "dropped": (
        "events_dropped",
        (
            "Events that will not reach Kafka, whatever the reason (the counters below "
            "name some reasons; the rest: full spool, drop newest)."
        ),
    ),
    "dropped_unauthenticated": (
        "events_dropped_unauthenticated",
        "Unauthenticated events dropped because they filled their share of the spool.",
    ),
    "write_failures": ("spool_write_failures", "Events dropped because a spool write failed (disk full, I/O)."),
    "quarantined": ("spool_quarantined", "Spooled records found corrupt and moved to the quarantine folder."),
    "torn_tails": ("spool_torn_tails", "Spooled records cut short by a crash mid-write (kept in quarantine)."),
}


class _Series:
    """One label set of a histogram: ``cells`` = per-bucket counts (the last bucket is +Inf), then
    the sum, in one list so an observation is two list updates.

    Hand-written instead of prometheus_client's Histogram because of measured cost on the
    request path (bench/bench_hot_path.py): its ``observe`` takes a lock and walks the bounds in
    Python (~1.5-4 us each, four per request); this is a C bisect and two list increments. Only
    the event loop thread writes; a scrape from another thread may see a count and a sum one
    request apart."""

    __slots__ = ("cells",)

    def __init__(self, size: int):
        self.cells: list = [0] * (size + 1) + [0.0]


class FastHistogram:
    def __init__(self, spec: HistogramSpec):
        self.spec = spec
        self.bounds = spec.buckets
        self.series: dict[tuple[str, ...], _Series] = {}

    def child(self, *labels: str) -> _Series:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _Series(len(self.bounds))
        return series

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.spec.name, self.spec.doc, labels=self.spec.labels)
        for labels, series in list(self.series.items()):
            cells = list(series.cells)
            cumulative, buckets = 0, []
            for bound, count in zip((*map(_fmt, self.bounds), "+Inf"), cells[:-1]):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, cells[-1])
        return family


def _fmt(bound: float) -> str:
    return floatToGoString(bound)  # the library's own "le" spelling (1.6777216e+07)


class _Collector:
    def __init__(self, histograms: list[FastHistogram], get_publisher: Callable, get_extra: Callable[[], dict]):
        self.histograms = histograms
        self.get_publisher = get_publisher
        self.get_extra = get_extra

    def collect(self) -> Iterator:
        for histogram in self.histograms:
            yield histogram.collect()
        pub = self.get_publisher()
        if pub is not None:
            yield from publisher_families(pub)
        for name, (value, doc) in self.get_extra().items():
            yield GaugeMetricFamily(f"tokenaudit_{name}", doc, value=value)


def publisher_families(pub) -> Iterator:
    """A counter for every int field of ``pub.stats`` (a dataclass; named and described in
    PUBLISHER_COUNTERS, else ``tokenaudit_events_<field>_total``), so a counter added there is
    exported without touching this module; then the gauges."""
    stats = pub.stats
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        if f.name == "produced" or isinstance(value, bool) or not isinstance(value, int):
            continue  # "produced" is derived below; flags and text are not counters
        name, doc = PUBLISHER_COUNTERS.get(f.name, (f"events_{f.name}", f"Publisher counter {f.name}."))
        yield CounterMetricFamily(f"tokenaudit_{name}", f.metadata.get("doc") or doc, value=value)
    yield CounterMetricFamily(
        "tokenaudit_events_produced", "Events acknowledged by Kafka on the direct path (acks=all).", value=pub.produced
    )
    yield GaugeMetricFamily(
        "tokenaudit_producer_queue_depth", "Messages in the producer's local queue.", value=pub.queue_depth
    )
    yield GaugeMetricFamily("tokenaudit_spool_bytes", "Bytes in the on-disk event spool.", value=pub.spool.bytes)
    yield GaugeMetricFamily(
        "tokenaudit_producer_spooling", "1 while events go to the spool.", value=1 if pub.state == "spooling" else 0
    )


class AppMetrics:
    def __init__(self, get_publisher: Callable, get_extra: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.duration = FastHistogram(REQUEST_DURATION)
        self.tokens = FastHistogram(TOKEN_USAGE)
        self.queue = FastHistogram(QUEUE_TIME)
        self.ttft = FastHistogram(TIME_TO_FIRST_TOKEN)
        self.tpot = FastHistogram(TIME_PER_OUTPUT_TOKEN)
        self.registry.register(
            _Collector([self.duration, self.tokens, self.queue, self.ttft, self.tpot], get_publisher, get_extra)
        )
        self._children: dict[tuple, tuple[list, list, list, list]] = {}

    def _bind(self, key: tuple) -> tuple[list, list, list, list]:
        model, status = key[0], str(key[1])
        children = self._children[key] = (
            self.duration.child(model, status).cells,
            self.tokens.child(model, status, "input").cells,
            self.tokens.child(model, status, "output").cells,
            self.queue.child(model, status).cells,
        )
        return children

    def observe(self, event: TokenUsageEvent) -> None:
        """Account one audited request. Cells are bound once per (model, status), a set the app
        bounds (one model, the statuses it answers with), so this is a dict hit and up to four
        bisects into fixed buckets; no per-caller label exists."""
        children = self._children.get((event["model"], event["status_code"]))
        if children is None:
            children = self._bind((event["model"], event["status_code"]))
        duration, tokens_in, tokens_out, queued = children
        seconds = event["latency_ms"] / 1000.0
        duration[bisect_left(DURATION_BUCKETS, seconds)] += 1
        duration[-1] += seconds
        if event["batch_id"] is not None or event["error_type"] == "queue_timeout":
            wait = event["queue_ms"] / 1000.0
            queued[bisect_left(QUEUE_BUCKETS, wait)] += 1
            queued[-1] += wait
        n = event["input_tokens"]
        if n:
            tokens_in[bisect_left(TOKEN_BUCKETS, n)] += 1
            tokens_in[-1] += n
        n = event["output_tokens"]
        if n:
            tokens_out[bisect_left(TOKEN_BUCKETS, n)] += 1
            tokens_out[-1] += n
        ttft_ms = event.get("ttft_ms")
        if ttft_ms is not None and event["status_code"] == 200:
            self._observe_streamed(event, ttft_ms)

    def _observe_streamed(self, event: TokenUsageEvent, ttft_ms: float) -> None:
        """The streaming histograms (labelled by model only); off the common path: only streamed
        responses carry ``ttft_ms``."""
        seconds = ttft_ms / 1000.0
        cells = self.ttft.child(event["model"]).cells
        cells[bisect_left(TTFT_BUCKETS, seconds)] += 1
        cells[-1] += seconds
        if event["tpot_ms"] is not None:
            seconds = event["tpot_ms"] / 1000.0
            cells = self.tpot.child(event["model"]).cells
            cells[bisect_left(TPOT_BUCKETS, seconds)] += 1
            cells[-1] += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)


def start_metrics_listener(metrics: AppMetrics, port: int):
    """``/metrics`` on a listener of its own, bound to 127.0.0.1 (prometheus_client's server in
    a daemon thread); returns the server (``shutdown()`` it) and its thread."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
