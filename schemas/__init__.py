"""Avro schemas (``avsc/<name>.v<N>.avsc``) and their single-object encoding.

Public API: :func:`encode`, :func:`decode`, :class:`AvroDecodeError`, :data:`registry`.
"""

from tokenaudit.schemas.codec import (
    EVENT,
    ANOMALY,
    ROLLUP,
    SAMPLED,
    AvroDecodeError,
    SchemaRegistry,
    decode,
    encode,
    registry,
)

__all__ = ["EVENT", "ANOMALY", "ROLLUP", "SAMPLED", "AvroDecodeError", "SchemaRegistry",
           "decode", "encode", "registry"]
