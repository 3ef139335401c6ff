"""``tokenaudit model init``: the model the inference app serves."""

from __future__ import annotations

import click

from tokenaudit.cli.common import settings


@click.group()
def model() -> None:
    """The model the inference app serves."""


@model.command("init")
@click.option(
    "--arch",
    type=click.Choice(["t5", "gpt2", "bert", "mistral"]),
    default="t5",
    show_default=True,
    help="Family: t5 (the default model), gpt2, mistral (the LLaMA family) or bert (embeddings only).",
)
def model_init(arch: str) -> None:
    """Build a tiny offline model of a family (seeded weights, its own locally trained tokenizer)
    into <data_dir>/models/<arch>-tiny and print its path (for TOKENAUDIT_MODEL)."""
    from tokenaudit.inference.model_init import build_default_model

    s = settings()
    path = str(s.data_dir / "models" / f"{arch}-tiny")
    if s.model and arch == "t5":
        click.echo(f"TOKENAUDIT_MODEL is set ({s.model}); the app serves that, building the default anyway")
    built = build_default_model(path, arch=arch)
    click.echo(f"model {'built' if built else 'already present'} at {path}")
    if path != s.effective_model:
        click.echo(f"serve it with TOKENAUDIT_MODEL={path}")


def register(main: click.Group) -> None:
    main.add_command(model)
