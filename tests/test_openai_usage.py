"""The OpenAI-shaped ``/v1/organization/usage/completions`` (reports/openai_usage.py): its
parameters (pure parsing, no store), then over a real chDB store through the usage API: the
documented shape field by field, pagination over more buckets than one page, totals equal to
``/v1/usage``, grouping, filters and key scoping; plus the priced ``/v1/report`` and the report
filters the dashboard uses."""

from __future__ import annotations

from decimal import Decimal

import pytest
from starlette.testclient import TestClient

from tests.support.usage_seed import CLIENTS, MODELS, seed_rollups, seed_sampled, totals, utcnow
from tokenaudit.errors import QueryParamError
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.store import Store
from tokenaudit.reports.openai_usage import PATH, encode_page, parse_bucket_query
from tokenaudit.reports.prices import PriceTable, cost_report
from tokenaudit.reports.usage_api import create_app
from tokenaudit.settings import load_settings

NOW = 1_790_000_000
RESULT_FIELDS = {
    "object",
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    # extensions
    "num_errors",
    "num_truncated",
    "latency_ms_avg",
    "latency_ms_max",
    "latency_ms_p50",
    "latency_ms_p95",
}
PRICES = """
currency = "EUR"
[models."t5-tiny"]
input_per_1k = 0.0004
output_per_1k = "0.0016"
[models."gpt2-tiny"]
input_per_1k = 0.001
output_per_1k = 0.002
"""


# --- parameters (no store) ---------------------------------------------------------------------


def _parse(window: int = 60, **params: str | list[str]):
    items = [(k, x) for k, v in params.items() for x in (v if isinstance(v, list) else [v])]
    return parse_bucket_query(items, window, now=NOW)


def test_defaults_and_limits_follow_openai_per_bucket_width():
    start = str(NOW - 40 * 86400)
    assert (_parse(start_time=start).width, _parse(start_time=start).limit) == (86400, 7)
    assert _parse(start_time=start).end == NOW  # end_time defaults to now
    for width, (seconds, default, maximum) in {
        "1m": (60, 60, 1440),
        "1h": (3600, 24, 168),
        "1d": (86400, 7, 31),
    }.items():
        q = _parse(start_time=start, bucket_width=width)
        assert (q.width, q.limit) == (seconds, default)
        assert _parse(start_time=start, bucket_width=width, limit=str(maximum)).limit == maximum
        with pytest.raises(QueryParamError) as exc:
            _parse(start_time=start, bucket_width=width, limit=str(maximum + 1))
        assert exc.value.param == "limit"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "-5"}, "start_time"),
        ({"start_time": "1.5"}, "start_time"),
        ({"start_time": "²"}, "start_time"),
        ({"start_time": str(NOW), "end_time": str(NOW - 1)}, "end_time"),
        ({"start_time": "1", "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": "1", "group_by": "batch"}, "group_by"),
        ({"start_time": "1", "models": "x' OR '1'='1"}, "models"),
        ({"start_time": "1", "user_ids": "a;DROP"}, "user_ids"),
        ({"start_time": "1", "limit": "0"}, "limit"),
        ({"start_time": "1", "page": "not-a-cursor"}, "page"),
        ({"start_time": "1", "format": "csv"}, "format"),
        ({"start_time": ["1", "2"]}, "start_time"),
    ],
)
def test_bad_parameters_name_the_parameter(params, param):
    with pytest.raises(QueryParamError) as exc:
        _parse(**params)
    assert exc.value.param == param, str(exc.value)


def test_bucket_width_finer_than_the_stream_window_is_refused():
    with pytest.raises(QueryParamError, match="finer than the stream's 300s window") as exc:
        _parse(window=300, start_time="1", bucket_width="1m")
    assert exc.value.param == "bucket_width"
    assert _parse(window=300, start_time="1", bucket_width="1h").width == 3600


def test_arrays_repeat_or_take_brackets_or_commas_and_map_to_columns():
    q = _parse(
        start_time="1",
        **{"group_by[]": ["model", "project_id"], "group_by": "user_id,model", "models": ["a", "b"], "user_ids": "c,d"},
    )
    assert q.group_by == ("model", "project_id", "user_id")
    assert q.filters == {"model": ("a", "b"), "client_id": ("c", "d")}


def test_a_cursor_belongs_to_its_query():
    q = _parse(start_time=str(NOW - 3600), bucket_width="1m", limit="10")
    page = encode_page(q, 10)
    assert _parse(start_time=str(NOW - 3600), bucket_width="1m", limit="10", page=page).first == 10
    for other in ({"start_time": str(NOW - 3599)}, {"start_time": str(NOW - 3600), "bucket_width": "1h"}):
        with pytest.raises(QueryParamError) as exc:
            _parse(**other, page=page)
        assert exc.value.param == "page"
    with pytest.raises(QueryParamError):  # past the last bucket
        _parse(start_time=str(NOW - 3600), bucket_width="1m", page=encode_page(q, 60))


