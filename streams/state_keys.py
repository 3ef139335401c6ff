"""The worker state's keys: one builder and one parser per kind, so a key's layout is written
down once (it is part of the changelog, which a new release must still read).

A key is a one-letter kind, the separator (``\\x1f``, which no valid identifier holds: see
:mod:`tokenaudit.schemas.identifiers`) and the kind's fields:

=====  ============================================  =============================================
kind   fields                                        value
=====  ============================================  =============================================
``w``  client, department, api key id, model,        the window (:class:`~tokenaudit.streams.window_state.Window`)
       window start (epoch ms)
``c``  client                                        the client's baseline (``C_*`` slots)
``p``  source partition                              the partition's meta record (``M_*`` slots)
``n``  source partition, model                       the model's latency norm (``N_*`` slots)
``s``  source partition, model                       the model's top-fraction sketch
``d``  source partition, first offset, last offset,  an id chunk (:mod:`tokenaudit.streams.dedup`)
       piece
``b``  source partition, client, department         their budget spend this day and month (:mod:`.spend`)
``a``  source partition, scope, scope id             the budget alerts raised (:mod:`.budget_alerts`)
=====  ============================================  =============================================

Windows written before windows had a department and key in their identity have four fields
(``w``, client, model, window start); :func:`parse_window_key` reads both.

The record key of the rollups topic (client, department, api key id, model, window start,
UTF-8, compacted per window) is built here too: :func:`rollup_record_key`.
"""

from __future__ import annotations

SEP = "\x1f"
WINDOW = "w"
CLIENT = "c"
META = "p"
NORM = "n"
SKETCH = "s"
CHUNK = "d"
SPEND = "b"
ALERTS = "a"
WINDOW_PREFIX = WINDOW + SEP
CLIENT_PREFIX = CLIENT + SEP
META_PREFIX = META + SEP
CHUNK_PREFIX = CHUNK + SEP
SPEND_PREFIX = SPEND + SEP


def window_key(client: str, department: str, api_key_id: str, model: str, window_start: int) -> str:
    return f"w{SEP}{client}{SEP}{department}{SEP}{api_key_id}{SEP}{model}{SEP}{window_start}"


def parse_window_key(key: str) -> tuple[str, str | None, str, str, int]:
    """(client, department, api key id, model, window start); department None for a window
    kept from before windows had one in their key (its department is in its value)."""
    parts = key.split(SEP)
    if len(parts) == 6:
        return parts[1], parts[2], parts[3], parts[4], int(parts[5])
    return parts[1], None, "", parts[2], int(parts[3])


def window_start_of(key: str) -> int:
    return int(key.rsplit(SEP, 1)[1])


#: ``client_key(client)``: a C-level concatenation (no Python frame): it runs for every
#: emitted window and every new one
client_key = CLIENT_PREFIX.__add__


def meta_key(partition: int) -> str:
    return f"p{SEP}{partition}"


def norm_key(partition: int, model: str) -> str:
    return f"n{SEP}{partition}{SEP}{model}"


def sketch_key(partition: int, model: str) -> str:
    return f"s{SEP}{partition}{SEP}{model}"


def chunk_key(partition: int, first: int, last: int, piece: int) -> str:
    return f"d{SEP}{partition}{SEP}{first}{SEP}{last}{SEP}{piece}"


def spend_key(partition: int, client: str, department: str) -> str:
    return f"b{SEP}{partition}{SEP}{client}{SEP}{department}"


def alerts_key(partition: int, scope: str, scope_id: str) -> str:
    return f"a{SEP}{partition}{SEP}{scope}{SEP}{scope_id}"


def kind(key: str) -> str:
    """The key's kind (one of the letters above)."""
    return key[0]


def rollup_record_key(client: str, department: str, api_key_id: str, model: str, window_start: int) -> bytes:
    """The rollups topic's record key: one per window, so compaction keeps its latest version."""
    return f"{client}{SEP}{department}{SEP}{api_key_id}{SEP}{model}{SEP}{window_start}".encode()
