"""Avro single-object encoding: evolution between versions and the specific decode error."""

from __future__ import annotations

import pytest
from test_avro_kafka_roundtrip import sample_event

from tokenaudit.schemas import ANOMALY, EVENT, ROLLUP, SAMPLED, AvroDecodeError, catalog
from tokenaudit.schemas.codec import MAGIC, SchemaCatalog, schema_fingerprint


def test_fingerprint_matches_avro_spec_vector():
    # Avro spec: CRC-64-AVRO of the canonical form "null" is 0x63dd24e7cc258f8a.
    assert schema_fingerprint("null") == (0x63DD24E7CC258F8A).to_bytes(8, "little")


def test_header_is_magic_and_fingerprint():
    data = catalog.encode(EVENT, sample_event())
    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:10] == catalog.current(EVENT).fingerprint


def test_old_writer_reads_with_current_reader_default_filled():
    v1_event = {k: v for k, v in sample_event().items() if k not in ("finish_reason", "event_id", "instance")}
    data = catalog.encode(EVENT, v1_event, version=1)
    assert catalog.writer_of(data).version == 1
    decoded = catalog.decode(data)
    assert decoded["finish_reason"] is None
    assert {k: decoded[k] for k in v1_event} == v1_event


def test_new_writer_reads_with_old_reader():
    """A consumer still on v1 reads v2 messages: the added field is ignored."""
    old_reader = SchemaCatalog()
    for sv in catalog.by_name[EVENT]:
        old_reader.add(EVENT, sv.version, sv.raw)
    old_reader.by_name[EVENT] = [old_reader.version(EVENT, 1)]  # v1 is the newest this reader knows
    data = catalog.encode(EVENT, sample_event())
    decoded = old_reader.decode(data)
    assert "finish_reason" not in decoded
    assert decoded["input_tokens"] == sample_event()["input_tokens"]


def test_event_carries_every_design_field():
    names = {f["name"] for f in catalog.current(EVENT).raw["fields"]}
    required = {
        "client_id",
        "department",
        "api_key_id",
        "client_ip",
        "method",
        "path",
        "status_code",
        "model",
        "error_type",
        "input_tokens",
        "untruncated_input_tokens",
        "truncated",
        "output_tokens",
        "total_tokens",
        "latency_ms",
        "queue_ms",
        "inference_ms",
        "batch_id",
        "batch_size",
        "position_in_batch",
        "device",
        "prompt_digest",
        "request_id",
        "ts",
        "event_id",
        "instance",
    }
    assert required <= names


def test_v3_event_id_is_a_uuid_string_and_older_writers_read_without_one():
    current = catalog.current(EVENT)
    assert current.version >= 3
    (event_id,) = [f for f in current.raw["fields"] if f["name"] == "event_id"]
    assert event_id["type"] == ["null", {"type": "string", "logicalType": "uuid"}] and event_id["default"] is None
    v2_event = {k: v for k, v in sample_event().items() if k not in ("event_id", "instance")}
    decoded = catalog.decode(catalog.encode(EVENT, v2_event, version=2))
    assert decoded["event_id"] is None and decoded["instance"] == "", "v2 records read with v3 defaults"
    record = dict(sample_event(), event_id="0190b9c3-5f4e-7b2a-9c1d-123456789abc", instance="host-a:8000")
    decoded = catalog.decode(catalog.encode(EVENT, record))
    assert decoded["event_id"] == record["event_id"] and isinstance(decoded["event_id"], str)
    assert decoded["instance"] == "host-a:8000"


@pytest.mark.parametrize("name", [ANOMALY, ROLLUP, SAMPLED])
def test_other_schemas_are_registered(name):
    assert catalog.current(name).version >= 1


def _good() -> bytes:
    return catalog.encode(EVENT, sample_event())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than the 10-byte header"),
        (b"\x01\x01garbage-garbage", "bad magic"),
        (b"\x00\x01garbage-garbage", "unknown writer schema id"),  # byte 0: the Confluent wire format
        (MAGIC + b"\x00" * 8 + b"body", "unknown writer schema fingerprint"),
        (_good()[:-5], "truncated"),
        (_good()[:11], "truncated"),
        (_good() + b"\x00", "trailing bytes"),
    ],
)
def test_garbage_raises_specific_error(data, match):
    with pytest.raises(AvroDecodeError, match=match):
        catalog.decode(data)


def test_random_bytes_never_escape_as_other_errors():
    import random

    rng = random.Random(7)
    header = catalog.current(EVENT).header
    for _ in range(500):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        try:
            catalog.decode(header + body)
        except AvroDecodeError:
            pass


def test_wrong_record_type_is_rejected():
    with pytest.raises(AvroDecodeError, match="expected 'anomaly'"):
        catalog.decode(_good(), ANOMALY)


def _rollup_v4() -> dict:
    return {
        "client_id": "acme",
        "department": "eng",
        "api_key_id": "k_1",
        "model": "t5",
        "window_start": 1_750_000_000_000,
        "window_end": 1_750_000_060_000,
        "requests": 3,
        "errors": 0,
        "input_tokens": 30,
        "output_tokens": 9,
        "total_tokens": 39,
        "latency_ms_sum": 30.5,
        "latency_ms_max": 12.0,
        "max_input_tokens": 20,
        "truncated": 0,
        "version": 3,
        "applied_offset": 77,
        "delta_id": None,
        "event_ids": "",
        "latency_hist": "12:1,113:2",
    }


def test_rollup_v3_reads_with_the_v4_reader_and_v4_with_a_v3_reader():
    assert catalog.current(ROLLUP).version == 4
    v3 = {k: v for k, v in _rollup_v4().items() if k != "latency_hist"}
    decoded = catalog.decode(catalog.encode(ROLLUP, v3, version=3))
    assert decoded["latency_hist"] == ""  # not covered, never guessed
    assert {k: decoded[k] for k in v3 if not k.startswith("window_")} == {
        k: v for k, v in v3.items() if not k.startswith("window_")
    }  # (fastavro reads the timestamps as datetimes)
    old_reader = SchemaCatalog()
    for sv in catalog.by_name[ROLLUP]:
        old_reader.add(ROLLUP, sv.version, sv.raw)
    old_reader.by_name[ROLLUP] = [old_reader.version(ROLLUP, v) for v in (1, 2, 3)]  # v3 the newest it knows
    decoded = old_reader.decode(catalog.encode(ROLLUP, _rollup_v4()))
    assert "latency_hist" not in decoded and decoded["requests"] == 3
