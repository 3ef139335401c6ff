"""The ledger rows of one sink batch: a tuple of the event's fields when consumed, Arrow columns
when inserted.

Why not a row per event (:meth:`LedgerRows.row`) through clickhouse-connect's ``insert``: that
path spent ~5 us an event in Python building the row (the event id's halves, three roundings)
and ~5 more encoding it value by value, where the goal is 20 us an event for the whole sink on
one core (bench/bench_ledger.py). Here an event costs one tuple when consumed; a batch's
transformations run per column in C (pyarrow's conversions and kernels, one ``bytes.fromhex``
and one ``struct.unpack`` for all event ids) and ClickHouse parses the Arrow table itself.
The result is row for row what :meth:`LedgerRows.row` builds (tested), which stays the
reference and what tests seed the ledger with.

Ranges are checked by Arrow's conversions: a value its column cannot hold (a batch size over
UInt16, a negative or infinite latency) raises ``pyarrow.ArrowInvalid``, a ``ValueError``, so the
sink's split isolates the event into ``rejected_rows`` like a value ClickHouse refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenaudit.sinks.ledger import LEDGER_COLUMNS

#: what is kept of a consumed event (its event id given or derived)
FIELDS = (
    "event_id",
    "client_id",
    "ts",
    "request_id",
    "instance",
    "department",
    "api_key_id",
    "client_ip",
    "method",
    "path",
    "status_code",
    "error_type",
    "model",
    "input_tokens",
    "untruncated_input_tokens",
    "output_tokens",
    "total_tokens",
    "truncated",
    "latency_ms",
    "queue_ms",
    "inference_ms",
    "ttft_ms",
    "batch_id",
    "batch_size",
    "position_in_batch",
    "finish_reason",
)
#: a ledger row as consumed: the values of FIELDS
Row = tuple[Any, ...]

# one C call per event: the decoders return every field of the current schema, older writers'
# records resolved to it (schemas/compiled.py)
_row = itemgetter(*FIELDS)
_rest = itemgetter(*FIELDS[1:])
_AT = {name: i for i, name in enumerate(FIELDS)}
#: optional text: null on the topic, '' in the table
_EMPTY_WHEN_NULL = frozenset({"instance", "api_key_id", "error_type", "batch_id", "finish_reason"})
#: the fields as they come off the wire (the decoders' Python types); text unless named here
_NUMBERS = {"ts": pa.int64(), "truncated": pa.bool_()}
_NUMBERS.update(dict.fromkeys(("latency_ms", "queue_ms", "inference_ms", "ttft_ms"), pa.float64()))
_NUMBERS.update(
    dict.fromkeys(
        (
            "status_code",
            "input_tokens",
            "untruncated_input_tokens",
            "output_tokens",
            "total_tokens",
            "batch_size",
            "position_in_batch",
        ),
        pa.int64(),
    )
)
_WIRE = pa.struct([(name, _NUMBERS.get(name, pa.string())) for name in FIELDS])
#: stored as whole hundredths of a ms (migration 0012 says why)
_X100 = {f"{name}_x100": name for name in ("latency_ms", "queue_ms", "inference_ms", "ttft_ms")}


@contextmanager
def _column(name: str) -> Iterator[None]:
    """Arrow's conversion errors name the value, not the column: this names it."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
        raise ValueError(f"column {name}: {exc}") from exc


def row_of(ev: Mapping[str, Any], event_id: str) -> Row:
    return _row(ev) if ev["event_id"] else (event_id, *_rest(ev))  # derived ids: v1/v2 writers


def record_of(row: Row) -> dict[str, Any]:
    """A consumed row as a record (what ``rejected_rows`` keeps of a refused one)."""
    return dict(zip(FIELDS, row, strict=True))


def arrow_table(rows: Sequence[Row], types: Mapping[str, pa.DataType], client_ip: Callable[[str], str]) -> pa.Table:
    """``rows`` as the ledger's columns (:data:`LEDGER_COLUMNS`), in ``types`` (the table's)."""
    n = len(rows)
    # one C++ pass over the tuples (a struct array's children are the fields' columns): ~3x less
    # CPU than transposing them in Python and converting column by column
    wire = dict(zip(FIELDS, pa.array(rows, _WIRE).flatten(), strict=True))
    # canonical UUID text (checked when consumed, or derived): 32 hex digits once the dashes go
    hexes = "".join([r[0] for r in rows]).replace("-", "")
    halves = np.frombuffer(bytes.fromhex(hexes), dtype=">u8").astype(np.uint64)
    arrays: dict[str, pa.Array] = {
        "event_id_hi": pa.array(halves[0::2], types["event_id_hi"]),
        "event_id_lo": pa.array(halves[1::2], types["event_id_lo"]),
    }
    # the app's default request id (the event id's hex) is stored as '': the queries put it back
    default_ids = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(hexes.encode())])
    request_ids = wire["request_id"]
    arrays["request_id"] = pc.if_else(pc.equal(request_ids, default_ids.cast(pa.string())), "", request_ids)
    if client_ip is not str:
        at = _AT["client_ip"]
        wire["client_ip"] = pa.array([client_ip(r[at]) for r in rows], pa.string())
    for name, source in _X100.items():
        with _column(name):
            # round half to even on the same double as round(ms * 100); a safe cast refuses what
            # the column cannot hold (negative, too large, not finite)
            arrays[name] = pc.cast(pc.round(pc.multiply(wire[source], 100.0)), types[name])
    for name in LEDGER_COLUMNS:
        if name in arrays:
            continue
        with _column(name):
            array = wire[name]
            if name in _EMPTY_WHEN_NULL:
                array = array.fill_null("")
            target = types[name]
            # LowCardinality as a dictionary; numbers cast with their range checked
            arrays[name] = pc.dictionary_encode(array) if pa.types.is_dictionary(target) else pc.cast(array, target)
    return pa.Table.from_arrays([arrays[name] for name in LEDGER_COLUMNS], names=list(LEDGER_COLUMNS))


class LedgerBatch:
    """The ledger rows of one sink batch, each event id once (a later copy is not kept: copies
    carry the same bytes)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ev: Mapping[str, Any], event_id: str) -> bool:
        """Keep the event's row; False when its event id is in the batch already."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        self.rows.append(row_of(ev, event_id))
        return True
