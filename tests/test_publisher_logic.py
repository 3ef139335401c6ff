"""The publisher's spooling decision as pure logic, with an in-memory producer: an event the
producer refuses, one whose delivery fails, and every event while all brokers are down goes to
the spool; the spool is replayed in order once the broker answers; every event ends up on the
topic or counted as dropped, never neither, never twice. (The broker versions, with real faults:
test_inference_spool.py, test_inference_outage.py, test_inference_replay.py.)"""

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


def _events(n: int, start: int = 0) -> list[dict]:
    return [synth.event(f"r{i}", T0 + i, "acme") for i in range(start, start + n)]


def _on_topic(made: list[FakeProducer]) -> list[str]:
    return [decode(value, EVENT)["request_id"] for producer in made for _, value, _, _ in producer.produced]


def test_a_refused_event_is_spooled_and_replayed_once_the_producer_takes_events(tmp_path):
    pub, made = _publisher(tmp_path)
    direct = made[0]
    direct.refuse = True  # the local queue is full
    for ev in _events(3):
        pub.publish(ev)
    assert (pub.state, pub.stats.spooled, pub.stats.enqueued, direct.produced) == ("spooling", 3, 0, [])
    pub.publish(_events(1, 3)[0])  # while spooling, new events queue behind the spooled ones
    assert pub.stats.spooled == 4
    direct.refuse = False
    pub.start()
    try:
        wait_for(lambda: pub.state == "direct" and pub.spool.empty())
        pub.publish(_events(1, 4)[0])
        direct_ids, replayed_ids = (_on_topic([producer]) for producer in made)
        assert (replayed_ids, direct_ids) == (["r0", "r1", "r2", "r3"], ["r4"])  # in order, each once
        assert (pub.stats.replayed, pub.stats.enqueued, pub.stats.dropped) == (4, 1, 0)
    finally:
        pub.close(1.0)


def test_a_failed_delivery_is_spooled_then_replayed(tmp_path):
    pub, made = _publisher(tmp_path)
    made[0].fail_deliveries = 1
    pub.start()
    try:
        pub.publish(_events(1)[0])
        wait_for(lambda: pub.stats.failed == 1)
        wait_for(lambda: pub.stats.replayed == 1 and pub.spool.empty())
        assert _on_topic(made) == ["r0"] and (pub.stats.enqueued, pub.stats.spooled, pub.stats.dropped) == (1, 1, 0)
    finally:
        pub.close(1.0)


def test_all_brokers_down_spools_everything_until_the_broker_answers(tmp_path):
    pub, made = _publisher(tmp_path)
    direct = made[0]
    direct.up = False
    pub._on_error(FakeKafkaError("all brokers down", KafkaError._ALL_BROKERS_DOWN))
    assert pub.state == "spooling"
    pub.start()
    try:
        for ev in _events(5):
            pub.publish(ev)
        wait_for(lambda: direct.probes >= 3)  # several probes of the down broker: nothing leaves the spool
        assert (direct.produced, pub.stats.spooled, len(made)) == ([], 5, 1)
        direct.up = True
        wait_for(lambda: pub.state == "direct" and pub.spool.empty())
        assert _on_topic(made) == [f"r{i}" for i in range(5)] and pub.stats.dropped == 0
    finally:
        pub.close(1.0)


def test_cloudevents_headers_travel_with_each_event_through_the_spool(tmp_path):
    """Direct, refused (spooled) and failed-delivery (spooled) events reach the topic with
    their own CloudEvents headers, after the spool's replay too."""
    made: list[FakeProducer] = []

    def factory(config: dict) -> FakeProducer:
        made.append(FakeProducer(config))
        return made[-1]

    pub = EventPublisher(
        "fake:9092",
        "usage",
        tmp_path / "spool",
        retry_seconds=0.05,
        message_timeout_ms=1000,
        producer_factory=factory,
        cloudevents_source="tokenaudit/host-a",
    )
    direct = made[0]
    events = _events(3)
    direct.fail_deliveries = 1
    pub.publish(events[0])  # its delivery fails: spooled from the delivery report
    direct.poll()
    direct.refuse = True
    pub.publish(events[1])  # refused: spooled
    direct.refuse = False
    pub.start()
    try:
        wait_for(lambda: pub.state == "direct" and pub.spool.empty())
        pub.publish(events[2])
        wait_for(lambda: sum(len(p.produced) for p in made) == 3)
        got = {}
        for producer in made:
            for _, value, _, headers in producer.produced:
                as_text = {k: v.decode() if isinstance(v, bytes) else v for k, v in headers}
                got[decode(value, EVENT)["event_id"]] = as_text
        for event in events:
            h = got[event["event_id"]]
            assert (h["ce_id"], h["ce_source"], h["ce_specversion"]) == (event["event_id"], "tokenaudit/host-a", "1.0")
            assert h["ce_type"] == "io.tokenaudit.TokenUsageEvent" and h["content-type"] == "application/avro"
            assert h["ce_time"].endswith("Z")
        assert (pub.stats.spooled, pub.stats.dropped) == (2, 0)
    finally:
        pub.close(1.0)
