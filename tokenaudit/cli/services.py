"""The pipeline's processes: ``serve``, ``worker``, ``sink``, ``api`` in the foreground, and
``up``, ``down``, ``status``, ``demo`` for all of them in the background.

``sink`` is where two rooms are composed: with ``--api`` the sink process also serves the
usage API over its own store (for the embedded store one process owns the chDB directory).
Which processes run, with which flags, is the supervisor's decision
(:meth:`tokenaudit.infra.services.Supervisor.services`); this module only wires them.
"""

from __future__ import annotations

import logging
import sys

import click

from tokenaudit.cli.common import BROKERS_OPTION, FORMAT_OPTION, settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@click.command()
def serve() -> None:
    """Run the inference app in the foreground (SIGTERM: graceful, flushes or spools events)."""
    from tokenaudit.inference.server import serve as run_server

    run_server(settings())


@click.command()
@click.option(
    "--loglevel",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="faust log level.",
)
def worker(loglevel: str) -> None:
    """Run the stream worker (faust) in the foreground; more workers with the same
    TOKENAUDIT_WORKER_ID share the partitions. SIGTERM stops it gracefully."""
    from tokenaudit.streams.app import run_worker

    run_worker(settings(), loglevel=loglevel)


@click.command()
@click.option(
    "--api/--no-api",
    "with_api",
    default=True,
    show_default=True,
    help="Also serve the read-only usage API from this process, over the sink's store (what `up` "
    "does for the embedded store: one process owns a chDB directory). --no-api: only the "
    "sink's /healthz and /metrics, on TOKENAUDIT_SINK_PORT; the API runs as `tokenaudit api`.",
)
def sink(with_api: bool) -> None:
    """Run the ClickHouse sink in the foreground (GET /healthz answers once it is ready)."""
    from tokenaudit.sinks.service import run_sink

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    s = settings()
    api = None
    if with_api:
        from tokenaudit.reports.usage_api import create_app

        def api(store):
            return create_app(store, s)

    sys.exit(run_sink(s, api=api))


@click.command()
def api() -> None:
    """Run the read-only usage API alone in the foreground (for a ClickHouse server; with the
    embedded store the sink serves it, see `tokenaudit sink`)."""
    from tokenaudit.reports.service import run_api

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    sys.exit(run_api(settings()))


def _supervisor(brokers: int | None = None):
    from tokenaudit.infra.services import Supervisor

    return Supervisor(settings(), echo=click.echo, brokers=brokers)


@click.command()
@BROKERS_OPTION
def up(brokers: int | None) -> None:
    """Start Kafka (the nodes not running, when the bootstrap is the local cluster), the sink
    (+ usage API), the stream worker and the inference app in the background (pid files and
    logs under the data directory); returns when all are ready."""
    endpoints = _supervisor(brokers).up()
    click.echo("tokenaudit is up:")
    for name, value in endpoints.items():
        click.echo(f"  {name:<10} {value}")


@click.command()
def down() -> None:
    """Stop every service gracefully (inference first, so its events reach Kafka)."""
    stopped = _supervisor().down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@click.command()
@FORMAT_OPTION
def status(fmt: str) -> None:
    """Show each service's state."""
    from tokenaudit.reports.formatting import print_rows

    print_rows([{"service": k, "state": v} for k, v in _supervisor().status().items()], fmt)


@click.command()
@click.option("--steady", default=40.0, show_default=True, help="Seconds of steady traffic.")
@click.option("--spike", default=15.0, show_default=True, help="Seconds of spike traffic after it.")
@click.option("--keep-running", is_flag=True, help="Leave the pipeline up afterwards (skip `down`).")
def demo(steady: float, spike: float, keep_running: bool) -> None:
    """Run the whole pipeline end to end on embedded defaults: up, traffic, reports, down."""
    from tokenaudit.demo import run_demo

    sys.exit(run_demo(click.echo, steady, spike, keep_running))


def register(main: click.Group) -> None:
    for command in (serve, worker, sink, api, up, down, status, demo):
        main.add_command(command)
