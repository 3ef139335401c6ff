"""What several command groups share: the settings and a few click options."""

from __future__ import annotations

import click

from tokenaudit.settings import Settings, get_settings

FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
BROKERS_OPTION = click.option(
    "--brokers",
    type=click.IntRange(1, 9),
    default=None,
    help="Nodes of the local cluster when it is first created (default 1); an existing cluster keeps its size.",
)


def settings() -> Settings:
    """The process's settings (a bad value is a SettingsError: one line, exit 1)."""
    return get_settings()
