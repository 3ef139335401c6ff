"""What the worker reads: source records (aiokafka's, or tuples in tests and replays) and the
decoder of the token-usage events they carry (step 1 of :mod:`tokenaudit.streams.processor`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

from tokenaudit.schemas import EVENT, records
from tokenaudit.schemas.compiled import compile_decoder

# Events as dicts with ``ts`` in int epoch ms: the native codec reads the current writer
# version in ~1.5 us (generated Python without a compiler: ~7 us; fastavro's generic reader:
# 12-18 us); older writers go through fastavro.
_decode_event = compile_decoder(EVENT)
if _decode_event is None:
    raise AssertionError("the token-usage event schema is flat by contract")
# What the decoder returns has the current reader schema's fields, which is what the typed
# record declares (tests/test_records.py checks the TypedDict against the current .avsc).
decode_event = cast("Callable[[bytes], records.TokenUsageEvent]", _decode_event)


class SourceRecord(Protocol):
    """A source record as aiokafka's ConsumerRecord carries it."""

    offset: int
    key: bytes | None
    value: bytes | None


#: (offset, key, value), as tests and replays hand them in
SourceTuple = tuple[int, bytes | None, bytes | None]
