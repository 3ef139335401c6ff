"""The typed records of schemas/records.py against the current .avsc of each record type, field
by field (names, order, types, nullability), and the builders against the codecs."""

from __future__ import annotations

import typing

import pytest

from tokenaudit.schemas import ANOMALY, EVENT, ROLLUP, SAMPLED, catalog, encode
from tokenaudit.schemas import records as rec
from tokenaudit.schemas.compiled import compile_decoder


def decode(data: bytes, name: str) -> dict:
    return compile_decoder(name)(data)  # timestamps as int epoch ms, as the records hold them


RECORDS = {EVENT: rec.TokenUsageEvent, ROLLUP: rec.UsageRollup, SAMPLED: rec.SampledRecord, ANOMALY: rec.Anomaly}
AVRO_TYPES = {"string": str, "int": int, "long": int, "double": float, "boolean": bool}


def _python_type(avro) -> object:
    if isinstance(avro, list):  # ["null", T]
        assert len(avro) == 2 and avro[0] == "null", avro
        return _python_type(avro[1]) | None
    if isinstance(avro, dict):  # logical types: timestamp-millis is int epoch ms, uuid is text
        return AVRO_TYPES[avro["type"]]
    return AVRO_TYPES[avro]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_typed_record_matches_the_current_schema(name):
    schema = catalog.current(name).raw
    hints = typing.get_type_hints(RECORDS[name])
    assert list(hints) == [f["name"] for f in schema["fields"]], (
        f"{name}: fields differ from {name} v{catalog.current(name).version} (order included)"
    )
    for field in schema["fields"]:
        assert hints[field["name"]] == _python_type(field["type"]), (
            f"{name}.{field['name']}: typed as {hints[field['name']]}, the schema says {field['type']}"
        )


class _Request:
    """What the inference app's AuditContext holds for one request."""

    request_id, event_id, ts_ms, client_id, department = (
        "r1",
        "0190a4d2-1c3b-7d4e-8f00-0123456789ab",
        1_750_000_000_123,
        "acme",
        "eng",
    )
    api_key_id, client_ip, model, input_tokens, untruncated_input_tokens = "k_1", "10.0.0.1", "t5", 12, 40
    truncated, output_tokens, queue_ms, inference_ms, batch_id = True, 5, 1.5, 7.25, "b1"
    batch_size, position_in_batch, device, prompt_digest, finish_reason, error_type = 4, 2, "cpu", "ab", "length", None
    ttft_ms, tpot_ms = 3.5, 1.25  # streamed responses (schema v4)


def test_builders_make_records_the_codecs_round_trip():
    ev = rec.token_usage_event(_Request(), "POST", "/v1/generate" + "x" * 400, 200, "host:8000", 9.5)
    assert set(ev) == set(typing.get_type_hints(rec.TokenUsageEvent))
    assert len(ev["path"]) == rec.MAX_EVENT_PATH and ev["total_tokens"] == 17
    assert decode(encode(EVENT, ev), EVENT) == ev

    sampled = rec.sampled_record(ev, "top_fraction", 3.0)
    assert decode(encode(SAMPLED, sampled), SAMPLED) == sampled

    class Totals:
        requests, errors, input_tokens, output_tokens, total_tokens = 3, 1, 30, 9, 39
        latency_ms_sum, latency_ms_max, max_input_tokens, truncated, applied_offset = 30.5, 12.0, 20, 1, 77
        hist: typing.ClassVar[dict[int, int]] = {113: 2, 12: 1}  # two requests of 17-32 tokens, one of 1-16

    rollup = rec.usage_rollup("acme", "eng", "k_1", "t5", 1_750_000_000_000, 1_750_000_060_000, Totals())
    assert rollup["version"] == rollup["requests"] == 3 and rollup["delta_id"] is None
    assert rollup["latency_hist"] == "12:1,113:2"  # cells in order: one window, one text
    assert decode(encode(ROLLUP, rollup), ROLLUP) == rollup

    critical = rec.anomaly(
        "token_spike",
        "acme",
        "eng",
        "t5",
        1_750_000_000_000,
        200.0,
        100.0,
        "spike",
        ts=1_750_000_060_000,
        api_key_id="k_1",
    )
    warning = rec.anomaly(
        "token_spike",
        "acme",
        "eng",
        "t5",
        1_750_000_000_000,
        150.0,
        100.0,
        "spike",
        ts=1_750_000_060_000,
        api_key_id="k_1",
    )
    assert (critical["severity"], warning["severity"]) == ("critical", "warning")
    assert critical["anomaly_id"] == warning["anomaly_id"]  # the same rule and window: the same anomaly
    assert decode(encode(ANOMALY, critical), ANOMALY) == critical
    # ids of windows without a department and key are what they were before windows had them
    assert rec.anomaly_id("error_rate", "acme", "t5", 0) != rec.anomaly_id("error_rate", "acme", "t5", 0, "eng")
