"""Versioned migrations on a fresh embedded (chDB) store."""

from __future__ import annotations

from datetime import UTC

import pytest

from tests.support.usage_seed import ROLLUP_COLUMNS
from tokenaudit.infra.clickhouse import ClickHouseError, connect, validate_dsn
from tokenaudit.infra.migrate import applied_versions, load_migrations, migrate
from tokenaudit.schemas import columns

# every column the sink writes and the reports read (the one list per table), and the design's
# contract columns (docs/contracts.md#tables), which those lists include
CONTRACT_COLUMNS = {table: set(names) for table, names in columns.TABLES.items()}
CONTRACT_COLUMNS["usage_rollup"].add(columns.ROLLUP_LATE_IDS)
DESIGN_COLUMNS = {
    "usage_rollup": {
        "client_id",
        "department",
        "model",
        "window_start",
        "window_end",
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "latency_ms_sum",
        "latency_ms_max",
    },
    "usage_sampled": {
        "request_id",
        "ts",
        "client_id",
        "department",
        "model",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "latency_ms",
        "status_code",
        "sample_reason",
    },
    "anomalies": {
        "anomaly_id",
        "ts",
        "client_id",
        "rule",
        "severity",
        "observed",
        "threshold",
        "window_start",
        "request_id",
    },
}


def test_migrate_twice_records_version_and_creates_tables(ch_client, ch_database):
    assert migrate(ch_client, ch_database, {"usage_sampled": 7}) == [m.version for m in load_migrations()]
    assert migrate(ch_client, ch_database, {"usage_sampled": 7}) == []
    assert applied_versions(ch_client, ch_database) == [m.version for m in load_migrations()]  # numbers may skip
    tables = {r[0] for r in ch_client.query(f"SHOW TABLES FROM {ch_database}").result_rows}
    assert set(CONTRACT_COLUMNS) <= tables
    assert all(DESIGN_COLUMNS[t] <= CONTRACT_COLUMNS[t] for t in DESIGN_COLUMNS)
    for table, declared in CONTRACT_COLUMNS.items():
        have = {
            r[0]
            for r in ch_client.query(
                "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
                parameters={"db": ch_database, "t": table},
            ).result_rows
        }
        assert declared <= have, f"{table} lacks {declared - have}"
    ddl = ch_client.query(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = 'usage_sampled'",
        parameters={"db": ch_database},
    ).result_rows[0][0]
    assert "toIntervalDay(7)" in ddl


def test_replayed_rollup_insert_reads_once(ch_client, ch_database):
    migrate(ch_client, ch_database)
    from datetime import datetime

    row = [
        "c1",
        "d",
        "m",
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        3,
        0,
        30,
        10,
        40,
        9.0,
        4.0,
        12,
        0,
        3,
    ]
    cols = ROLLUP_COLUMNS
    for _ in range(3):
        ch_client.insert(f"{ch_database}.usage_rollup", [row], column_names=cols)
    total = ch_client.query(f"SELECT count(), sum(total_tokens) FROM {ch_database}.usage_rollup FINAL").result_rows
    assert total == [(1, 40)]


@pytest.mark.parametrize(
    ("dsn", "match"),
    [
        ("mysql://h/db", "unsupported scheme"),
        ("chdb://relative/path", "absolute path"),
        ("http://", "no host"),
        ("http://h:notaport", "malformed port"),
    ],
)
def test_malformed_dsn(dsn, match):
    with pytest.raises(ClickHouseError, match=match):
        validate_dsn(dsn)


def test_unreachable_server(tmp_path):
    from tokenaudit.infra.procutil import free_port

    with pytest.raises(ClickHouseError, match="cannot reach ClickHouse"):
        connect(f"http://127.0.0.1:{free_port()}", connect_timeout=2)


def test_locked_chdb_store_is_reported(tmp_path):
    """A second process opening a store that another process holds gets a clear error."""
    import subprocess
    import sys
    import textwrap

    store = tmp_path / "store"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from tokenaudit.infra.clickhouse import connect
        client = connect('chdb://{store}')  # keep the reference: closing releases the lock
        print('open', flush=True)
        sys.stdin.readline()
    """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"""
from tokenaudit.infra.clickhouse import connect, ClickHouseError
try:
    connect('chdb://{store}')
except ClickHouseError as e:
    print(e)
""",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "already open by another process" in probe.stdout
        assert f"pid: {holder.pid}" in probe.stdout
    finally:
        holder.communicate("\n", timeout=30)
