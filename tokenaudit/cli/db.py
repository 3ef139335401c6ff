"""``tokenaudit db migrate``: the ClickHouse schema."""

from __future__ import annotations

import click

from tokenaudit.cli.common import settings


@click.group()
def db() -> None:
    """ClickHouse schema."""


@db.command("migrate")
def db_migrate() -> None:
    """Create the database and tables, apply pending migrations and retention TTLs."""
    from tokenaudit.infra.clickhouse import connect
    from tokenaudit.infra.migrate import applied_versions, migrate, ttl_days_from_settings

    s = settings()
    client = connect(s.effective_clickhouse_dsn)
    applied = migrate(client, s.clickhouse_database, ttl_days_from_settings(s))
    versions = applied_versions(client, s.clickhouse_database)
    click.echo(f"applied {applied or 'nothing (up to date)'}; schema version {max(versions) if versions else 0}")


def register(main: click.Group) -> None:
    main.add_command(db)
