"""``tokenaudit budgets set|list|remove``: spending limits per client or department, on the
compacted budgets topic that every process follows (changes apply within seconds, no restart).

Bad input (an unknown client or department, a limit that is not a number > 0, an unknown
period, both or neither of --client/--department or --tokens/--cost) is a usage error: one
line, exit code 2, and nothing is written to the topic.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from tokenaudit.cli.common import FORMAT_OPTION, settings
from tokenaudit.errors import BudgetError, TokenauditError
from tokenaudit.schemas.budgets import budget
from tokenaudit.schemas.identifiers import identifier_problem

if TYPE_CHECKING:
    from tokenaudit.infra.budget_view import BudgetView
    from tokenaudit.settings import Settings

SCOPE_OPTIONS = (
    click.option(
        "--client",
        "client_id",
        default=None,
        metavar="C",
        help="The client_id (a key maps to it; in development mode: as in usage).",
    ),
    click.option(
        "--department",
        default=None,
        metavar="D",
        help="The department (a key maps to it; in development mode: as in usage).",
    ),
)


def _scope_options(f: Any) -> Any:
    for option in reversed(SCOPE_OPTIONS):
        f = option(f)
    return f


@click.group()
def budgets() -> None:
    """Budgets per client or department, in tokens or cost, per UTC day or month."""


def _scope(client_id: str | None, department: str | None) -> tuple[str, str]:
    if (client_id is None) == (department is None):
        raise click.UsageError("give exactly one of --client C or --department D")
    scope, scope_id = ("client", client_id) if client_id is not None else ("department", department or "")
    problem = identifier_problem(scope_id)
    if problem is not None:  # what the stream accepts as a client or department (schemas/identifiers.py)
        raise click.BadParameter(f"{problem}: {scope_id!r:.80}", param_hint=f"--{scope}")
    return scope, scope_id


def _known(scope: str, scope_id: str) -> None:
    """A scope a budget may be set on: a key maps to it, or (development mode: no key registry)
    it appears in usage. A typo would otherwise be a budget that never applies."""
    from tokenaudit.infra.keys import KeyRegistry, list_keys

    s = settings()
    field = "client_id" if scope == "client" else "department"
    registry = KeyRegistry.from_settings(s)
    if registry.state != "open":  # a registry exists (or must): the keys decide
        if registry.state == "unavailable":
            raise TokenauditError(f"the key registry is unavailable: {registry.problem}")
        if any(getattr(k, field) == scope_id for k in list_keys(s.default_api_keys_file)):
            return
        raise click.BadParameter(
            f"no API key maps to {scope} {scope_id!r} (see `tokenaudit keys list`)", param_hint=f"--{scope}"
        )
    from tokenaudit.reports.usage_client import open_reports

    rows = open_reports(s).fetch("usage", {"since": "400d", "by": scope, scope: scope_id})
    if not any(r.get(field) == scope_id for r in rows):
        raise click.BadParameter(
            f"{scope} {scope_id!r} has no usage yet (development mode: no key registry, so a {scope} "
            "is known by its usage; add a key with `tokenaudit keys add` to set it up front)",
            param_hint=f"--{scope}",
        )


def _write(key: bytes, value: bytes | None) -> None:
    """One record on the budgets topic, delivered (or an error) before returning."""
    from confluent_kafka import Producer

    from tokenaudit.infra import kafka_clients, topics

    s = settings()
    topics.ensure_declared(s, roles=("budgets", "spend"))
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer(kafka_clients.producer_config(s, {"log_level": 3}))
    producer.produce(s.topic_budgets, key=key, value=value, on_delivery=delivered)
    if producer.flush(30) or errors:
        raise TokenauditError(f"the budget was not stored on {s.topic_budgets}: {'; '.join(errors) or 'timed out'}")


@budgets.command("set")
@_scope_options
@click.option("--tokens", type=float, default=None, metavar="N", help="Limit in tokens (input + output) per period.")
@click.option(
    "--cost", type=float, default=None, metavar="X", help="Limit in cost per period (priced with the price file)."
)
@click.option("--period", required=True, metavar="day|month", help="The period (UTC); one of day, month.")
@click.option("--hard", is_flag=True, help="Refuse requests (429) once it is spent; else alerts only.")
def budgets_set(
    client_id: str | None, department: str | None, tokens: float | None, cost: float | None, period: str, hard: bool
) -> None:
    """Set (or replace) the budget of a client or a department."""
    from tokenaudit.infra import schema_registry
    from tokenaudit.schemas import BUDGET, encode
    from tokenaudit.schemas.budgets import budget_key

    scope, scope_id = _scope(client_id, department)
    if (tokens is None) == (cost is None):
        raise click.UsageError("give exactly one of --tokens N or --cost X")
    unit, limit = ("tokens", tokens) if tokens is not None else ("cost", cost)
    try:
        record = budget(scope, scope_id, unit, float(limit or 0), period, hard, int(time.time() * 1000))
    except BudgetError as exc:
        raise click.UsageError(str(exc)) from None
    _known(scope, scope_id)
    s = settings()
    value = encode(BUDGET, record, confluent=schema_registry.prepare(s))
    _write(budget_key(scope, scope_id), value)
    kind = "hard" if hard else "soft"
    click.echo(f"{scope} {scope_id}: {kind} budget of {_amount(record['limit'], unit)} per {period}")


@budgets.command("list")
@FORMAT_OPTION
def budgets_list(fmt: str) -> None:
    """The budgets with their spend in the current period (from the stream)."""
    from tokenaudit.reports.formatting import print_rows

    print_rows(budget_rows(), fmt)


def budget_rows() -> list[dict[str, Any]]:
    """scope, limit, spent, remaining and when the period resets, per budget: the usage API's
    rows (one computation of spent and remaining), with whole numbers printed as such."""
    from tokenaudit.reports.budgets_route import budget_rows as rows_of

    view = _view(settings())
    try:
        return [
            {
                "scope": r["scope"],
                "scope_id": r["scope_id"],
                "unit": r["unit"],
                "limit": _number(r["limit"]),
                "period": r["period"],
                "hard": r["hard"],
                "spent": _number(r["spent"]),
                "remaining": _number(r["remaining"]),
                "unpriced_tokens": r["unpriced_tokens"],
                "resets_at": r["resets_at"],
            }
            for r in rows_of(view, None)
        ]
    finally:
        view.close()


def _view(s: Settings) -> BudgetView:
    """The budgets and spend as every process sees them, read to the end."""
    from tokenaudit.infra import schema_registry, topics
    from tokenaudit.infra.budget_view import BudgetView

    topics.ensure_declared(s, roles=("budgets", "spend"))
    schema_registry.prepare(s)  # Confluent-framed records need the registry's ids to be read
    view = BudgetView(s).start()
    if not view.wait_caught_up(30):
        view.close()
        raise TokenauditError(f"could not read {s.topic_budgets} and {s.topic_spend} within 30 s")
    return view


@budgets.command("remove")
@_scope_options
def budgets_remove(client_id: str | None, department: str | None) -> None:
    """Remove the budget of a client or a department (a tombstone on the budgets topic)."""
    from tokenaudit.schemas.budgets import budget_key

    scope, scope_id = _scope(client_id, department)
    view = _view(settings())
    try:
        found = view.budget(scope, scope_id)
    finally:
        view.close()
    if found is None:
        raise click.BadParameter(
            f"{scope} {scope_id!r} has no budget (see `tokenaudit budgets list`)", param_hint=f"--{scope}"
        )
    _write(budget_key(scope, scope_id), None)
    click.echo(f"{scope} {scope_id}: budget removed")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 6)


def _amount(limit: float, unit: str) -> str:
    return f"{_number(limit)} tokens" if unit == "tokens" else f"{_number(limit)} in cost"


def register(main: click.Group) -> None:
    main.add_command(budgets)
