"""The worker's event decoder: :func:`tokenaudit.schemas.decode` with ``ts`` kept as int epoch ms.

Why not ``schemas.decode``: fastavro turns the timestamp-millis ``ts`` into an aware
datetime, which the worker immediately turns back into epoch ms, and its generic reader
costs 12-18 us per event here; the generated decoder (:mod:`tokenaudit.schemas.compiled`)
reads the current writer version in about 6 us. Other writer versions go through
``schemas.decode`` (Avro resolution). Bad bytes raise the same :class:`AvroDecodeError`.
"""

from __future__ import annotations

from tokenaudit.schemas import EVENT
from tokenaudit.schemas.compiled import compile_decoder

decode_event = compile_decoder(EVENT)
assert decode_event is not None, "the token-usage event schema is flat by contract"
