"""``tokenaudit model init``: the model the inference app serves."""

from __future__ import annotations

import click

from tokenaudit.cli.common import settings


@click.group()
def model() -> None:
    """The model the inference app serves."""


@model.command("init")
def model_init() -> None:
    """Build the offline default model (small T5, seeded weights, locally trained tokenizer)."""
    from tokenaudit.inference.model_init import build_default_model

    s = settings()
    path = s.effective_model
    if s.model:
        click.echo(f"TOKENAUDIT_MODEL is set ({s.model}); the app serves that, building the default anyway")
        path = str(s.data_dir / "models" / "t5-tiny")
    built = build_default_model(path)
    click.echo(f"model {'built' if built else 'already present'} at {path}")


def register(main: click.Group) -> None:
    main.add_command(model)
