"""Retention: per-table TTLs follow the TOKENAUDIT_TTL_* settings on every `db migrate`, and
an expired detailed record really goes while the rollups keep their longer retention."""

from __future__ import annotations

import re
from datetime import timedelta

from click.testing import CliRunner

from tests.support.usage_seed import SAMPLED_COLUMNS, utcnow
from tokenaudit.cli import main
from tokenaudit.infra.migrate import ttl_days_from_settings
from tokenaudit.infra.store import Store
from tokenaudit.settings import get_settings, load_settings


def ttl_days(store: Store, table: str) -> int | None:
    ddl = store.query(
        "SELECT create_table_query AS q FROM system.tables WHERE database = {d:String} AND name = {t:String}",
        {"d": store.database, "t": table},
    )[0]["q"]
    match = re.search(r"TTL .*toIntervalDay\((\d+)\)", ddl)
    return int(match.group(1)) if match else None


def test_changing_ttl_settings_and_migrating_again_changes_the_tables(ch_client, ch_database):
    store = Store(ch_client, ch_database)
    store.migrate(ttl_days_from_settings(load_settings()))  # the defaults
    assert [ttl_days(store, t) for t in ("usage_rollup", "usage_sampled", "anomalies")] == [730, 30, 365]
    store.migrate(ttl_days_from_settings(load_settings(ttl_rollup_days=400, ttl_sampled_days=7, ttl_anomalies_days=0)))
    assert [ttl_days(store, t) for t in ("usage_rollup", "usage_sampled", "anomalies")] == [400, 7, None]
    ddl = store.query(
        "SELECT create_table_query AS q FROM system.tables WHERE database = {d:String} AND name = 'usage_rollup'",
        {"d": ch_database},
    )[0]["q"]
    assert (
        "ORDER BY (toStartOfDay(window_start), client_id, department, api_key_id, model, window_start)" in ddl
    )  # migrations 0010 and 0011


def test_db_migrate_applies_ttl_from_environment(ch_database, chdb_dsn, data_dir, monkeypatch):
    monkeypatch.setenv("TOKENAUDIT_CLICKHOUSE_DSN", chdb_dsn)
    monkeypatch.setenv("TOKENAUDIT_CLICKHOUSE_DATABASE", ch_database)
    monkeypatch.setenv("TOKENAUDIT_TTL_SAMPLED_DAYS", "3")
    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["db", "migrate"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    s = get_settings()
    store = Store.open(s.effective_clickhouse_dsn, ch_database)
    assert ttl_days(store, "usage_sampled") == 3 and ttl_days(store, "usage_rollup") == 730


def test_expired_detailed_records_are_dropped(ch_client, ch_database):
    store = Store(ch_client, ch_database)
    store.migrate({"usage_rollup": 730, "usage_sampled": 7, "anomalies": 365})
    now = utcnow()
    rows = [[f"r{age}", now - timedelta(days=age), "c", "d", "m", 1, 1, 2, 1.0, 200, "top"] for age in (1, 6, 8, 30)]
    store.insert("usage_sampled", rows, SAMPLED_COLUMNS)
    store.command("OPTIMIZE TABLE {db}.usage_sampled FINAL")  # TTLs are enforced when parts merge
    kept = [r["request_id"] for r in store.query("SELECT request_id FROM {db}.usage_sampled ORDER BY ts DESC")]
    assert kept == ["r1", "r6"]


def test_migration_0010_rebuilds_rollups_without_losing_or_doubling_rows(ch_client, ch_database, monkeypatch):
    from tests.support.usage_seed import seed_rollups, totals
    from tokenaudit.infra import migrate as migrate_module
    from tokenaudit.reports.queries import run_raw

    every = migrate_module.load_migrations()
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: [m for m in every if m.version < 10])
    store = Store(ch_client, ch_database)
    store.migrate()
    rows = seed_rollups(store, utcnow())  # includes superseded versions and replays
    before = run_raw(store, "usage", {"since": "2h", "by": "client"})
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: every)
    assert store.migrate({"usage_rollup": 730}) == [m.version for m in every if m.version >= 10]
    after = run_raw(store, "usage", {"since": "2h", "by": "client"})
    assert after == before
    assert {r["client_id"]: r["total_tokens"] for r in after} == {
        c: v["total_tokens"] for c, v in totals(rows, 0).items()
    }
    assert ttl_days(store, "usage_rollup") == 730
    tables = {
        r["name"] for r in store.query("SELECT name FROM system.tables WHERE database = {d:String}", {"d": ch_database})
    }
    assert "usage_rollup_by_day" not in tables
