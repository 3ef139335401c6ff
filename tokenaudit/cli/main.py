"""The ``tokenaudit`` group: where every command is registered and every error is caught."""

from __future__ import annotations

import click

from tokenaudit.errors import TokenauditError


class TokenauditGroup(click.Group):
    """Catches the project's errors once, for every command: the message, one line, exit 1
    (click prints ``Error: <message>``). Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TokenauditError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=TokenauditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokenaudit")
def main() -> None:
    """Token-usage audit pipeline for self-hosted LLM inference."""


def _register() -> None:
    from tokenaudit.cli import budgets, db, kafka, keys, model, registry, reports, services, verify

    for module in (kafka, registry, db, model, keys, budgets, services, reports, verify):
        module.register(main)


_register()
