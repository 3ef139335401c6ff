"""Malformed input to the usage API is a 4xx with the OpenAI error envelope, never a 500: fuzzed
query strings, parameter values and headers against the app in process, over a real chDB store."""

from __future__ import annotations

from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.asgi import json_body, run
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.store import Store
from tokenaudit.reports.params import REPORT_PARAMS
from tokenaudit.reports.usage_api import create_app
from tokenaudit.schemas.http_errors import error_type
from tokenaudit.settings import load_settings

NASTY = [
    "999999w",
    "\u00b2",
    "0001-01-01",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "9999-12",
    "0000-01",
    "1e9",
    "-1",
    "24h",
    "2026-01",
    "2026-01-31T12:00",
    "7d",
    "acme",
    "",
    " ",
    "\x00",
    "%",
    "1" * 5000,
    "2026-13",
    "\ud800",
    "client",
    "month",
]
VALUES = st.one_of(st.sampled_from(NASTY), st.text(max_size=25), st.integers().map(str))
NAMES = st.one_of(st.sampled_from(sorted({n for names in REPORT_PARAMS.values() for n in names})), st.text(max_size=8))


@pytest.fixture
def usage_app(ch_client, ch_database, tmp_path):
    store = Store(ch_client, ch_database)
    store.migrate()
    registry = tmp_path / "api_keys.toml"
    keys = {"admin": add_key(registry, "ops", role="admin"), "client": add_key(registry, "acme", "sales")}
    return create_app(store, load_settings(data_dir=tmp_path, api_keys_file=registry)), keys


def _query(pairs) -> bytes:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='', errors='surrogatepass')}" for k, v in pairs).encode()


def _is_envelope(body, status: int) -> bool:
    """The OpenAI error shape every HTTP service answers with (schemas/http_errors.py)."""
    err = body.get("error") if set(body) == {"error"} else None
    return (
        isinstance(err, dict)
        and set(err) == {"type", "message", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"] != ""
        and isinstance(err["code"], str)
        and err["code"] != ""
        and err["type"] == error_type(status)
        and (err["param"] is None or isinstance(err["param"], str))
    )


def _check(status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:300])
    body = json_body(raw)
    if status >= 400:
        assert _is_envelope(body, status), body
    else:
        assert isinstance(body["rows"], list)


def test_fuzzed_parameters_never_get_a_500(usage_app):
    app, keys = usage_app
    seen: Counter = Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        report=st.sampled_from(sorted(REPORT_PARAMS)),
        pairs=st.lists(st.tuples(NAMES, VALUES), max_size=4),
        role=st.sampled_from(["admin", "client"]),
    )
    @example(report="top", pairs=[("since", "999999w")], role="admin")
    @example(report="top", pairs=[("limit", "\u00b2")], role="admin")
    @example(report="usage", pairs=[("since", "0001-01-01T00:00:00+01:00")], role="admin")
    @example(report="report", pairs=[("month", "9999-12")], role="admin")
    def check(report, pairs, role):
        status, _, raw = run(
            app,
            "GET",
            f"/v1/{report}",
            query=_query(pairs),
            headers=[(b"authorization", f"Bearer {keys[role]}".encode())],
        )
        _check(status, raw)
        seen[status] += 1

    check()
    assert seen[400] > 20 and seen[200] > 5, seen


def test_fuzzed_raw_queries_headers_and_paths_never_get_a_500(usage_app):
    app, keys = usage_app

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        path=st.one_of(
            st.sampled_from(["/v1/usage", "/v1/top", "/v1/report", "/v1/nope", "/healthz"]),
            st.text(max_size=20).map(lambda t: "/" + t),
        ),
        method=st.sampled_from(["GET", "POST", "DELETE"]),
        query=st.binary(max_size=40),
        auth=st.one_of(st.just(f"Bearer {keys['admin']}".encode()), st.binary(max_size=40)),
    )
    @example(path="/v1/nope", method="GET", query=b"\x80", auth=b"")
    @example(path="/v1/usage", method="GET", query=b"since=%FF%FE", auth=f"Bearer {keys['admin']}".encode())
    def check(path, method, query, auth):
        status, _, raw = run(app, method, path, query=query, headers=[(b"authorization", auth)])
        assert status < 500, (status, raw[:300])
        if status >= 400:
            body = json_body(raw)
            assert _is_envelope(body, status), body

    check()
