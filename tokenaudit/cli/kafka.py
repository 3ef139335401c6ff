"""``tokenaudit kafka start|stop|status|install``: the local Kafka (KRaft)."""

from __future__ import annotations

import sys

import click

from tokenaudit.cli.common import BROKERS_OPTION, FORMAT_OPTION, settings


@click.group()
def kafka() -> None:
    """The local Kafka (KRaft): one broker, or a cluster of N (--brokers N), optionally SASL."""


def _cluster(brokers: int | None = None, sasl: bool | None = None):
    from tokenaudit.infra.kafka_cluster import ClusterConfig, KafkaCluster

    return KafkaCluster(ClusterConfig.from_settings(settings(), brokers=brokers, sasl=sasl))


@kafka.command("start")
@BROKERS_OPTION
@click.option(
    "--sasl",
    is_flag=True,
    default=None,
    help="Create the cluster with SASL/SCRAM-SHA-512 client listeners (credentials in <data_dir>/kafka).",
)
def kafka_start(brokers: int | None, sasl: bool | None) -> None:
    """Start the nodes that are not running (fetching Kafka on first use); returns once every
    node answers metadata."""
    cluster = _cluster(brokers, sasl)
    started = cluster.start()
    shape = f"{cluster.size} broker{'s' if cluster.size > 1 else ''}" + (
        " (SASL/SCRAM-SHA-512)" if cluster.sasl else ""
    )
    if not started:
        click.echo(f"kafka already running at {cluster.bootstrap}: {shape}")
    elif cluster.size == 1:
        click.echo(f"kafka started at {cluster.bootstrap}" + (" (SASL/SCRAM-SHA-512)" if cluster.sasl else ""))
    else:
        others = [str(n) for n in range(1, cluster.size + 1) if n not in started]
        click.echo(
            f"kafka at {cluster.bootstrap}: {shape}; started broker(s) {', '.join(map(str, started))}"
            + (f"; {', '.join(others)} already running" if others else "")
        )
    if cluster.sasl:
        from tokenaudit.infra.kafka_cluster import CLIENT_USER, CREDENTIALS_FILE

        click.echo(f"client user {CLIENT_USER!r}, password in {cluster.home / CREDENTIALS_FILE} (mode 0600)")


@kafka.command("stop")
def kafka_stop() -> None:
    """Stop every node of the local cluster gracefully."""
    stopped = _cluster().stop()
    click.echo(f"kafka stopped ({stopped} broker{'s' if stopped != 1 else ''})" if stopped else "kafka was not running")


@kafka.command("status")
@FORMAT_OPTION
def kafka_status(fmt: str) -> None:
    """Every node's address and state; exit 3 unless all of them run."""
    from tokenaudit.reports.formatting import print_rows

    nodes = _cluster().status()
    if all(n.state == "down" for n in nodes):
        click.echo("kafka is down")
        sys.exit(3)
    print_rows(
        [
            {
                "broker": n.node_id,
                "address": n.address,
                "controller": n.controller,
                "state": n.state,
                "pid": str(n.pid or ""),
            }
            for n in nodes
        ],
        fmt,
    )
    if any(n.state != "running" for n in nodes):
        sys.exit(3)


@kafka.command("install")
def kafka_install_cmd() -> None:
    """Fetch the Kafka jars from Maven Central into the cache (done by `start` when needed)."""
    from tokenaudit.infra import kafka_install

    s = settings()
    path = kafka_install.install(s.cache_dir, s.kafka_version)
    click.echo(f"kafka {s.kafka_version} jars in {path}")


def register(main: click.Group) -> None:
    main.add_command(kafka)