# --- over the store --------------------------------------------------------------------------


@pytest.fixture
def api(ch_client, ch_database, tmp_path):
    store = Store(ch_client, ch_database)
    store.migrate()
    now = utcnow()
    rows = seed_rollups(store, now)
    seed_sampled(store, now)
    registry = tmp_path / "api_keys.toml"
    keys = {client: add_key(registry, client, dept) for client, dept in CLIENTS.items()}
    keys["admin"] = add_key(registry, "ops", "", role="admin")
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    settings = load_settings(data_dir=tmp_path, api_keys_file=registry, price_table=prices)
    app = create_app(store, settings)
    return TestClient(app), keys, rows, now, prices


def _get(http, path, key, **params):
    return http.get(path, params=params, headers={"Authorization": f"Bearer {key}"})


def _all_pages(http, key, **params):
    pages, page = [], None
    while True:
        body = _get(http, PATH, key, **params, **({"page": page} if page else {})).json()
        pages.append(body)
        if not body["has_more"]:
            return pages
        page = body["next_page"]


def test_shape_field_by_field_and_pagination(api):
    http, keys, rows, now, _ = api
    start = int(now.timestamp()) - 40 * 60
    pages = _all_pages(http, keys["admin"], start_time=start, end_time=int(now.timestamp()), bucket_width="1m", limit=7)
    assert len(pages) == 6  # 40 one-minute buckets, 7 a page
    for i, page in enumerate(pages):
        assert set(page) == {"object", "data", "has_more", "next_page"}
        assert page["object"] == "page"
        assert page["has_more"] == (i < 5) and (page["next_page"] is None) == (i == 5)
        assert isinstance(page["next_page"], str | None)
    buckets = [b for p in pages for b in p["data"]]
    assert len(buckets) == 40
    for i, bucket in enumerate(buckets):
        assert set(bucket) == {"object", "start_time", "end_time", "results"}
        assert bucket["object"] == "bucket"
        assert (bucket["start_time"], bucket["end_time"]) == (start + 60 * i, start + 60 * (i + 1))
        for result in bucket["results"]:
            assert set(result) == RESULT_FIELDS
            assert result["object"] == "organization.usage.completions.result"
            assert all(result[f] is None for f in ("project_id", "user_id", "api_key_id", "model", "batch"))
            assert result["input_cached_tokens"] == result["input_audio_tokens"] == result["output_audio_tokens"] == 0
            for f in ("input_tokens", "output_tokens", "num_model_requests", "num_errors", "num_truncated"):
                assert isinstance(result[f], int) and result[f] >= 0
            assert result["latency_ms_avg"] == pytest.approx(12.5) and result["latency_ms_max"] == 40.0
    assert sum(1 for b in buckets if b["results"]) == 30  # the seeded 30 minutes; the rest are empty
    expected = totals(rows, 0)
    got = [r for b in buckets for r in b["results"]]
    assert sum(r["input_tokens"] for r in got) == sum(t["input_tokens"] for t in expected.values())
    assert sum(r["output_tokens"] for r in got) == sum(t["output_tokens"] for t in expected.values())
    assert sum(r["num_model_requests"] for r in got) == sum(t["requests"] for t in expected.values())
    assert sum(r["num_errors"] for r in got) == sum(t["errors"] for t in expected.values())


def test_grouped_totals_equal_usage(api):
    http, keys, _rows, now, _ = api
    end = int(now.timestamp())
    start = end - 3 * 3600
    from datetime import UTC, datetime

    iso = {
        "since": datetime.fromtimestamp(start, UTC).isoformat(),
        "until": datetime.fromtimestamp(end, UTC).isoformat(),
    }
    for group, by, field in (
        ("user_id", "client", "client_id"),
        ("project_id", "department", "department"),
        ("model", "model", "model"),
    ):
        usage = {r[field]: r for r in _get(http, "/v1/usage", keys["admin"], by=by, **iso).json()["rows"]}
        pages = _all_pages(http, keys["admin"], start_time=start, end_time=end, bucket_width="1h", group_by=group)
        sums: dict[str, dict[str, int]] = {}
        for result in (r for p in pages for b in p["data"] for r in b["results"]):
            s = sums.setdefault(result[group], {"input_tokens": 0, "output_tokens": 0, "requests": 0})
            s["input_tokens"] += result["input_tokens"]
            s["output_tokens"] += result["output_tokens"]
            s["requests"] += result["num_model_requests"]
        assert set(sums) == set(usage), group
        for name, s in sums.items():
            u = usage[name]
            assert (s["input_tokens"], s["output_tokens"], s["requests"]) == (
                u["input_tokens"],
                u["output_tokens"],
                u["requests"],
            ), (group, name)
    by_key = _all_pages(http, keys["admin"], start_time=start, end_time=end, bucket_width="1d", group_by="api_key_id")
    assert {r["api_key_id"] for p in by_key for b in p["data"] for r in b["results"]} == {f"key-{c}" for c in CLIENTS}


