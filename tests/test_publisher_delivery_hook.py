"""The publisher's per-event delivery hook (hard budgets), with an in-memory producer: an event
published with ``on_delivered`` goes through a producer of its own that reports each success
with its (partition, offset); events without a hook stay on the direct producer, which reports
failures only; an event with a hook whose delivery fails, or that is spooled, never calls it and
is not lost (spooled and replayed like any other)."""

from __future__ import annotations

from confluent_kafka import KafkaError

from tests.support import synth
from tests.support.fakes import FakeKafkaError, FakeProducer, fake_publisher
from tests.support.waiting import wait_for
from tokenaudit.inference.publisher import EventPublisher
from tokenaudit.schemas import EVENT, decode

T0 = 1_750_000_000_000


def _publisher(tmp_path) -> tuple[EventPublisher, list[FakeProducer]]:
    return fake_publisher(tmp_path)


def _ids(producer: FakeProducer) -> list[str]:
    return [decode(value, EVENT)["request_id"] for _, value, _, _ in producer.produced]


def test_a_hooked_event_reports_its_offset_and_the_others_stay_on_the_direct_producer(tmp_path):
    pub, made = _publisher(tmp_path)
    reports: list[tuple[str, int, int]] = []
    pub.start()
    try:
        pub.publish(synth.event("plain-0", T0, "acme"))
        for i in range(3):
            pub.publish(
                synth.event(f"hooked-{i}", T0 + i, "capped"), lambda p, o, i=i: reports.append((f"hooked-{i}", p, o))
            )
        pub.publish(synth.event("plain-1", T0 + 5, "acme"))
        wait_for(lambda: len(reports) == 3)
        direct, reported = made
        assert reported.config.get("delivery.report.only.error") is None  # a report for each success
        assert direct.config["delivery.report.only.error"] is True  # unchanged for everyone else
        assert (_ids(direct), _ids(reported)) == (["plain-0", "plain-1"], ["hooked-0", "hooked-1", "hooked-2"])
        assert reports == [("hooked-0", 0, 0), ("hooked-1", 0, 1), ("hooked-2", 0, 2)]
        assert (pub.stats.enqueued, pub.stats.spooled, pub.stats.dropped) == (5, 0, 0)
    finally:
        pub.close(1.0)


def test_a_hooked_event_that_fails_or_is_spooled_never_reports_and_is_replayed(tmp_path):
    pub, made = _publisher(tmp_path)
    reports: list[tuple[int, int]] = []
    pub.start()
    try:
        pub.publish(synth.event("warm", T0, "capped"), lambda p, o: reports.append((p, o)))
        wait_for(lambda: len(made) == 2 and len(reports) == 1)
        made[1].fail_deliveries = 1
        pub.publish(synth.event("failed", T0 + 1, "capped"), lambda p, o: reports.append((p, o)))
        wait_for(lambda: pub.stats.failed == 1)
        wait_for(lambda: pub.stats.replayed == 1 and pub.spool.empty())  # replayed, not lost
        pub._on_error(FakeKafkaError("all brokers down", KafkaError._ALL_BROKERS_DOWN))
        made[0].up = False  # keep it spooling: the broker does not answer
        pub.publish(synth.event("spooled", T0 + 2, "capped"), lambda p, o: reports.append((p, o)))
        assert pub.stats.spooled == 2
        made[0].up = True
        wait_for(lambda: pub.stats.replayed == 2 and pub.spool.empty())
        assert reports == [(0, 0)]  # only the delivered one: the others stay counted by the app
        replayed = [i for producer in made[2:] for i in _ids(producer)]
        assert sorted(replayed) == ["failed", "spooled"] and pub.stats.dropped == 0
    finally:
        pub.close(1.0)
