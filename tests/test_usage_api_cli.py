"""The CLI in embedded mode: `tokenaudit usage/top/report/latency/anomalies` go over real HTTP
to the usage API (uvicorn on a free port, as the sink serves it) with the admin key that
`up` writes, and print exactly what is in the store."""

from __future__ import annotations

import json
import stat
import threading
import time

import pytest
import uvicorn
from click.testing import CliRunner

from tests.support.usage_seed import seed_anomalies, seed_rollups, seed_sampled, totals, utcnow
from tokenaudit.cli import main
from tokenaudit.infra.keys import admin_key_path, ensure_admin_key, registry_path
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.reports.usage_api import create_app
from tokenaudit.settings import get_settings

PRICES = (
    '[models."t5-tiny"]\ninput_per_1k = 0.0004\noutput_per_1k = 0.0016\n'
    '[models."gpt2-tiny"]\ninput_per_1k = 0.0003\noutput_per_1k = 0.0012\n'
)


@pytest.fixture
def served(ch_client, ch_database, chdb_dsn, data_dir, monkeypatch, tmp_path):
    port = free_port()
    monkeypatch.setenv("TOKENAUDIT_CLICKHOUSE_DSN", chdb_dsn)
    monkeypatch.setenv("TOKENAUDIT_CLICKHOUSE_DATABASE", ch_database)
    monkeypatch.setenv("TOKENAUDIT_USAGE_API_PORT", str(port))
    monkeypatch.delenv("TOKENAUDIT_API_KEY", raising=False)
    monkeypatch.delenv("TOKENAUDIT_API_KEYS_FILE", raising=False)
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.embedded_clickhouse
    store = Store(ch_client, ch_database)
    store.migrate()
    now = utcnow()
    rows = seed_rollups(store, now)
    seed_sampled(store, now)
    seed_anomalies(store, now)
    server = uvicorn.Server(
        uvicorn.Config(create_app(store, settings), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield settings, rows, now
    server.should_exit = True
    thread.join(10)


def _cli(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_admin_key_helper_is_idempotent_and_private(served):
    settings, *_ = served
    key = ensure_admin_key(settings)
    assert ensure_admin_key(settings) == key
    assert stat.S_IMODE(admin_key_path(settings).stat().st_mode) == 0o600
    assert registry_path(settings).read_text().count("[[keys]]") == 1


def test_usage_json_over_http_matches_the_store(served, monkeypatch):
    settings, rows, _ = served
    monkeypatch.setenv("TOKENAUDIT_API_KEY", "ta_wrong")
    get_settings.cache_clear()
    code, out = _cli("usage", "--since", "2h")
    assert code == 1 and "usage API: unknown API key" in out
    monkeypatch.delenv("TOKENAUDIT_API_KEY")
    get_settings.cache_clear()
    ensure_admin_key(settings)
    code, out = _cli("usage", "--since", "2h", "--format", "json")
    assert code == 0, out
    got = {r["client_id"]: r["total_tokens"] for r in json.loads(out)}
    assert got == {c: v["total_tokens"] for c, v in totals(rows, 0).items()}
    code, out = _cli("usage", "--since", "2h", "--by", "department", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("department,requests,errors,input_tokens")
    code, out = _cli("top", "--since", "2h", "--limit", "2")
    assert code == 0 and "share_pct" in out and len(out.strip().splitlines()) == 5  # + the settled-up-to line
    assert out.strip().splitlines()[-1].startswith("settled up to ")
    code, out = _cli("latency", "--since", "1h", "--format", "json")
    # the seeded rollups carry no latency histogram (as written before schema v4): not covered
    assert code == 0 and {r["input_tokens"] for r in json.loads(out)} == {"not covered"}
    code, out = _cli("anomalies", "--since", "24h", "--format", "json")
    assert code == 0 and [a["anomaly_id"] for a in json.loads(out)] == ["a1", "a2"]


def test_report_and_errors_over_http(served, tmp_path):
    settings, rows, now = served
    ensure_admin_key(settings)
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    code, out = _cli("report", "--month", now.strftime("%Y-%m"), "--prices", str(prices), "--format", "json")
    assert code == 0, out
    report = json.loads(out)
    month_rows = [r for r in rows if r[3].strftime("%Y-%m") == now.strftime("%Y-%m")]
    assert report[-1]["level"] == "total" and report[-1]["total_tokens"] == sum(r[9] for r in month_rows)
    code, out = _cli("report", "--month", now.strftime("%Y-%m"))
    assert code == 1 and "no price table" in out
    prices.write_text('[models."t5-tiny"]\ninput_per_1k = 0.1\noutput_per_1k = 0.1\n')
    code, out = _cli("report", "--month", now.strftime("%Y-%m"), "--prices", str(prices), "--format", "json")
    assert code == 0, out  # a model without a price is listed, not a failed report
    unpriced = [r for r in json.loads(out) if r["level"] == "unpriced"]
    assert {r["model"] for r in unpriced} == {"gpt2-tiny"} and all(r["cost"] == "" for r in unpriced)
    assert "unpriced tokens (gpt2-tiny)" in json.loads(out)[-1]["note"]
    code, out = _cli("usage", "--since", "last tuesday")
    assert code == 1 and "since: expected a duration" in out
    code, out = _cli("anomalies", "--webhook", "http://127.0.0.1:1/x")
    assert code == 1 and "--webhook needs --follow" in out
