"""What makes a token-usage event usable: the one rule, shared by the stream worker (which
dead-letters an event that breaks it) and ``verify`` (which leaves such an event out of its
count, as the worker does).

The rule: identifiers follow :mod:`tokenaudit.schemas.identifiers` (client_id and model
required; department and api_key_id optional), token counts lie in ``[0, max_tokens]``, the
status code is an HTTP status (100-599), latency is finite and not negative, and an
``event_id``, when present, is canonical UUID text. The clock check (an event too far ahead
of the worker's clock) needs the worker's clock and stays with the worker.

The worker's per-event path inlines the same checks for the valid case (a few comparisons,
no call) and calls :func:`event_problem` only for the reason of a rejection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tokenaudit.schemas.event_ids import is_uuid_text
from tokenaudit.schemas.identifiers import identifier_problem

#: the default of TOKENAUDIT_MAX_TOKENS_PER_EVENT
DEFAULT_MAX_TOKENS = 10_000_000
#: (field, required) of the identifiers an event carries
EVENT_IDENTIFIERS = (("client_id", True), ("model", True), ("department", False), ("api_key_id", False))
TOKEN_FIELDS = ("input_tokens", "output_tokens", "total_tokens")


def event_problem(ev: Mapping[str, Any], max_tokens: int = DEFAULT_MAX_TOKENS) -> str | None:
    """Why an event is unusable (``"invalid: ..."``), or None."""
    for name, required in EVENT_IDENTIFIERS:
        value = ev.get(name)
        if value is None and not required:
            continue
        problem = identifier_problem(value, required=required)
        if problem is not None:
            return f"invalid: {name} {problem}"
    for name in TOKEN_FIELDS:
        if ev[name] < 0:
            return f"invalid: negative {name}"
        if ev[name] > max_tokens:
            return f"invalid: {name} {ev[name]} above the limit of {max_tokens}"
    if not 100 <= ev["status_code"] <= 599:
        return f"invalid: status_code {ev['status_code']}"
    if not math.isfinite(ev["latency_ms"]) or ev["latency_ms"] < 0:
        return "invalid: latency_ms"
    event_id = ev.get("event_id")
    if event_id is not None and not is_uuid_text(event_id):
        return f"invalid: event_id is not UUID text: {event_id!r:.60}"
    return None
