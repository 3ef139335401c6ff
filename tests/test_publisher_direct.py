"""The hot path's ``produce()`` call as librdkafka takes it, against the session's real broker.

The publisher passes every argument by position (confluent-kafka parses a keyword about 0.5 us
slower per request), so this checks that each one lands where meant: the key, the partition
left to the partitioner (by key), the timestamp left to librdkafka (now), and the event's six
CloudEvents headers byte for byte."""

from __future__ import annotations

import logging
import time
import zlib

from confluent_kafka import TIMESTAMP_CREATE_TIME

from tests.support.apps import read_messages
from tokenaudit.inference.audit import AuditContext
from tokenaudit.inference.cloudevents import CloudEventHeaders
from tokenaudit.inference.publisher import EventPublisher
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.schemas import EVENT, decode

PARTITIONS = 4


def _event(i: int, client_id: str) -> dict:
    ctx = AuditContext.new(f"direct-{i}")
    ctx.client_id, ctx.model, ctx.input_tokens = client_id, "t5-tiny", i
    return ctx.to_event("POST", "/v1/generate", 200, "direct-test")


def test_publish_hands_librdkafka_the_key_partitioner_timestamp_and_headers(
    kafka_bootstrap, topic_name, tmp_path, caplog
):
    ensure_topics(kafka_bootstrap, {topic_name: PARTITIONS})
    clients = [f"client-{n}" for n in range(8)]
    events = [_event(i, clients[i % len(clients)]) for i in range(40)]
    source = "tokenaudit/direct-test"
    before_ms = time.time() * 1000
    publisher = EventPublisher(
        kafka_bootstrap, topic_name, tmp_path / "spool", linger_ms=5, cloudevents_source=source
    ).start()
    try:
        for event in events:
            publisher.publish(event)
    finally:
        publisher.close(30)
    after_ms = time.time() * 1000
    # the call by position worked as such (a failed one is logged, then made by keyword)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert (publisher.stats.enqueued, publisher.stats.spooled, publisher.stats.dropped) == (40, 0, 0)

    messages = read_messages(kafka_bootstrap, topic_name, len(events), timeout=30.0, settle=0.0)
    headers_of = CloudEventHeaders(source)
    sent = {e["event_id"]: e for e in events}
    received = []
    for msg in messages:
        event = sent[decode(msg.value(), EVENT)["event_id"]]
        received.append(event["event_id"])
        assert msg.key() == event["client_id"].encode()
        assert msg.headers() == headers_of(event)  # all six, in order, as bytes
        kind, ts = msg.timestamp()
        assert kind == TIMESTAMP_CREATE_TIME and before_ms - 1 <= ts <= after_ms + 1
        # librdkafka's default partitioner (consistent_random): CRC32 of the key
        assert msg.partition() == zlib.crc32(msg.key()) % PARTITIONS
    assert sorted(received) == sorted(sent)  # each once
    assert len({m.partition() for m in messages}) > 1
