"""ClickHouse column types -> Arrow types, for inserts handed to ClickHouse as Arrow.

Why: an Arrow insert is parsed by ClickHouse in C++ with no per-value Python encoding (the
ledger's insert path, bench/bench_ledger.py). The Arrow types are read from the table itself
(``system.columns``), so the migrations stay the one declaration of each column's type; a type
not listed here fails at the first insert, by name, rather than being converted silently.
Arrow's conversion checks ranges: a value its column cannot hold raises ``pyarrow.ArrowInvalid``
(a ``ValueError``, which the sink treats as a refused row).
"""

from __future__ import annotations

import re

import pyarrow as pa

_SIMPLE = {
    "String": pa.string(),
    "Bool": pa.bool_(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
}
_WRAPPER = re.compile(r"^(?:LowCardinality|Nullable)\((.*)\)$")
_DATETIME64 = re.compile(r"^DateTime64\(3(?:, '([^']+)')?\)$")


_LOW_CARDINALITY = re.compile(r"^LowCardinality\((?:Nullable\()?String\)?\)$")


def arrow_type(clickhouse_type: str) -> pa.DataType:
    """The Arrow type a column of ``clickhouse_type`` is written from (nullability is the
    array's). LowCardinality strings as Arrow dictionaries: ClickHouse takes the dictionary
    as it is instead of hashing every value (the ledger's insert: ~2x less store time)."""
    if _LOW_CARDINALITY.match(clickhouse_type):
        return pa.dictionary(pa.int32(), pa.string())
    inner = clickhouse_type
    while (wrapped := _WRAPPER.match(inner)) is not None:
        inner = wrapped.group(1)
    if inner in _SIMPLE:
        return _SIMPLE[inner]
    stamp = _DATETIME64.match(inner)
    if stamp is not None:
        return pa.timestamp("ms", tz=stamp.group(1))
    raise TypeError(f"no Arrow type for the ClickHouse type {clickhouse_type!r}")
