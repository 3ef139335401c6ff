"""Avro schemas (``avsc/<name>.v<N>.avsc``) and their single-object encoding.

Public API: :func:`encode`, :func:`decode`, :class:`AvroDecodeError`, :data:`catalog` (the
schema versions shipped in ``avsc/``). The rest of the contract: typed records and their
builders (``records``), ClickHouse column lists (``columns``), the event rule
(``validation``), identifiers, event ids, and the HTTP error envelope (``http_errors``).
"""

from tokenaudit.errors import AvroDecodeError
from tokenaudit.schemas.codec import (
    ANOMALY,
    BUDGET,
    EVENT,
    ROLLUP,
    SAMPLED,
    SPEND,
    SchemaCatalog,
    catalog,
    decode,
    encode,
)

__all__ = [
    "ANOMALY",
    "BUDGET",
    "EVENT",
    "ROLLUP",
    "SAMPLED",
    "SPEND",
    "AvroDecodeError",
    "SchemaCatalog",
    "catalog",
    "decode",
    "encode",
]
