"""The dashboard's live anomaly feed: one anomaly-topic consumer per API process, fanned out.

Why one consumer, and no consumer group: every browser wants every new anomaly in its scope,
not a share of them, and a live view has nothing to resume (history comes from the
``anomalies`` table). So the consumer assigns itself every partition at the current end
(read with the watermarks before the feed says it is ready, so nothing produced after that is
missed), commits nothing, and hands each decoded anomaly to every subscriber whose scope
(client, department, model) matches. It starts with the first subscriber, not with the
process, so an API nobody watches opens no Kafka connection.

A slow browser does not hold up the others: each subscriber has a bounded queue, and when it
is full the subscriber's oldest anomaly is dropped (and counted); the table keeps them all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from tokenaudit.schemas import ANOMALY, AvroDecodeError, decode

log = logging.getLogger(__name__)

_QUEUE_SIZE = 256


@dataclass(frozen=True)
class Scope:
    """What one subscriber may see (a client key: its own client) and asked to see."""

    client: str | None = None
    department: str | None = None
    model: str | None = None

    def admits(self, anomaly: dict[str, Any]) -> bool:
        return all(
            want is None or anomaly.get(name) == want
            for name, want in (("client_id", self.client), ("department", self.department), ("model", self.model))
        )


@dataclass(eq=False)
class Subscriber:
    scope: Scope
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(_QUEUE_SIZE))
    dropped: int = 0

    def offer(self, anomaly: dict[str, Any]) -> None:
        """On the subscriber's event loop: enqueue, dropping the oldest when full."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(anomaly)


def jsonable_anomaly(record: dict[str, Any]) -> dict[str, Any]:
    """An ANOMALY record as the anomalies report shows it (times as ISO 8601 UTC)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif key in ("ts", "window_start") and isinstance(value, int):
            value = datetime.fromtimestamp(value / 1000, UTC).isoformat().replace("+00:00", "Z")
        out[key] = value
    return out


class AnomalyFeed:
    """The process's one consumer of the anomaly topic and its subscribers."""

    def __init__(self, client_config: Callable[[], dict[str, Any]], topic: str, poll_seconds: float = 0.2):
        self._config = client_config
        self.topic = topic
        self.poll_seconds = poll_seconds
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()  # assigned at the end of every partition
        self.delivered = 0

    def subscribe(self, scope: Scope) -> Subscriber:
        subscriber = Subscriber(scope, asyncio.get_running_loop())
        with self._lock:
            self._subscribers.add(subscriber)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="anomaly-feed", daemon=True)
                self._thread.start()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _assign_at_end(self, consumer: Consumer) -> bool:
        metadata = consumer.list_topics(self.topic, timeout=5)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            return False
        assignment = []
        for partition in sorted(topic.partitions):
            _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=5)
            assignment.append(TopicPartition(self.topic, partition, high if high >= 0 else OFFSET_END))
        consumer.assign(assignment)
        return True

    def _run(self) -> None:
        consumer = Consumer(
            {
                **self._config(),
                # librdkafka wants a group id even for assign(); nothing joins or commits with it
                "group.id": "tokenaudit-dashboard-feed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            }
        )
        try:
            while not self._stop.is_set():
                try:
                    if self._assign_at_end(consumer):
                        break
                except KafkaException as exc:
                    log.warning("anomaly feed: cannot read %s yet (%s)", self.topic, exc)
                self._stop.wait(1.0)
            self.ready.set()
            while not self._stop.is_set():
                msg = consumer.poll(self.poll_seconds)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("anomaly feed: %s", error.str())
                    continue
                try:
                    anomaly = jsonable_anomaly(decode(msg.value() or b"", ANOMALY))
                except AvroDecodeError as exc:
                    log.warning("anomaly feed: skipping an undecodable message (%s)", exc)
                    continue
                self._fan_out(anomaly)
        except Exception:
            log.exception("anomaly feed stopped")
        finally:
            self.ready.clear()
            consumer.close()

    def _fan_out(self, anomaly: dict[str, Any]) -> None:
        with self._lock:
            subscribers = [s for s in self._subscribers if s.scope.admits(anomaly)]
        for subscriber in subscribers:
            try:
                subscriber.loop.call_soon_threadsafe(subscriber.offer, anomaly)
            except RuntimeError:  # its event loop is closed: the browser is gone
                self.unsubscribe(subscriber)
        self.delivered += 1
