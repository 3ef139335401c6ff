"""The shapes the model is compiled for, and the token ids it gives back.

XLA compiles one program per input shape, so batches are padded to a few bucket sizes (rows,
prompt length, new tokens); what comes back is read as ids and cut where each row really ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def parse_buckets(spec: str, cap: int) -> list[int]:
    """ "1,4,16" -> sorted sizes, clipped to ``cap`` and always ending with ``cap``."""
    sizes = sorted({min(int(x), cap) for x in spec.split(",") if x.strip()} | {cap})
    if sizes[0] < 1:
        raise ValueError(f"bucket sizes must be >= 1: {spec!r}")
    return sizes


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


def as_token_ids(output: Any) -> np.ndarray:
    """Ids from whatever ``generate`` (or a model call) returned: a tensor of ids, an output
    object with ``sequences``, or logits of shape (batch, length, vocab), which get an argmax."""
    if hasattr(output, "sequences"):
        output = output.sequences
    elif hasattr(output, "logits") and not hasattr(output, "shape"):
        output = output.logits
    arr = np.asarray(output)
    if arr.ndim == 3 and np.issubdtype(arr.dtype, np.floating):
        arr = arr.argmax(axis=-1)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"cannot read token ids from an output of shape {arr.shape} and dtype {arr.dtype}")
    return arr


def count_generated(row: Sequence[int], eos_ids: set[int], limit: int) -> tuple[list[int], str]:
    """The ids a row really generated: up to ``limit``, cut after the first EOS (kept: it was
    generated and billed), padding after it dropped."""
    out: list[int] = []
    for tok in row[:limit]:
        out.append(int(tok))
        if int(tok) in eos_ids:
            return out, "stop"
    return out, "length"
