"""Follow the anomaly topic: decode each Avro ANOMALY record and hand it to a callback.

The consumer is in a consumer group (``TOKENAUDIT_ANOMALY_GROUP_ID``) with auto-commit off:
an anomaly's offset is committed only after the callback returned (printed, and POSTed to
the webhook if one is set), so a follower that stops, crashes or waits for a dead endpoint
resumes at the first anomaly it had not finished. A new group starts at the end of the topic
(history comes from ClickHouse with ``--since``) unless ``from_beginning``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from tokenaudit.errors import FollowError
from tokenaudit.schemas import ANOMALY, AvroDecodeError, decode

log = logging.getLogger(__name__)

# The callback may wait a long time for a dead webhook; keep the group membership meanwhile
# (the longest librdkafka allows) instead of being evicted and re-reading from the last commit.
_MAX_POLL_INTERVAL_MS = 86_400_000


def follow(
    bootstrap: str,
    topic: str,
    group_id: str,
    on_anomaly: Callable[[dict[str, Any]], None],
    *,
    from_beginning: bool = False,
    max_messages: int | None = None,
    stop: threading.Event | None = None,
    on_undecodable: Callable[[str], None] | None = None,
    poll_seconds: float = 0.5,
    client_config: dict[str, Any] | None = None,
) -> int:
    """Consume until ``stop`` is set or ``max_messages`` anomalies were handled; returns how many.

    If ``on_anomaly`` raises, the offset is not committed and the error propagates.
    """
    consumer = Consumer(
        {
            **(client_config or {"bootstrap.servers": bootstrap}),  # from tokenaudit.infra.kafka_clients
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "max.poll.interval.ms": _MAX_POLL_INTERVAL_MS,
            "session.timeout.ms": 10_000,
        }
    )
    handled = 0
    try:
        consumer.subscribe([topic])
        while not (stop is not None and stop.is_set()) and (max_messages is None or handled < max_messages):
            msg = consumer.poll(poll_seconds)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise FollowError(f"cannot consume {topic!r} at {bootstrap}: {err.str()}")
                # transient (broker down, topic not created yet): librdkafka keeps retrying
                log.warning("anomaly follower: %s", err.str())
                continue
            value = msg.value()
            try:
                if value is None:
                    raise AvroDecodeError("a message without a value (a tombstone)")
                anomaly = decode(value, ANOMALY)
            except AvroDecodeError as exc:
                # not an anomaly record: nothing to deliver; report it and move past it
                where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
                (on_undecodable or log.warning)(f"skipping undecodable message at {where}: {exc}")
            else:
                on_anomaly(anomaly)
                handled += 1
            _commit(consumer, msg)
        return handled
    finally:
        consumer.close()


def _commit(consumer: Consumer, msg: Message) -> None:
    try:
        consumer.commit(message=msg, asynchronous=False)
    except KafkaException as exc:  # e.g. a rebalance took the partition: the next owner re-reads it
        log.warning("anomaly follower: offset commit failed (%s); the anomaly may be delivered again", exc)
