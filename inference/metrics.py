"""Prometheus metrics of the inference app, in a registry of its own (one per app instance, so
tests and benchmarks can run several apps in one process). Publisher counters are read at
scrape time by a collector, which keeps the prometheus client off the publishing hot path."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PublisherCollector:
    def __init__(self, get_publisher: Callable, get_extra: Callable[[], dict]):
        self.get_publisher = get_publisher
        self.get_extra = get_extra

    def collect(self):
        pub = self.get_publisher()
        if pub is not None:
            s = pub.stats
            for name, value, doc in [
                ("events_enqueued", s.enqueued, "Events handed to the Kafka producer."),
                ("events_produced", pub.produced, "Events acknowledged by Kafka on the direct path (acks=all)."),
                ("events_failed", s.failed, "Deliveries that failed (the event was then spooled)."),
                ("events_spooled", s.spooled, "Events written to the on-disk spool."),
                ("events_replayed", s.replayed, "Spooled events delivered to Kafka on replay."),
                ("events_dropped", s.dropped, "Events that will not reach Kafka, whatever the reason (the counters "
                                              "below name some reasons; the rest: full spool, drop newest)."),
                ("events_dropped_unauthenticated", s.dropped_unauthenticated,
                 "Unauthenticated events dropped because they filled their share of the spool."),
                ("spool_write_failures", s.write_failures, "Events dropped because a spool write failed (disk full, I/O)."),
                ("spool_quarantined", s.quarantined, "Spooled records found corrupt and moved to the quarantine folder."),
                ("spool_torn_tails", s.torn_tails, "Spooled records cut short by a crash mid-write (kept in quarantine)."),
                ("events_replay_failed", s.replay_failed, "Replayed deliveries that failed (the event stays spooled)."),
            ]:
                yield CounterMetricFamily(f"tokenaudit_{name}", doc, value=value)
            yield GaugeMetricFamily("tokenaudit_producer_queue_depth", "Messages in the producer's local queue.",
                                    value=pub.queue_depth)
            yield GaugeMetricFamily("tokenaudit_spool_bytes", "Bytes in the on-disk event spool.", value=pub.spool.bytes)
            yield GaugeMetricFamily("tokenaudit_producer_spooling", "1 while events go to the spool.",
                                    value=1 if pub.state == "spooling" else 0)
        for name, (value, doc) in self.get_extra().items():
            yield GaugeMetricFamily(f"tokenaudit_{name}", doc, value=value)


class AppMetrics:
    def __init__(self, get_publisher: Callable, get_extra: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter("tokenaudit_requests", "HTTP requests audited.", ["client_id", "model", "status"],
                                registry=self.registry)
        self.input_tokens = Counter("tokenaudit_input_tokens", "Input tokens fed to the model.",
                                    ["client_id", "model"], registry=self.registry)
        self.output_tokens = Counter("tokenaudit_output_tokens", "Tokens generated.", ["client_id", "model"],
                                     registry=self.registry)
        self.registry.register(_PublisherCollector(get_publisher, get_extra))
        self._children: dict[tuple, tuple] = {}

    def observe(self, event: dict) -> None:
        """Count one audited request. Children are cached per label set: ``labels()`` costs
        several microseconds per call, a dict hit well under one."""
        key = (event["client_id"], event["model"], event["status_code"])
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(key[0], key[1], str(key[2])),
                                               self.input_tokens.labels(key[0], key[1]),
                                               self.output_tokens.labels(key[0], key[1]))
        children[0].inc()
        if event["input_tokens"]:
            children[1].inc(event["input_tokens"])
        if event["output_tokens"]:
            children[2].inc(event["output_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
