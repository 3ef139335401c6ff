"""CLI commands over the fixed reports: ``usage``, ``top``, ``report``, ``latency``, ``anomalies``,
the ledger's ``requests`` and ``request ID``, and ``erase --client C``.

Options become the raw string parameters of :mod:`tokenaudit.reports.params`, and
:func:`tokenaudit.reports.usage_client.open_reports` decides whether they go to ClickHouse
directly or to the usage API; printing is :mod:`tokenaudit.reports.formatting`'s.
"""

from __future__ import annotations

from typing import Any

import click

from tokenaudit.cli.common import FORMAT_OPTION as FORMAT
from tokenaudit.cli.common import settings
from tokenaudit.reports.params import GROUPINGS

SINCE = click.option(
    "--since", default="24h", show_default=True, help="Start: a duration back from now (15m, 24h, 7d) or an ISO time."
)
UNTIL = click.option("--until", default=None, help="End (exclusive), same forms as --since; default now.")
CLIENT = click.option("--client", default=None, help="Only this client_id (an admin key may pick any).")


def _fetch(report: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one report through the right backend (its errors are one-line CLI errors)."""
    from tokenaudit.reports.usage_client import open_reports

    raw = {k: str(v) for k, v in params.items() if v is not None}
    return open_reports(settings()).fetch(report, raw)


def _print(rows: list[dict[str, Any]], fmt: str) -> None:
    from tokenaudit.reports.formatting import print_rows

    print_rows(rows, fmt)


def _say_settled(fmt: str) -> None:
    """Under a usage table: up to when its numbers are final. (JSON and CSV stay pure data;
    the usage API's answers carry ``settled_until`` for programs.)"""
    if fmt != "table":
        return
    from tokenaudit.reports.queries import iso_utc, settle_seconds, settled_until

    s = settings()
    click.echo(
        f"settled up to {iso_utc(settled_until(s))}: windows starting later may still change "
        f"(window + grace + idle timeout + sink batch = {settle_seconds(s):g}s)"
    )


@click.command()
@SINCE
@UNTIL
@click.option(
    "--by",
    type=click.Choice(GROUPINGS),
    default="client",
    show_default=True,
    help="Group by.",
)
@CLIENT
@FORMAT
def usage(since: str, until: str | None, by: str, client: str | None, fmt: str) -> None:
    """Tokens, requests and errors per client, department, model, minute, hour or day."""
    _print(_fetch("usage", {"since": since, "until": until, "by": by, "client": client}), fmt)
    _say_settled(fmt)


@click.command()
@SINCE
@UNTIL
@click.option("--limit", type=int, default=10, show_default=True, help="How many clients.")
@CLIENT
@FORMAT
def top(since: str, until: str | None, limit: int, client: str | None, fmt: str) -> None:
    """The heaviest clients by tokens, with their share of the total."""
    _print(_fetch("top", {"since": since, "until": until, "limit": limit, "client": client}), fmt)
    _say_settled(fmt)


@click.command()
@click.option("--month", required=True, help="Calendar month, YYYY-MM (UTC).")
@click.option(
    "--prices",
    "prices_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Price table TOML (default TOKENAUDIT_PRICE_TABLE).",
)
@CLIENT
@FORMAT
def report(month: str, prices_path: str | None, client: str | None, fmt: str) -> None:
    """Tokens and cost per department and client for one month, from a price table."""
    from tokenaudit.reports.prices import PriceTable, cost_report

    path = prices_path or settings().price_table
    if not path:
        raise click.ClickException(
            "no price table: pass --prices FILE or set TOKENAUDIT_PRICE_TABLE (TOML, per "
            'model: [models."<name>"] input_per_1k = ..., output_per_1k = ...)'
        )
    prices = PriceTable.load(path)
    _print(cost_report(_fetch("report", {"month": month, "client": client}), prices), fmt)
    _say_settled(fmt)


@click.command()
@SINCE
@UNTIL
@CLIENT
@FORMAT
def latency(since: str, until: str | None, client: str | None, fmt: str) -> None:
    """Latency p50/p95/p99 per client, model and input-token bucket over all requests (rollup histograms)."""
    _print(_fetch("latency", {"since": since, "until": until, "client": client}), fmt)


@click.command()
@click.option(
    "--since",
    default=None,
    help="Replay anomalies from ClickHouse since then (15m, 24h, 7d, ISO); without --follow the default is 24h.",
)
@UNTIL
@click.option("--limit", type=int, default=1000, show_default=True, help="Most anomalies to list or replay.")
@CLIENT
@click.option("--follow", is_flag=True, help="Then print each new anomaly from the anomaly topic as it arrives.")
@click.option(
    "--webhook",
    default=None,
    metavar="URL",
    help="With --follow: also POST each new anomaly as JSON (retries with backoff; offsets commit after delivery).",
)
@click.option("--group", default=None, help="Consumer group for --follow (default TOKENAUDIT_ANOMALY_GROUP_ID).")
@click.option("--from-beginning", is_flag=True, help="A new consumer group starts at the oldest retained anomaly.")
@click.option("--max-messages", type=int, default=None, hidden=True, help="Exit after this many new anomalies.")
@FORMAT
def anomalies(
    since: str | None,
    until: str | None,
    limit: int,
    client: str | None,
    follow: bool,
    webhook: str | None,
    group: str | None,
    from_beginning: bool,
    max_messages: int | None,
    fmt: str,
) -> None:
    """List anomalies, or follow the anomaly topic (--follow) and optionally forward them to a webhook."""
    if not follow:
        if webhook:
            raise click.ClickException("--webhook needs --follow")
        _print(_fetch("anomalies", {"since": since or "24h", "until": until, "limit": limit, "client": client}), fmt)
        return
    _follow(since, limit, client, webhook, group, from_beginning, max_messages, fmt)


def _follow(since, limit, client, webhook, group, from_beginning, max_messages, fmt) -> None:
    from tokenaudit.errors import FollowError, WebhookError
    from tokenaudit.infra.kafka_clients import kafka_config
    from tokenaudit.infra.schema_registry import prepare
    from tokenaudit.reports.anomaly_follow import follow
    from tokenaudit.reports.formatting import AnomalyPrinter
    from tokenaudit.reports.webhook import WebhookForwarder

    s = settings()
    prepare(s)  # registry ids, so Confluent-framed anomalies resolve
    printer = AnomalyPrinter(fmt)
    forwarder = None
    if webhook:
        forwarder = WebhookForwarder(
            webhook,
            timeout=s.webhook_timeout_seconds,
            backoff_max=s.webhook_backoff_max_seconds,
            on_retry=lambda n, why: click.echo(f"webhook: attempt {n} failed ({why}); retrying", err=True),
        )
    if since:
        for row in _fetch("anomalies", {"since": since, "limit": limit, "client": client}):
            printer(row)

    def handle(anomaly: dict[str, Any]) -> None:
        if client and anomaly.get("client_id") != client:
            return
        printer(anomaly)
        if forwarder is not None:
            forwarder.deliver(anomaly)

    try:
        follow(
            s.kafka_bootstrap,
            s.topic_anomalies,
            group or s.anomaly_group_id,
            handle,
            from_beginning=from_beginning,
            max_messages=max_messages,
            on_undecodable=lambda why: click.echo(f"warning: {why}", err=True),
            client_config=kafka_config(s),
        )
    except KeyboardInterrupt:
        pass
    except (FollowError, WebhookError) as exc:
        raise click.ClickException(f"{exc} (offsets of undelivered anomalies were not committed)") from None
    finally:
        if forwarder is not None:
            forwarder.close()


@click.command()
@SINCE
@UNTIL
@CLIENT
@click.option("--ip", default=None, help="Only calls from this client IP (as the ledger stores it).")
@click.option("--status", type=int, default=None, help="Only this HTTP status.")
@click.option("--model", default=None, help="Only this model.")
@click.option("--limit", type=int, default=100, show_default=True, help="The latest N requests (shown oldest first).")
@FORMAT
def requests(
    since: str,
    until: str | None,
    client: str | None,
    ip: str | None,
    status: int | None,
    model: str | None,
    limit: int,
    fmt: str,
) -> None:
    """Every request from the ledger (usage_requests): who, when, from where, what, how much, how long."""
    params = {"since": since, "until": until, "client": client, "ip": ip, "status": status, "model": model}
    _print(_fetch("requests", {**params, "limit": limit}), fmt)


@click.command()
@click.argument("request_id")
@FORMAT
def request(request_id: str, fmt: str) -> None:
    """One request from the ledger by its request_id or event_id (every call with that id)."""
    rows = _fetch("request", {"id": request_id})
    if not rows:
        raise click.ClickException(f"no request {request_id} in the ledger (within its retention and your key's scope)")
    _print(rows, fmt)


@click.command()
@click.option("--client", required=True, help="The client_id whose per-request data goes.")
@FORMAT
def erase(client: str, fmt: str) -> None:
    """Erase a client's ledger rows and sampled records (the right to erasure); rollups and anomalies stay."""
    from tokenaudit.reports.erase import erase as run_erase

    _print(run_erase(settings(), client), fmt)


COMMANDS = (usage, top, report, latency, anomalies, requests, request, erase)


def register(main: click.Group) -> None:
    for command in COMMANDS:
        main.add_command(command)
