"""Versioned, idempotent migrations: numbered SQL files applied once each, recorded in
``<db>.schema_migrations``. Retention TTLs come from settings and are re-applied every run,
so changing ``TOKENAUDIT_TTL_*`` and running ``db migrate`` is how retention is changed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from clickhouse_connect.driver.client import Client

STATEMENT_SEPARATOR = "--;;"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: list[str]


def load_migrations() -> list[Migration]:
    folder = resources.files("tokenaudit.infra").joinpath("migrations")
    migrations = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if not match:
            continue
        body = entry.read_text()
        statements = [s.strip() for s in body.split(STATEMENT_SEPARATOR) if _has_sql(s)]
        migrations.append(Migration(int(match.group(1)), match.group(2), statements))
    return sorted(migrations, key=lambda m: m.version)


def _has_sql(chunk: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in chunk.splitlines())


def applied_versions(client: Client, db: str) -> list[int]:
    rows = client.query(f"SELECT version FROM {db}.schema_migrations ORDER BY version").result_rows
    return [r[0] for r in rows]


def migrate(client: Client, db: str, ttl_days: dict[str, int] | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied now (empty when up to date)."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = set(applied_versions(client, db))
    applied = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(statement.replace("{db}", db))
        client.insert(
            f"{db}.schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"]
        )
        applied.append(migration.version)
    if ttl_days:
        apply_ttls(client, db, ttl_days)
    return applied


TTL_COLUMNS = {
    "usage_rollup": "window_start",
    "usage_rollup_daily": "window_start",
    "usage_sampled": "ts",
    "anomalies": "ts",
    "usage_requests": "ts",
}
# Column TTLs ("table.column": the time column they count from): data only needed for a while
# after the row was written.
COLUMN_TTLS = {"usage_rollup.event_ids": "emitted_at"}


def apply_ttls(client: Client, db: str, ttl_days: dict[str, int]) -> None:
    """Set (or remove, for 0 days) each table's retention TTL, and each listed column's."""
    for table, days in ttl_days.items():
        if table in COLUMN_TTLS:
            _apply_column_ttl(client, db, table, days)
            continue
        column = TTL_COLUMNS[table]
        if days > 0:
            client.command(f"ALTER TABLE {db}.{table} MODIFY TTL toDateTime({column}) + INTERVAL {int(days)} DAY")
        else:
            try:
                client.command(f"ALTER TABLE {db}.{table} REMOVE TTL")
            except Exception as exc:  # no TTL set yet: nothing to remove
                if "TTL" not in str(exc):
                    raise


def _apply_column_ttl(client: Client, db: str, target: str, days: int) -> None:
    table, column = target.split(".")
    if days > 0:
        client.command(
            f"ALTER TABLE {db}.{table} MODIFY COLUMN {column} "
            f"TTL toDateTime({COLUMN_TTLS[target]}) + INTERVAL {int(days)} DAY"
        )
    else:
        try:
            client.command(f"ALTER TABLE {db}.{table} MODIFY COLUMN {column} REMOVE TTL")
        except Exception as exc:  # no TTL set: nothing to remove
            if "TTL" not in str(exc):
                raise


def ttl_days_from_settings(settings) -> dict[str, int]:
    return {
        "usage_rollup": settings.ttl_rollup_days,
        "usage_rollup_daily": settings.ttl_rollup_days,  # its days go when their windows go
        "usage_sampled": settings.ttl_sampled_days,
        "anomalies": settings.ttl_anomalies_days,
        "usage_requests": settings.ttl_requests_days,
        "usage_rollup.event_ids": settings.dedup_retention_days,
    }
