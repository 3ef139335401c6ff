"""Rows ClickHouse refuses: telling them from a store that is down, and what is kept of them.

The sink inserts a batch; when ClickHouse refuses it *as data* (a value out of range for its
column, a violated constraint), the sink splits the batch in halves until the refused rows are
isolated and keeps each in ``rejected_rows`` with the reason (:func:`rejected_row`), storing
the rest. Anything not recognised as a data error is the store being unavailable: the whole
batch is retried, so an unknown error never turns a batch into rejected rows.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

# ClickHouse error codes that mean "these rows", not "the store": parse and type errors, a value
# out of range, a violated constraint. Anything else is treated as the store being unavailable
# (retried whole), so an unknown error never turns a whole batch into rejected rows.
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT
        691,  # UNKNOWN_ELEMENT_OF_ENUM
    }
)
_CODE = re.compile(r"Code: (\d+)")
_COLUMN = re.compile(r"column `([^`]+)`")


def is_data_error(exc: BaseException) -> bool:
    """Whether ClickHouse (or the client encoding rows for it) refused the rows themselves."""
    if isinstance(exc, OperationalError):
        return False  # connection refused, timeout: the store
    if isinstance(exc, DataError):
        return True  # clickhouse-connect could not encode a value for its column type
    if isinstance(exc, DatabaseError):
        code = getattr(exc, "code", None)
        if code is None:
            match = _CODE.search(str(exc))
            code = int(match.group(1)) if match else None
        return code in DATA_ERROR_CODES
    return isinstance(exc, (ValueError, TypeError, OverflowError, struct.error))


def rejected_row(table: str, record: dict[str, Any], exc: BaseException) -> list[str]:
    """The ``rejected_rows`` row of a refused record: its table, why (naming the column and the
    value when the client could not encode it), and the record as JSON."""
    reason = " ".join(str(exc).split())[:1000] or type(exc).__name__
    column = _COLUMN.search(reason) if isinstance(exc, DataError) else None
    if column is not None and column.group(1) in record:
        # the client could not encode it (clickhouse-connect names the column, not the value)
        name = column.group(1)
        reason = f"column {name} cannot hold {record[name]!r}: {exc.__cause__ or reason}"
    return [table, reason, json.dumps(record, default=str, sort_keys=True)]
