"""``tokenaudit verify``: does ClickHouse hold every event that reached the usage topic?"""

from __future__ import annotations

import json
import sys

import click

from tokenaudit.cli.common import settings


@click.command()
@click.option("--since", required=True, help="Start: a duration back from now (15m, 24h, 7d) or an ISO time.")
@click.option("--until", default=None, help="End (exclusive), same forms; default now. Unsettled windows are left out.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
)
def verify(since: str, until: str | None, fmt: str) -> None:
    """Reconcile the usage topic with ClickHouse per client, model and hour: print every
    difference; exit 1 on drift, 0 when everything that reached the topic is stored once."""
    from tokenaudit.reports.formatting import print_verify
    from tokenaudit.reports.verify import run_verify

    report = run_verify(settings(), since, until)
    if fmt == "json":
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        print_verify(report)
    sys.exit(0 if report.ok else 1)


def register(main: click.Group) -> None:
    main.add_command(verify)
