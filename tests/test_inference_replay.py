"""Spool replay against the session's real broker: after a partial failure only the records
Kafka did not confirm are sent again (the reproduction where 10 spooled events became 19 on
the topic), segments of the previous release are replayed, headers survive the spool."""

from __future__ import annotations

import random
import string
import zlib

from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from tests.support.apps import read_messages
from tests.support.waiting import wait_for
from tokenaudit.inference.audit import AuditContext
from tokenaudit.inference.publisher import EventPublisher
from tokenaudit.inference.spool_format import encode_legacy_record
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import EVENT, decode, encode

LIMIT = 4096  # the topic's max.message.bytes: one event batch fits, the oversized event does not


def _event(i: int, client_id: str = "acme", error_type: str | None = None) -> dict:
    ctx = AuditContext.new(f"replay-{i}")
    ctx.client_id, ctx.model, ctx.error_type = client_id, "t5-tiny", error_type
    return ctx.to_event("POST", "/v1/generate", 200)


def _topic_messages(bootstrap: str, topic: str, expect: int, timeout: float = 30.0, settle: float = 1.5) -> list:
    """(partition, event, headers) of every message: read until ``expect`` arrived and nothing
    more came for ``settle`` seconds, so extra copies would be seen."""
    return [
        (m.partition(), decode(m.value(), EVENT), dict(m.headers() or []))
        for m in read_messages(bootstrap, topic, expect, timeout, settle)
    ]


def _raise_topic_limit(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    change = ConfigResource(
        "topic",
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", str(1 << 20), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for fut in admin.incremental_alter_configs([change]).values():
        fut.result(30)


def test_replay_after_a_partial_failure_sends_only_what_kafka_did_not_confirm(kafka_bootstrap, topic_name, tmp_path):
    ensure_topics(kafka_bootstrap, {topic_name: 2}, configs={topic_name: {"max.message.bytes": str(LIMIT)}})
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    # left by the previous release (its framing, its file name)
    legacy = [_event(i) for i in range(3)]
    (spool_dir / f"{'1'.zfill(16)}.spool").write_bytes(
        b"".join(encode_legacy_record(b"acme", encode(EVENT, e)) for e in legacy)
    )
    # ten events spooled while the broker was unreachable; one of another client (so another
    # partition, so a batch of its own) is larger than the topic accepts (a huge field that is not
    # capped: paths are cut to 256 characters)
    assert zlib.crc32(b"acme") % 2 != zlib.crc32(b"big-1") % 2
    noise = "".join(random.Random(5).choices(string.ascii_letters, k=3 * LIMIT))
    outage = [_event(10 + i) if i != 5 else _event(15, "big-1", noise) for i in range(10)]
    offline = EventPublisher(
        f"127.0.0.1:{free_port()}", topic_name, spool_dir, message_timeout_ms=1000, retry_seconds=0.3
    ).start()
    for e in outage:
        offline.publish_encoded(e["client_id"].encode(), encode(EVENT, e), headers=[("ce_id", e["event_id"].encode())])
    wait_for(lambda: offline.stats.spooled == 10)
    offline.close(timeout=1)

    pub = EventPublisher(kafka_bootstrap, topic_name, spool_dir, message_timeout_ms=5000, retry_seconds=0.2).start()
    try:
        # the broker answers: everything but the refused record is delivered, and the refused one
        # is retried alone, round after round
        wait_for(lambda: pub.stats.replay_failed >= 3)
        assert pub.stats.replayed == 12 and pub.problem() is None
        # the stuck segment is the last one: new events go straight to Kafka meanwhile
        assert pub.state == "direct" and pub.spool.bytes > 0
        late = _event(99)
        pub.publish(late)
        first = _topic_messages(kafka_bootstrap, topic_name, expect=13)
        assert sorted(e["request_id"] for _, e, _ in first) == sorted(
            e["request_id"] for e in legacy + outage + [late] if e["client_id"] == "acme"
        ), "each confirmed record sent once"
        # the operator raises the topic's limit: the next round sends that one record
        _raise_topic_limit(kafka_bootstrap, topic_name)
        wait_for(pub.spool.empty)
        assert pub.stats.replayed == 13 and pub.stats.enqueued == 1 and pub.stats.dropped == 0
        everything = _topic_messages(kafka_bootstrap, topic_name, expect=14)
        ids = [e["request_id"] for _, e, _ in everything]
        assert sorted(ids) == sorted(e["request_id"] for e in legacy + outage + [late]), "nothing lost, no copies"
        by_id = {e["request_id"]: (partition, e, headers) for partition, e, headers in everything}
        for e in outage:
            _partition, got, headers = by_id[e["request_id"]]
            assert got["event_id"] == e["event_id"] and headers == {"ce_id": e["event_id"].encode()}
        assert by_id["replay-15"][0] != by_id["replay-10"][0] and by_id["replay-15"][1]["error_type"] == noise
        assert not list(spool_dir.glob("*.seg")) and not list(spool_dir.glob("*.spool"))
        assert not list(spool_dir.glob("*.ack"))
    finally:
        pub.close(timeout=5)
