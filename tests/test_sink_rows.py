"""The sink's late-delta merge, as pure logic: a delta is merged once per delta id and once per
event id; a copy of an event the row counts (in its window or merged earlier) is skipped."""

from __future__ import annotations

from tests.support.synth import synthetic_event_id
from tokenaudit.schemas.event_ids import id_bytes, ids_contain, pack_ids, unpack_ids
from tokenaudit.sinks import rows as R

WS = 1_750_000_000_000


def _ids(*names: str) -> str:
    return pack_ids(b"".join(id_bytes(synthetic_event_id(n)) for n in names))


def _row(requests: int, ids: str, applied_offset: int = 10) -> dict:
    return {
        "client_id": "c",
        "department": "d",
        "api_key_id": "",
        "model": "m",
        "window_start": WS,
        "window_end": WS + 60_000,
        "requests": requests,
        "errors": 0,
        "input_tokens": 10 * requests,
        "output_tokens": requests,
        "total_tokens": 11 * requests,
        "latency_ms_sum": 1.0 * requests,
        "latency_ms_max": 1.0,
        "max_input_tokens": 10,
        "truncated": 0,
        "version": requests,
        "applied_offset": applied_offset,
        "event_ids": ids,
        "delta_id": None,
    }


def _delta(name: str, offset: int) -> dict:
    return dict(_row(1, _ids(name), offset), delta_id=f"u:0:{offset}")


def test_deltas_merge_once_per_delta_and_once_per_event():
    row = dict(_row(2, _ids("a", "b")), late_ids=[])
    assert R.delta_skip(row, _delta("a", 20)) == "duplicate"  # a copy of an event the window counted
    merged = R.merge_delta(row, _delta("c", 21))
    assert merged["requests"] == 3 and merged["version"] == 3 and merged["late_ids"] == ["u:0:21"]
    assert ids_contain(unpack_ids(merged["event_ids"]), id_bytes(synthetic_event_id("c")))
    assert R.delta_skip(merged, _delta("c", 21)) == "replayed"  # the same delta again
    assert R.delta_skip(merged, _delta("c", 35)) == "duplicate"  # a later copy of the merged event
    assert R.delta_skip(merged, _delta("e", 9)) == "replayed"  # at or below the row's offset: counted
    assert R.delta_skip(merged, _delta("d", 36)) is None
    assert R.delta_skip(None, _delta("d", 36)) is None
    first = R.merge_delta(None, _delta("x", 40))  # a window the row table never had
    assert first["requests"] == 1 and R.delta_skip(first, _delta("x", 41)) == "duplicate"


def test_packed_ids_match_only_whole_ids():
    a, b = id_bytes(synthetic_event_id("one")), id_bytes(synthetic_event_id("two"))
    packed = a + b
    assert ids_contain(packed, a) and ids_contain(packed, b)
    straddle = packed[8:24]  # 16 bytes across two ids: not an id of the set
    assert not ids_contain(packed, straddle)
    assert unpack_ids(pack_ids(packed)) == packed and unpack_ids("") == b""


def test_id_bytes_accepts_exactly_uuid_text():
    """The worker's inline check (id_bytes) and the shared rule (is_uuid_text) agree."""
    import random
    import uuid

    from tokenaudit.schemas.event_ids import is_uuid_text

    rnd = random.Random(5)
    alphabet = "0123456789abcdefABCDEF-g \t\n+_é٣"
    samples = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(200)]
    for text in list(samples):
        for _ in range(20):  # one character changed, kept or lost, at a random place
            i = rnd.randrange(36)
            samples.append(text[:i] + rnd.choice(alphabet) + text[i + 1 :])
            samples.append(text[:i] + text[i + 1 :] + rnd.choice("0a"))
    samples += [t.upper() for t in samples[:50]] + ["", "x" * 36, "-" * 36]
    for text in samples:
        got = id_bytes(text)
        assert (got is not None) == is_uuid_text(text), text
        assert got is None or got == uuid.UUID(text).bytes