def test_filters_and_key_scoping(api):
    http, keys, rows, now, _ = api
    end = int(now.timestamp())
    params = {"start_time": end - 3600, "end_time": end, "bucket_width": "1h", "group_by": ["user_id", "model"]}
    mine = _all_pages(http, keys["beta-app"], **params)
    results = [r for p in mine for b in p["data"] for r in b["results"]]
    assert {r["user_id"] for r in results} == {"beta-app"}
    assert {r["model"] for r in results} == set(MODELS)
    assert sum(r["input_tokens"] + r["output_tokens"] for r in results) == totals(rows, 0)["beta-app"]["total_tokens"]
    r = _get(http, PATH, keys["beta-app"], user_ids="acme-web", **params)
    assert r.status_code == 403 and r.json()["error"]["param"] == "user_ids"
    assert _get(http, PATH, keys["beta-app"], user_ids="beta-app", **params).status_code == 200
    narrowed = _all_pages(http, keys["admin"], project_ids="sales", models="t5-tiny", **params)
    got = [r for p in narrowed for b in p["data"] for r in b["results"]]
    assert {(r["user_id"], r["model"]) for r in got} == {("acme-web", "t5-tiny"), ("beta-app", "t5-tiny")}
    assert _get(http, PATH, "ta_not-a-key", **params).status_code == 401
    bad = _get(http, PATH, keys["admin"], start_time=end - 60, bucket_width="1m", limit=1441)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


def test_report_route_returns_the_priced_report(api, tmp_path):
    http, keys, *_rest, prices = api
    month = utcnow().strftime("%Y-%m")
    body = _get(http, "/v1/report", keys["admin"], month=month).json()
    assert body["cost_error"] is None and body["cost"]["currency"] == "EUR"
    assert body["cost"]["rows"] == cost_report(body["rows"], PriceTable.load(prices))
    total = body["cost"]["rows"][-1]
    assert total["level"] == "total" and Decimal(total["cost"]) > 0
    departments = _get(http, "/v1/report", keys["admin"], month=month, detail="department").json()
    assert departments["rows"] == [] and departments["cost"]["currency"] == "EUR"
    assert departments["cost"]["rows"] == [r for r in body["cost"]["rows"] if r["level"] != "client"]
    bad = _get(http, "/v1/report", keys["admin"], month=month, detail="model")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "detail"
    own = _get(http, "/v1/report", keys["gamma-bot"], month=month).json()["cost"]["rows"]
    assert {r["client_id"] for r in own if r["level"] == "client"} == {"gamma-bot"}
    prices.write_text(PRICES.split('[models."gpt2-tiny"]')[0])  # read at each call: gpt2-tiny now unpriced
    unpriced = _get(http, "/v1/report", keys["admin"], month=month).json()
    assert unpriced["cost_error"] is None and unpriced["rows"] == body["rows"]  # the tokens are still there
    gaps = [r for r in unpriced["cost"]["rows"] if r["level"] == "unpriced"]  # listed, never costed 0
    assert gaps and {r["model"] for r in gaps} == {"gpt2-tiny"} and all(r["cost"] == "" for r in gaps)
    assert "unpriced tokens (gpt2-tiny)" in unpriced["cost"]["rows"][-1]["note"]
    assert Decimal(unpriced["cost"]["rows"][-1]["cost"]) < Decimal(total["cost"])


def test_dashboard_report_filters(api):
    http, keys, rows, *_ = api
    by_model = _get(http, "/v1/usage", keys["admin"], since="2h", by="model", department="sales", model="t5-tiny")
    expected = sum(r[9] for r in rows if r[1] == "sales" and r[2] == "t5-tiny")
    assert [(r["model"], r["total_tokens"]) for r in by_model.json()["rows"]] == [("t5-tiny", expected)]
    top = _get(http, "/v1/top", keys["admin"], since="2h", department="support").json()["rows"]
    assert [r["client_id"] for r in top] == ["gamma-bot"]
    minutes = _get(http, "/v1/usage", keys["admin"], since="2h", by="minute").json()["rows"]
    assert len(minutes) == 30 and sum(m["total_tokens"] for m in minutes) == sum(r[9] for r in rows)
    series = _get(http, "/v1/latency", keys["admin"], since="2h", bucket="minute").json()["rows"]
    assert series and set(series[0]) == {
        "time",
        "requests",
        "not_covered",
        "p50_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
    }
    samples = _get(http, "/v1/samples", keys["acme-web"], since="2h", limit=5).json()["rows"]
    assert len(samples) == 5 and {s["client_id"] for s in samples} == {"acme-web"}
    assert "prompt_digest" not in samples[0]
    assert _get(http, "/v1/latency", keys["admin"], bucket="week").status_code == 400
