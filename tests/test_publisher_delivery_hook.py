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


def test_a_hooked_event_that_fails_or_is_spooled_reports_its_offset_once_replayed(tmp_path):
    """The replay's confirmation tells where a spooled event landed, so its spend is handed over
    to the stream like any other (not counted locally, twice, until its period ends)."""
    pub, made = _publisher(tmp_path)
    reports: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        return lambda p, o: reports.setdefault(name, (p, o))

    pub.start()
    try:
        pub.publish(synth.event("warm", T0, "capped"), hook("warm"))
        wait_for(lambda: len(made) == 2 and len(reports) == 1)
        made[1].fail_deliveries = 1
        pub.publish(synth.event("failed", T0 + 1, "capped"), hook("failed"))
        wait_for(lambda: pub.stats.failed == 1)
        wait_for(lambda: pub.stats.replayed == 1 and pub.spool.empty())  # replayed, not lost
        wait_for(lambda: "failed" in reports)  # its place is known once replayed
        pub._on_error(FakeKafkaError("all brokers down", KafkaError._ALL_BROKERS_DOWN))
        made[0].up = False  # keep it spooling: the broker does not answer
        pub.publish(synth.event("spooled", T0 + 2, "capped"), hook("spooled"))
        pub.publish(synth.event("plain", T0 + 3, "acme"))  # no hook: nothing awaits it
        assert pub.stats.spooled == 3
        assert set(reports) == {"warm", "failed"}  # nothing is known of the spooled one yet
        made[0].up = True
        wait_for(lambda: pub.stats.replayed == 3 and pub.spool.empty())
        wait_for(lambda: len(reports) == 3)
        placed = {
            request_id: (0, offset)
            for producer in made[2:]
            for offset, request_id in enumerate(_ids(producer))
            if request_id in ("failed", "spooled")
        }
        assert reports == {"warm": (0, 0), **placed} and len(placed) == 2  # each where the replay put it
        assert not pub._awaited and pub.stats.dropped == 0  # no hook left waiting
    finally:
        pub.close(1.0)
