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


@dataclass
class ReplayBatch:
    """Delivery reports of one spool segment's replay (each record's confirmation goes to the
    segment's resume log); callbacks run inside ``poll`` on the publisher
    thread, so plain lists suffice."""

    in_flight: int = 0
    confirmed: list[int] = field(default_factory=list)
    failures: list[KafkaError] = field(default_factory=list)

    def report(self, offset: int, err: KafkaError | None, msg) -> None:
        self.in_flight -= 1
        if err is None:
            self.confirmed.append(offset)
        else:
            self.failures.append(err)
