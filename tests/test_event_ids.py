"""Event identity: event_id when present, else a stable id derived from the decoded fields."""

from __future__ import annotations

import uuid

from test_avro_kafka_roundtrip import sample_event

from tokenaudit.schemas import EVENT, catalog, decode
from tokenaudit.schemas.event_ids import derived_event_id, event_id_of, id_hash64, is_uuid_text


def test_event_id_wins_and_derived_ids_are_stable_uuid8_text():
    e = sample_event(3)
    assert event_id_of(e) == e["event_id"]
    bare = {k: v for k, v in e.items() if k not in ("event_id", "instance")}
    derived = event_id_of(bare)
    assert derived == event_id_of(dict(bare)) == derived_event_id(dict(e, event_id="x", instance="other"))
    assert uuid.UUID(derived).version == 8 and is_uuid_text(derived)
    assert derived != event_id_of(dict(bare, input_tokens=bare["input_tokens"] + 1))


def test_the_same_event_gets_the_same_id_whatever_writer_version():
    bare = {k: v for k, v in sample_event(5).items() if k not in ("event_id", "instance")}
    v2 = decode(catalog.encode(EVENT, bare, version=2), EVENT)
    v3 = decode(catalog.encode(EVENT, dict(bare, event_id=None)), EVENT)
    assert event_id_of(v2) == event_id_of(v3)
    from tokenaudit.schemas.compiled import compile_decoder

    fast = compile_decoder(EVENT)(catalog.encode(EVENT, dict(bare, event_id=None)))  # ts as int ms
    assert isinstance(fast["ts"], int) and event_id_of(fast) == event_id_of(v3)


def test_uuid_text_and_hash():
    assert is_uuid_text("0190b9c3-5f4e-7b2a-9c1d-123456789abc")
    for bad in (
        "",
        "0190b9c3-5f4e-7b2a-9c1d-123456789abg",
        "0190b9c3_5f4e-7b2a-9c1d-123456789abc",
        "+190b9c3-5f4e-7b2a-9c1d-123456789abc",
        "0190b9c35f4e7b2a9c1d123456789abc",
    ):
        assert not is_uuid_text(bad), bad
    assert id_hash64("a") == id_hash64("a") != id_hash64("b") and 0 <= id_hash64("a") < 2**64
