"""``GET /metrics`` of the sink process (on the usage API's listener): the sink's counters in
Prometheus text, without client labels (operators only; tenant data stays behind the scoped
``/v1`` routes)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenaudit.sinks.sink import Sink


class SinkCollector:
    """Reads the sink's counters at scrape time (no second set of counters to keep in step)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        c = self.sink.counters
        yield _counter("tokenaudit_sink_messages", "Records consumed from the worker's output topics.", c.messages)
        inserted = CounterMetricFamily("tokenaudit_sink_inserted_rows", "Rows stored, per table.", labels=["table"])
        for table, n in (
            ("usage_rollup", c.inserted_rollups),
            ("usage_sampled", c.inserted_sampled),
            ("anomalies", c.inserted_anomalies),
            ("usage_requests", c.inserted_requests),
        ):
            inserted.add_metric([table], n)
        yield inserted
        yield _counter(
            "tokenaudit_sink_rejected_rows", "Rows ClickHouse refused, kept in rejected_rows.", c.rejected_rows
        )
        yield _counter(
            "tokenaudit_sink_insert_errors", "Failed insert attempts (the store unavailable).", c.insert_errors
        )
        yield _counter(
            "tokenaudit_sink_batch_duplicates",
            "Records a later one of the same key replaced within a batch (step 2 of the flush).",
            c.batch_duplicates,
        )
        yield _counter("tokenaudit_sink_batches", "Batches stored and committed.", c.batches)
        yield _counter(
            "tokenaudit_sink_commits_skipped",
            "Offset commits refused (a rebalance in flight); the next owner reads the rows again, stored idempotently.",
            c.commits_skipped,
        )
        yield _counter("tokenaudit_sink_undecodable", "Records sent to the dead-letter topic.", c.undecodable)
        yield _counter(
            "tokenaudit_sink_ledger_invalid",
            "Token-usage events with no ledger row: undecodable or breaking the contract (the worker dead-letters them).",
            c.ledger_invalid,
        )
        deltas = CounterMetricFamily("tokenaudit_sink_late_deltas", "Late deltas by outcome.", labels=["outcome"])
        for outcome, n in (
            ("merged", c.deltas_merged),
            ("replayed", c.deltas_replayed),
            ("duplicate", c.deltas_duplicate),
        ):
            deltas.add_metric([outcome], n)
        yield deltas


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def metrics_route(sink: Sink) -> Route:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SinkCollector(sink))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])
