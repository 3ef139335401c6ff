"""``tokenaudit registry start|stop|status|install`` and ``tokenaudit schemas check``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from tokenaudit.infra.registry_server import LocalRegistry

from tokenaudit.cli.common import settings


@click.group()
def registry() -> None:
    """The local schema registry (Apicurio Registry, Confluent-compatible API)."""


def _local() -> LocalRegistry:
    from tokenaudit.infra.registry_server import LocalRegistry, RegistryConfig

    return LocalRegistry(RegistryConfig.from_settings(settings()))


def _external() -> str:
    return settings().schema_registry_url


@registry.command("start")
def registry_start() -> None:
    """Start the local registry (fetching it on first use); returns once its API answers."""
    if _external():
        click.echo(f"TOKENAUDIT_SCHEMA_REGISTRY_URL names an external registry ({_external()}): left alone")
        return
    local = _local()
    started = local.start()
    click.echo(f"registry {'started' if started else 'already running'} at {local.url}")


@registry.command("stop")
def registry_stop() -> None:
    """Stop the local registry gracefully (its schemas and ids stay in the data directory)."""
    if _external():
        click.echo(f"TOKENAUDIT_SCHEMA_REGISTRY_URL names an external registry ({_external()}): left alone")
        return
    click.echo("registry stopped" if _local().stop() else "registry was not running")


@registry.command("status")
def registry_status() -> None:
    """The registry's URL and state; exit 3 unless it answers."""
    if _external():
        from tokenaudit.infra.registry_server import answers

        up = answers(_external())
        click.echo(f"external registry {_external()} {'answers' if up else 'does not answer'}")
        sys.exit(0 if up else 3)
    local = _local()
    state = local.status()
    click.echo(f"registry {state}" if state != "down" else f"registry is down (would serve {local.url})")
    if not state.startswith("running"):
        sys.exit(3)


@registry.command("install")
def registry_install_cmd() -> None:
    """Fetch Apicurio Registry from Maven Central into the cache (done by `start` when needed)."""
    from tokenaudit.infra import registry_install

    s = settings()
    path = registry_install.install(s.cache_dir, s.registry_version)
    click.echo(f"apicurio registry {s.registry_version} in {path}")


@click.group()
def schemas() -> None:
    """The Avro schemas on the topics, against the schema registry."""


@schemas.command("check")
@click.option(
    "--avsc",
    "folder",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A folder of <name>.v<N>.avsc files to check instead of the shipped ones (a working copy).",
)
def schemas_check(folder: Path | None) -> None:
    """Ask the registry whether every .avsc version is compatible with what its subject
    holds; exit 1 with the reasons if one is not. Registers nothing. Uses
    TOKENAUDIT_SCHEMA_REGISTRY_URL, else the local registry (which must be running)."""
    from tokenaudit.errors import RegistryError
    from tokenaudit.infra.schema_registry import check
    from tokenaudit.schemas.codec import SchemaCatalog, catalog

    s = settings()
    if not s.schema_registry_url:
        local = _local()
        if not local.is_ready():
            raise RegistryError(
                "no registry to check against: `tokenaudit registry start`, or set TOKENAUDIT_SCHEMA_REGISTRY_URL"
            )
        s = s.model_copy(update={"schema_registry_url": local.url})
    source = SchemaCatalog.load_dir(folder) if folder else catalog
    problems = check(s, source)
    for problem in problems:
        click.echo(f"incompatible: {problem}", err=True)
    if problems:
        sys.exit(1)
    versions = sum(len(v) for v in source.by_name.values())
    click.echo(f"{versions} schema versions compatible with {s.schema_registry_url}")


def register(main: click.Group) -> None:
    main.add_command(registry)
    main.add_command(schemas)
