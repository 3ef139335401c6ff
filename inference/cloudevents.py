"""CloudEvents headers on each event (Kafka protocol binding, binary mode).

Routers, tracing tools and Kafka UIs read ``ce_*`` headers without decoding the Avro value:
``ce_specversion`` 1.0, ``ce_id`` (the event_id: every copy of an event keeps it, as
CloudEvents' id + source uniqueness asks), ``ce_source`` (``tokenaudit/<instance>``),
``ce_type`` (the Avro record's full name), ``ce_time`` (the event's ``ts``, RFC 3339) and
``content-type`` (``application/avro``). Written here rather than with the ``cloudevents``
SDK: its Kafka binding builds a message object and a header dict per event, several times
this cost on the hot path, for six constant-shaped headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from tokenaudit.schemas import EVENT, AvroDecodeError
from tokenaudit.schemas.codec import full_name
from tokenaudit.schemas.compiled import compile_decoder

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/avro"

HeaderList = list[tuple[str, bytes]]

#: ``.000Z`` .. ``.999Z``: the millisecond part of ``ce_time`` by lookup (one concatenation
#: instead of a %-format per event)
_MILLIS = tuple(b".%03dZ" % n for n in range(1000))


def _seconds_text(second: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()


class CloudEventHeaders:
    """The headers of one event, as the list confluent-kafka's ``produce(headers=)`` takes;
    values as bytes (measured: str values cost librdkafka's binding ~1 us more per event).

    :attr:`of_event` is what the request path calls: a closure over pre-encoded constants
    (measured: 0.28 us an event, against 0.68-0.87 us for the same work as a method reading
    attributes of ``self``, on this hot path's budget of 10 us)."""

    def __init__(self, source: str):
        self._second: tuple[int, bytes] = (-1, b"")  # one tuple: threads see a consistent pair
        self._decode = compile_decoder(EVENT)  # timestamps as epoch ms, as events hold them
        self.of_event = self._compile(source)

    def _compile(self, source: str) -> Callable[[Mapping[str, Any]], HeaderList]:
        spec = ("ce_specversion", SPEC_VERSION.encode())
        ce_source = ("ce_source", source.encode())
        ce_type = ("ce_type", full_name(EVENT).encode())
        content_type = ("content-type", CONTENT_TYPE.encode())
        millis, seconds_of = _MILLIS, self._seconds

        def of_event(event: Mapping[str, Any]) -> HeaderList:
            second, ms = divmod(event["ts"], 1000)  # rfc3339() inlined: this runs once per request
            cached, text = self._second
            if cached != second:
                text = seconds_of(second)
            return [
                spec,
                ("ce_id", event["event_id"].encode()),
                ce_source,
                ce_type,
                ("ce_time", text + millis[ms]),
                content_type,
            ]

        return of_event

    def __call__(self, event: Mapping[str, Any]) -> HeaderList:
        return self.of_event(event)

    def of_value(self, value: bytes) -> HeaderList | None:
        """The headers of an encoded event (a failed delivery's report has none); None if the
        value is not an event (then the record is spooled without them, as it was sent)."""
        try:
            return self.of_event(self._decode(value)) if self._decode is not None else None
        except AvroDecodeError:
            return None

    def rfc3339(self, ts_ms: int) -> bytes:
        """``2026-01-02T03:04:05.678Z``; the seconds part is kept from the previous call
        (events of one second share it), so most calls look up the milliseconds only."""
        second, ms = divmod(ts_ms, 1000)
        cached, text = self._second
        if cached != second:
            text = self._seconds(second)
        return text + _MILLIS[ms]

    def _seconds(self, second: int) -> bytes:
        text = _seconds_text(second)
        self._second = (second, text)
        return text
