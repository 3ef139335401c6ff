"""Generated encoders and decoders (generated Python and the native C codec) agree with the
fastavro-backed codec, byte for byte and record for record, and fail on bad bytes with the
same error type."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from test_avro_kafka_roundtrip import sample_event

from tokenaudit.schemas import ANOMALY, EVENT, ROLLUP, SAMPLED, AvroDecodeError, catalog, decode, encode
from tokenaudit.schemas.compiled import NATIVE, compile_decoder, compile_encoder

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TEXTS = ["", "acme", "ünïcödé ✓ 日本", "x" * 300, "a\x00b"]
INTS = [0, 1, 63, 64, -64, -65, 127, 128, 8191, 8192, 16383, 16384, -1, 2**31 - 1, -(2**31)]
LONGS = INTS + [2**40, -(2**40), 2**63 - 1, -(2**63)]


def _value(ftype, rng: random.Random):
    if isinstance(ftype, list):
        return None if rng.random() < 0.3 else _value(ftype[1], rng)
    if isinstance(ftype, dict) and ftype["logicalType"] == "uuid":  # text on every path
        return str(uuid.UUID(int=rng.getrandbits(128)))
    if isinstance(ftype, dict):  # timestamp-millis: int epoch ms on the generated paths
        return rng.choice([0, 1_795_000_000_000, 1_795_000_000_123, -5])
    return {
        "string": lambda: rng.choice(TEXTS),
        "int": lambda: rng.choice(INTS),
        "long": lambda: rng.choice(LONGS),
        "boolean": lambda: rng.random() < 0.5,
        "double": lambda: rng.choice([0.0, -1.5, 1e300, 3.14159, 7.0, float("inf")]),
    }[ftype]()


@pytest.fixture(params=[False, True], ids=["python", "native"])
def native(request) -> bool:
    if request.param and not NATIVE:
        pytest.fail("the native codec (schemas/_native.pyx) is not built: see the install output")
    return request.param


def test_the_native_codec_is_built_and_used_by_default():
    # `make` builds it (setup.py, Cython); the worker's throughput figures depend on it
    assert NATIVE
    assert type(compile_encoder(EVENT).__self__).__name__ == "FlatCodec"


def random_record(name: str, rng: random.Random) -> dict:
    return {f["name"]: _value(f["type"], rng) for f in catalog.current(name).raw["fields"]}


def as_epoch_ms(record: dict) -> dict:
    return {k: (v - EPOCH) // timedelta(milliseconds=1) if isinstance(v, datetime) else v for k, v in record.items()}


@pytest.mark.parametrize("name", [EVENT, ROLLUP, SAMPLED, ANOMALY])
def test_generated_codecs_match_the_schemas_codec(name, native):
    fast_encode, fast_decode = compile_encoder(name, native=native), compile_decoder(name, native=native)
    memo_encode = compile_encoder(name, memo_large=True, native=native)
    assert fast_encode is not None and fast_decode is not None and memo_encode is not None
    rng = random.Random(11)
    for _ in range(300):
        record = random_record(name, rng)
        data = encode(name, record)
        assert fast_encode(record) == data
        assert memo_encode(record) == memo_encode(record) == data  # second call: from the memo
        assert fast_decode(data) == as_epoch_ms(decode(data, name)) == record


def test_encoder_hands_what_it_does_not_write_to_the_schemas_codec(native):
    fast_encode = compile_encoder(EVENT, native=native)
    event = sample_event()  # ts as a datetime: the generic codec's job
    assert fast_encode(event) == encode(EVENT, event)
    for name, odd in [("input_tokens", 2**40), ("input_tokens", True), ("client_id", "\ud800"), ("latency_ms", "1.5")]:
        record = dict(event, **{name: odd})
        try:
            expected = encode(EVENT, record)
        except Exception as generic_error:  # the same error, from the same codec
            with pytest.raises(type(generic_error)):
                fast_encode(record)
        else:  # fastavro writes it (a bool as an int): the same bytes
            assert fast_encode(record) == expected
    with pytest.raises(Exception) as generic_error:  # noqa: PT011 (whatever it is, the twin must raise the same)
        encode(EVENT, {k: v for k, v in event.items() if k != "model"})
    with pytest.raises(type(generic_error.value)):
        fast_encode({k: v for k, v in event.items() if k != "model"})


def test_decoder_reads_older_writer_versions_through_avro_resolution(native):
    fast_decode = compile_decoder(EVENT, native=native)
    v1_event = {k: v for k, v in sample_event().items() if k != "finish_reason"}
    got = fast_decode(catalog.encode(EVENT, v1_event, version=1))
    assert got["finish_reason"] is None
    assert got["ts"] == int(v1_event["ts"].timestamp() * 1000)  # int epoch ms on this path too
    assert got["request_id"] == v1_event["request_id"]


def _good() -> bytes:
    return catalog.encode(EVENT, sample_event())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than the 10-byte header"),
        (b"\x01\x01garbage-garbage", "bad magic"),
        (b"\x00\x01garbage-garbage", "unknown writer schema id"),  # byte 0: the Confluent wire format
        (b"\xc3\x01" + b"\x00" * 8 + b"body", "unknown writer schema fingerprint"),
        (_good()[:-5], "truncated"),
        (_good()[:11], "truncated"),
        (_good() + b"\x00", "trailing bytes"),
        (catalog.encode(ROLLUP, random_record(ROLLUP, random.Random(1))), "expected 'token_usage_event'|expected"),
    ],
)
def test_decoder_errors_name_the_problem(data, match, native):
    with pytest.raises(AvroDecodeError, match=match):
        compile_decoder(EVENT, native=native)(data)


def test_corrupted_bytes_decode_as_the_codec_does_or_fail_cleanly(native):
    """Every single-byte corruption and truncation of real events: the generated decoder either
    returns exactly what fastavro returns, or raises AvroDecodeError (it is stricter on union
    indexes and over-long varints); never another exception, never a different record."""
    fast_decode = compile_decoder(EVENT, native=native)
    rng = random.Random(5)
    agreed = rejected = 0
    for _n in range(40):
        good = bytearray(encode(EVENT, random_record(EVENT, rng)))
        variants = [bytes(good[:cut]) for cut in range(10, len(good))]
        for _ in range(40):
            bad = bytearray(good)
            bad[rng.randrange(10, len(bad))] = rng.getrandbits(8)
            variants.append(bytes(bad))
        for data in variants:
            try:
                got = fast_decode(data)
            except AvroDecodeError:
                rejected += 1
                continue
            assert repr(got) == repr(as_epoch_ms(decode(data, EVENT)))  # repr: a corrupted double may be NaN
            agreed += 1
    assert agreed > 100 and rejected > 100  # both branches exercised
