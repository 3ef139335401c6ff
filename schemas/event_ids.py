"""Event identity: the one definition of "the same event", shared by every consumer that
counts events (the stream worker's deduplication, ``verify``'s reconciliation, the ledger).

An event written by this project carries ``event_id`` (UUIDv7 text, token_usage_event v3),
kept by every copy of it. Records without one (schema v1/v2, or another producer) get a
*derived* id: a hash of their decoded fields, so the same event gives the same id whatever its
wire format or writer version. Derived ids are formatted as UUIDv8 text (RFC 9562's version
for custom layouts), so every id fits a ClickHouse ``UUID`` column and cannot collide with a
producer's v7 id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

# Fields that identify the request itself; the v3 additions are left out so that a v3 record
# whose event_id was dropped by some intermediary still hashes like its v2 twin.
_NOT_HASHED = frozenset({"event_id", "instance"})


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _canonical(value: Any) -> Any:
    # timestamps hash as int epoch ms whichever decoder read them (fastavro gives datetimes)
    return (value - _EPOCH) // timedelta(milliseconds=1) if isinstance(value, datetime) else value


def derived_event_id(event: dict[str, Any]) -> str:
    """A stable UUIDv8 text for an event without ``event_id``, from its decoded fields."""
    fields = {k: _canonical(v) for k, v in event.items() if k not in _NOT_HASHED and v is not None}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    digest = bytearray(hashlib.blake2b(canonical.encode(), digest_size=16).digest())
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def event_id_of(event: dict[str, Any]) -> str:
    """The event's identity: its ``event_id``, or the derived one when it has none."""
    event_id = event.get("event_id")
    return event_id if event_id else derived_event_id(event)


def id_hash64(event_id: str) -> int:
    """A 64-bit hash of an event id for compact sets (stable across processes, unlike hash())."""
    return int.from_bytes(id_digest(event_id), "little")


def id_digest(event_id: str) -> bytes:
    """:func:`id_hash64` as its 8 little-endian bytes: what packed id sets hold (no int is made,
    which matters on the stream worker's per-event path)."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).digest()


# Packed id sets: the concatenated 8-byte digests of a set of events, as base64 text (the
# usage_rollup record's and table's ``event_ids``). 8 bytes an id: a window of 25 events
# carries 268 characters; a plain list of UUID texts would be 37 bytes an id.
def pack_ids(digests: bytes | bytearray) -> str:
    return base64.b64encode(digests).decode("ascii")


def unpack_ids(text: str | None) -> bytes:
    """The digests of a packed id set ("" or None: none); malformed text raises ValueError."""
    if not text:
        return b""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"malformed packed id set: {exc}") from None
    if len(raw) % 8:
        raise ValueError(f"packed id set of {len(raw)} bytes is not a whole number of 8-byte ids")
    return raw


def ids_contain(digests: bytes | bytearray, digest: bytes) -> bool:
    """Whether ``digest`` is one of the 8-byte ids in ``digests`` (a match must start on an
    8-byte boundary: ``find`` may also hit across two neighbouring ids)."""
    i = digests.find(digest)
    while i >= 0:
        if not i & 7:
            return True
        i = digests.find(digest, i + 1)
    return False


_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_uuid_text(value: str) -> bool:
    """Canonical 8-4-4-4-12 hex UUID text (what a ClickHouse UUID column takes)."""
    return _UUID_TEXT.fullmatch(value) is not None
