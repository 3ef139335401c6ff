"""The read-only usage API in process (Starlette TestClient over a real chDB store): key
scoping, errors, and injection attempts in every parameter (400, nothing executed)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from tests.support.usage_seed import CLIENTS, seed_anomalies, seed_rollups, seed_sampled, totals, utcnow
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.store import Store
from tokenaudit.reports.params import REPORT_PARAMS
from tokenaudit.reports.usage_api import create_app
from tokenaudit.reports.usage_client import ApiReports, DirectReports, UsageApiError
from tokenaudit.settings import load_settings

INJECTIONS = [
    "1; DROP TABLE {db}.usage_rollup",
    "x' OR '1'='1",
    "acme-web' OR client_id != '",
    "acme-web\\' --",
    "24h) OR (1=1",
    "2026-01 UNION SELECT * FROM system.users",
    "{since_ms:Int64}",
    "1h\x00",
    "acme-web/*",
]


@pytest.fixture
def api(ch_client, ch_database, tmp_path):
    store = Store(ch_client, ch_database)
    store.migrate()
    now = utcnow()
    rows = seed_rollups(store, now)
    seed_sampled(store, now)
    seed_anomalies(store, now)
    registry = tmp_path / "api_keys.toml"
    keys = {client: add_key(registry, client, dept) for client, dept in CLIENTS.items()}
    keys["admin"] = add_key(registry, "ops", "", role="admin")
    settings = load_settings(data_dir=tmp_path, api_keys_file=registry)
    client = TestClient(create_app(store, settings))
    return client, keys, store, rows, registry


def _get(http, path, key=None, **params):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.get(path, params=params, headers=headers)


def test_healthz_needs_no_key(api):
    client, *_ = api
    assert _get(client, "/healthz").json() == {"status": "ok"}


def test_missing_or_unknown_key_is_401(api):
    client, keys, *_ = api
    assert _get(client, "/v1/usage").status_code == 401
    assert _get(client, "/v1/usage", key="ta_not-a-real-key").status_code == 401
    r = client.get("/v1/usage", headers={"Authorization": f"Basic {keys['admin']}"})
    err = r.json()["error"]
    assert r.status_code == 401 and "Bearer" in err["message"]
    assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")


def test_client_key_sees_only_its_own_usage(api):
    client, keys, _store, rows, _ = api
    expected = totals(rows, 0)
    for report in ("usage", "top"):
        r = _get(client, f"/v1/{report}", keys["acme-web"], since="2h")
        assert r.status_code == 200
        body = r.json()
        assert body["scope"] == "acme-web"
        assert [row["client_id"] for row in body["rows"]] == ["acme-web"]
        assert body["rows"][0]["total_tokens"] == expected["acme-web"]["total_tokens"]
    by_dept = _get(client, "/v1/usage", keys["acme-web"], since="2h", by="department").json()["rows"]
    assert by_dept == [{**by_dept[0], "department": "sales", "total_tokens": expected["acme-web"]["total_tokens"]}]
    anomalies = _get(client, "/v1/anomalies", keys["beta-app"], since="7d").json()["rows"]
    assert {a["client_id"] for a in anomalies} == {"beta-app"}
    month = _get(client, "/v1/report", keys["gamma-bot"], month=utcnow().strftime("%Y-%m")).json()["rows"]
    assert month and {m["client_id"] for m in month} == {"gamma-bot"}


def test_client_key_cannot_ask_for_another_client(api):
    client, keys, *_ = api
    for report, extra in (
        ("usage", {}),
        ("top", {}),
        ("report", {"month": "2026-01"}),
        ("latency", {}),
        ("anomalies", {}),
        ("samples", {}),
    ):
        r = _get(client, f"/v1/{report}", keys["acme-web"], client="beta-app", **extra)
        assert r.status_code == 403, report
        err = r.json()["error"]
        assert "own usage" in err["message"] and (err["type"], err["param"]) == ("permission_error", "client")


def test_admin_sees_all_and_can_narrow(api):
    client, keys, _store, rows, _ = api
    expected = totals(rows, 0)
    body = _get(client, "/v1/usage", keys["admin"], since="2h").json()
    assert body["scope"] == "*"
    assert {r["client_id"]: r["total_tokens"] for r in body["rows"]} == {
        c: v["total_tokens"] for c, v in expected.items()
    }
    narrowed = _get(client, "/v1/usage", keys["admin"], since="2h", client="beta-app").json()["rows"]
    assert [r["client_id"] for r in narrowed] == ["beta-app"]
    assert _get(client, "/v1/latency", keys["admin"], since="1h").json()["rows"]


def _fingerprint(store):
    tables = store.query(
        "SELECT name FROM system.tables WHERE database = {d:String} ORDER BY name", {"d": store.database}
    )
    counts = store.query("SELECT count() AS n, sum(total_tokens) AS t FROM {db}.usage_rollup")
    return tables, counts


@pytest.mark.parametrize("report", sorted(REPORT_PARAMS))
def test_injection_attempts_in_every_parameter_are_400(api, report):
    client, keys, store, *_ = api
    before = _fingerprint(store)
    valid = {
        "since": "2h",
        "until": "1m",
        "by": "model",
        "limit": "5",
        "month": "2026-01",
        "client": "acme-web",
        "department": "sales",
        "model": "t5-tiny",
        "bucket": "hour",
        "detail": "department",
        "ip": "10.0.0.5",
        "status": "200",
        "id": "req-1",
    }
    for name in sorted(REPORT_PARAMS[report]):
        for attempt in INJECTIONS:
            params = {p: valid[p] for p in REPORT_PARAMS[report] if p not in ("client", "department", "model")}
            params[name] = attempt
            path = f"/v1/{report}"
            if report == "request":  # GET /v1/requests/{id}: the id is in the path
                path = f"/v1/requests/{quote(params.pop('id'), safe='')}"
            r = _get(client, path, keys["admin"], **params)
            assert r.status_code == 400, (report, name, attempt, r.text)
            err = r.json()["error"]
            assert name in err["message"] and err["param"] == name, err
            assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_parameter")
    # smuggled extra parameters and repeated ones are refused too
    path = "/v1/requests/req-1" if report == "request" else f"/v1/{report}"
    assert _get(client, path, keys["admin"], format="1; SELECT 1").status_code == 400
    r = client.get(f"{path}?since=1h&since=2h", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert r.status_code == 400
    assert _fingerprint(store) == before


def test_unknown_route_and_method(api):
    client, keys, *_ = api
    assert _get(client, "/v1/sql", keys["admin"], q="SELECT 1").status_code == 404
    assert client.post("/v1/usage", headers={"Authorization": f"Bearer {keys['admin']}"}).status_code == 405


def test_keys_added_while_running_work_at_once(api):
    client, _, _, _, registry = api
    new_key = add_key(registry, "delta-new", "sales")
    r = _get(client, "/v1/usage", new_key, since="2h")
    assert r.status_code == 200 and r.json()["rows"] == []


def test_http_backend_returns_what_the_direct_backend_returns(api):
    client, keys, store, *_ = api
    via_api = ApiReports("http://testserver", keys["admin"], http=client)
    direct = DirectReports(store)
    now = utcnow().isoformat()
    for report, params in (
        ("usage", {"since": "2h", "until": now, "by": "department"}),
        ("top", {"since": "2h", "until": now, "limit": "3"}),
        ("latency", {"since": "2h", "until": now}),
        ("anomalies", {"since": "7d", "until": now}),
        ("report", {"month": utcnow().strftime("%Y-%m")}),
    ):
        assert via_api.fetch(report, params) == direct.fetch(report, params), report
    with pytest.raises(UsageApiError, match="by: expected one of"):
        via_api.fetch("usage", {"by": "nope"})
    with pytest.raises(UsageApiError, match="own usage"):
        ApiReports("http://testserver", keys["acme-web"], http=client).fetch("usage", {"client": "beta-app"})
