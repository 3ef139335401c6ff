"""Events whose sender needs their place on the topic: a producer with a delivery report each.

The publisher's direct producer reports failures only (``delivery.report.only.error``): a
Python callback per event would cost every request several microseconds of the event loop's
GIL. The few events that need their (partition, offset) (those of hard-budget scopes, which the
inference app keeps counted until the stream's spend includes that offset) go through this
producer instead, made on first use, so the hot path of everyone else is unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Producer

from tokenaudit.inference.spool_format import Headers
from tokenaudit.schemas import EVENT, decode

log = logging.getLogger(__name__)

OnDelivered = Callable[[int, int], None]  # (partition, offset), on the publisher's thread


class ReportedProducer:
    """A lazily made producer whose events each get a success report; failures go to
    ``on_failure(err, msg, headers)`` (the publisher spools them: no report, no loss)."""

    def __init__(
        self, factory: Callable[[dict], Producer], config: dict[str, Any], topic: str, on_failure: Callable[..., None]
    ):
        self._factory, self._config, self.topic, self._on_failure = factory, config, topic, on_failure
        self._producer: Producer | None = None

    def __len__(self) -> int:
        return len(self._producer) if self._producer is not None else 0

    def produce(self, key: bytes, value: bytes, headers: Headers | None, on_delivered: OnDelivered) -> None:
        """Enqueue (BufferError or KafkaException when the producer refuses, as produce() does)."""
        if self._producer is None:
            self._producer = self._factory(self._config)
        report = functools.partial(self._report, on_delivered, headers)
        self._producer.produce(self.topic, value, key, headers=headers, on_delivery=report)  # type: ignore[arg-type]

    def _report(self, on_delivered: OnDelivered, headers: Headers | None, err, msg) -> None:
        if err is not None:
            self._on_failure(err, msg, list(headers) if headers is not None else None)
            return
        try:
            on_delivered(msg.partition(), msg.offset())
        except Exception:  # a hook's bug must not stop the publisher's thread
            log.exception("a delivery hook failed")

    def poll(self) -> None:
        if self._producer is not None:
            self._producer.poll(0)

    def close(self, timeout: float) -> None:
        """Flush within ``timeout``; what is left is purged and comes back as failures (spooled)."""
        if self._producer is not None and self._producer.flush(timeout):
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(1.0)


class AwaitedEvents:
    """Hard-budget events whose place on the topic is not known yet. The direct delivery report
    tells it; for an event that went to the spool (broker down, a failed delivery) the replay's
    confirmation does, the event found by its id in the replayed record, so its spend is handed
    over to the stream instead of staying counted locally, twice, until its period ends.
    Bounded: past ``limit`` the oldest are forgotten (their spend then stays counted locally
    until the period ends: conservative). Written on the event loop, read on the publisher's
    thread: single dict operations, atomic under the GIL."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._hooks: dict[str, OnDelivered] = {}

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def wrap(self, event_id: str, hook: OnDelivered) -> OnDelivered:
        hooks = self._hooks
        hooks[event_id] = hook
        if len(hooks) > self.limit:
            try:
                hooks.pop(next(iter(hooks)), None)
            except (StopIteration, RuntimeError):  # emptied or changed by the publisher's thread meanwhile
                pass
        return functools.partial(self.delivered, event_id)

    def delivered(self, event_id: str, partition: int, offset: int) -> None:
        hook = self._hooks.pop(event_id, None)
        if hook is not None:
            hook(partition, offset)

    def replayed(self, msg: Any) -> None:
        """A spooled record Kafka confirmed: its event's hook, if it awaits one."""
        event_id = dict(msg.headers() or ()).get("ce_id")  # CloudEvents' id is the event_id
        if event_id is None:
            try:
                event_id = decode(msg.value(), EVENT)["event_id"]
            except Exception:  # not an event this process can read: nothing awaits it
                return
        else:
            event_id = event_id.decode()
        if event_id in self._hooks:
            try:
                self.delivered(event_id, msg.partition(), msg.offset())
            except Exception:  # a hook's bug must not stop the replay
                log.exception("a delivery hook failed")


@dataclass
class ReplayBatch:
    """Delivery reports of one spool segment's replay (each record's confirmation goes to the
    segment's resume log); callbacks run inside ``poll`` on the publisher
    thread, so plain lists suffice."""

    in_flight: int = 0
    confirmed: list[int] = field(default_factory=list)
    failures: list[KafkaError] = field(default_factory=list)
    on_confirmed: Callable[[Any], None] | None = None  # each confirmed message (AwaitedEvents.replayed)

    def report(self, offset: int, err: KafkaError | None, msg) -> None:
        self.in_flight -= 1
        if err is None:
            self.confirmed.append(offset)
            if self.on_confirmed is not None:
                self.on_confirmed(msg)
        else:
            self.failures.append(err)
