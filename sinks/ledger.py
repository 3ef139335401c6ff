"""The ledger's write side: token-usage events -> ``usage_requests`` rows, one per event.

Why the sink reads the token-usage topic itself, rather than the worker forwarding events:
a ledger row needs no window, no state and no ordering, only the event, and the table is
idempotent by event_id (a ReplacingMergeTree whose sorting key ends with it; copies carry the
same bytes). Forwarding would write every event to Kafka a second time and add work to the
worker's per-event path, its busiest loop, to deliver what is already on the topic; the sink
batches, inserts and commits it in its existing flush protocol, in the same consumer group.

Events that break the contract (:func:`tokenaudit.schemas.validation.event_problem`) are not
ledger rows: the worker dead-letters them with the reason, so the sink only counts them (a
second dead letter would count the event twice on the DLQ). A row ClickHouse refuses goes to
``rejected_rows`` like any other table's.

The client IP is stored as the privacy regime asks (``TOKENAUDIT_LEDGER_CLIENT_IP``, see
:mod:`tokenaudit.schemas.client_ip`); the hashed regime's secret is made here when not set.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenaudit.schemas import columns
from tokenaudit.schemas.client_ip import ip_policy as ip_policy
from tokenaudit.schemas.event_ids import derived_event_id

LEDGER_COLUMNS = columns.USAGE_REQUESTS
_LOW_64 = (1 << 64) - 1
IP_SECRET_FILE = "ledger_ip.key"  # noqa: S105 (a file name, not a secret)


def ip_secret(configured: str, data_dir: Path) -> bytes:
    """The configured secret, or one generated once in ``data_dir`` (one host: several sinks
    on several hosts must share TOKENAUDIT_LEDGER_CLIENT_IP_SECRET to hash alike)."""
    if configured:
        return configured.encode()
    path = Path(data_dir) / IP_SECRET_FILE
    if not path.exists():
        # written whole under a temporary name, then linked: no reader sees it half-written,
        # and a second sink racing to create it reads the first one's
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_bytes(32).hex())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


class LedgerRows:
    """Decoded events -> rows in :data:`LEDGER_COLUMNS` order, one at a time: the reference
    the sink's batch conversion (:mod:`tokenaudit.sinks.ledger_batch`) is tested against, and
    how tests seed the ledger. The sink itself keeps the event id and the client-IP policy here."""

    def __init__(self, client_ip: Callable[[str], str]):
        self.client_ip = client_ip

    def event_id(self, ev: dict[str, Any]) -> str:
        return ev["event_id"] or derived_event_id(ev)  # v1/v2 writers and other producers have none

    def row(self, ev: dict[str, Any], event_id: str) -> list[Any]:
        request_id = ev["request_id"]
        if len(request_id) == 32 and request_id == event_id.replace("-", ""):
            request_id = ""  # the app's default (the event id's hex): the queries put it back
        both = int(event_id.replace("-", ""), 16)
        ttft = ev.get("ttft_ms")
        return [
            ev["client_id"],
            ev["ts"],
            both >> 64,
            both & _LOW_64,
            request_id,
            ev.get("instance") or "",
            ev["department"],
            ev["api_key_id"] or "",
            self.client_ip(ev["client_ip"]),
            ev["method"],
            ev["path"],
            ev["status_code"],
            ev["error_type"] or "",
            ev["model"],
            ev["input_tokens"],
            ev["untruncated_input_tokens"],
            ev["output_tokens"],
            ev["total_tokens"],
            bool(ev["truncated"]),
            round(ev["latency_ms"] * 100),  # whole hundredths of a ms (migration 0012 says why)
            round(ev["queue_ms"] * 100),
            round(ev["inference_ms"] * 100),
            None if ttft is None else round(ttft * 100),
            ev["batch_id"] or "",
            ev["batch_size"],
            ev["position_in_batch"],
            ev["finish_reason"] or "",
        ]
