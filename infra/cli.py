"""The ``tokenaudit`` command line (click). Each command is a thin shell over a module that
does the work, imported lazily so ``tokenaudit kafka status`` does not load TensorFlow."""

from __future__ import annotations

import json
import sys

import click

from tokenaudit.settings import SettingsError, get_settings


class CliError(click.ClickException):
    """A one-line error for the user (exit code 1)."""


def _settings():
    try:
        return get_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokenaudit")
def main() -> None:
    """Token-usage audit pipeline for self-hosted LLM inference."""


# --- kafka -------------------------------------------------------------------------------------
@main.group()
def kafka() -> None:
    """The local single-node Kafka broker (KRaft)."""


def _broker():
    from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker

    return KafkaBroker(BrokerConfig.from_settings(_settings()))


def _run(fn):
    """Call fn, turning the project's known error types into a one-line CliError."""
    from tokenaudit.infra.clickhouse import ClickHouseError
    from tokenaudit.infra.kafka_broker import KafkaLaunchError
    from tokenaudit.infra.kafka_install import KafkaInstallError

    try:
        return fn()
    except (KafkaLaunchError, KafkaInstallError, ClickHouseError, SettingsError) as exc:
        raise CliError(str(exc)) from None


@kafka.command("start")
def kafka_start() -> None:
    """Start the broker (fetching Kafka on first use); returns once it answers metadata."""
    broker = _broker()
    started = _run(broker.start)
    click.echo(f"kafka {'started' if started else 'already running'} at {broker.bootstrap}")


@kafka.command("stop")
def kafka_stop() -> None:
    """Stop the broker gracefully."""
    stopped = _run(_broker().stop)
    click.echo("kafka stopped" if stopped else "kafka was not running")


@kafka.command("status")
def kafka_status() -> None:
    """Print the bootstrap address, or say it is down (exit 3)."""
    broker = _broker()
    status = broker.status()
    if status == "down":
        click.echo("kafka is down")
        sys.exit(3)
    click.echo(f"{broker.bootstrap} ({status})")


@kafka.command("install")
def kafka_install_cmd() -> None:
    """Fetch the Kafka jars from Maven Central into the cache (done by `start` when needed)."""
    from tokenaudit.infra import kafka_install

    s = _settings()
    path = _run(lambda: kafka_install.install(s.cache_dir, s.kafka_version))
    click.echo(f"kafka {s.kafka_version} jars in {path}")


# --- db ----------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """ClickHouse schema."""


@db.command("migrate")
def db_migrate() -> None:
    """Create the database and tables, apply pending migrations and retention TTLs."""
    from tokenaudit.infra.clickhouse import connect
    from tokenaudit.infra.migrate import applied_versions, migrate, ttl_days_from_settings

    s = _settings()

    def go():
        client = connect(s.effective_clickhouse_dsn)
        applied = migrate(client, s.clickhouse_database, ttl_days_from_settings(s))
        return applied, applied_versions(client, s.clickhouse_database)

    applied, versions = _run(go)
    click.echo(f"applied {applied or 'nothing (up to date)'}; schema version {max(versions) if versions else 0}")


# --- output formats (shared by every data-printing command) -----------------------------------
FORMAT_OPTION = click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
                             show_default=True, help="Output format.")


def print_rows(rows: list[dict], fmt: str) -> None:
    """Print a list of flat dicts as a table, JSON or CSV."""
    if fmt == "json":
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    if not rows:
        click.echo("(no rows)")
        return
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r[c], (int, float)) for r in rows) for c in columns]
    line = lambda vals: "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric))  # noqa: E731
    click.echo(line(columns))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo(line(row))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --- inference ---------------------------------------------------------------------------------
@main.group()
def model() -> None:
    """The model the inference app serves."""


@model.command("init")
def model_init() -> None:
    """Build the offline default model (small T5, seeded weights, locally trained tokenizer)."""
    from tokenaudit.inference.model_init import ModelInitError, build_default_model

    s = _settings()
    path = s.effective_model
    if s.model:
        click.echo(f"TOKENAUDIT_MODEL is set ({s.model}); the app serves that, building the default anyway")
        path = str(s.data_dir / "models" / "t5-tiny")
    try:
        built = build_default_model(path)
    except ModelInitError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"model {'built' if built else 'already present'} at {path}")


@main.command()
def serve() -> None:
    """Run the inference app in the foreground (SIGTERM: graceful, flushes or spools events)."""
    from tokenaudit.inference.server import serve as run_server

    s = _settings()
    try:
        run_server(s)
    except ValueError as exc:  # KeyRegistryError, DigestSecretError, a bad TRUSTED_PROXIES entry
        raise CliError(str(exc)) from None


@main.group()
def keys() -> None:
    """The API-key registry (hashed keys -> client, department, role)."""


@keys.command("add")
@click.option("--client", "client_id", required=True, help="client_id the key maps to.")
@click.option("--department", default="", show_default=True, help="Department of the client.")
@click.option("--admin", is_flag=True, help="Give the key the admin role.")
@click.option("--expires", default=None, metavar="WHEN",
              help="Expiry: a duration from now (90m, 12h, 30d, 2w) or an ISO date/time; default never.")
def keys_add(client_id: str, department: str, admin: bool, expires: str | None) -> None:
    """Add a key and print it once (only its hash is stored)."""
    from tokenaudit.inference.api_keys import KeyRegistryError, add_key, marker_path, parse_expiry, write_marker

    s = _settings()
    path = s.default_api_keys_file
    try:
        raw = add_key(path, client_id, department, "admin" if admin else "client",
                      expires=parse_expiry(expires) if expires else None)
    except KeyRegistryError as exc:
        raise CliError(str(exc)) from None
    write_marker(marker_path(s), path)
    click.echo(raw)
    click.echo(f"(added to {path}; store the key now, it is not shown again)", err=True)


@keys.command("list")
@FORMAT_OPTION
def keys_list(fmt: str) -> None:
    """List the keys (key_id, client, department, role, created, expires, state); never the key."""
    import time

    from tokenaudit.inference.api_keys import KeyRegistryError, list_keys

    s = _settings()
    try:
        keys = list_keys(s.default_api_keys_file)
    except KeyRegistryError as exc:
        raise CliError(str(exc)) from None
    now = time.time()
    stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""  # noqa: E731
    print_rows([{"key_id": k.key_id, "client": k.client_id, "department": k.department, "role": k.role,
                 "created": stamp(k.created), "expires": stamp(k.expires),
                 "state": "expired" if k.expired(now) else "active"} for k in keys], fmt)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its key_id: every running service refuses it within about a second."""
    from tokenaudit.inference.api_keys import KeyRegistryError, marker_path, revoke_key, write_marker

    s = _settings()
    try:
        key = revoke_key(s.default_api_keys_file, key_id)
    except KeyRegistryError as exc:
        raise CliError(str(exc)) from None
    write_marker(marker_path(s), s.default_api_keys_file)
    click.echo(f"revoked {key.key_id} (client {key.client_id})")


# --- streams -----------------------------------------------------------------------------------
@main.command()
@click.option("--loglevel", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="faust log level.")
def worker(loglevel: str) -> None:
    """Run the stream worker (faust) in the foreground; more workers with the same
    TOKENAUDIT_WORKER_ID share the partitions. SIGTERM stops it gracefully."""
    from tokenaudit.streams.app import run_worker

    s = _settings()
    _run(lambda: run_worker(s, loglevel=loglevel))


@main.command()
def sink() -> None:
    """Run the ClickHouse sink in the foreground, with the read-only usage API beside it
    (GET /healthz on TOKENAUDIT_USAGE_API_PORT answers once it is ready)."""
    import logging

    from tokenaudit.sinks.service import run_sink

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings()
    sys.exit(_run(lambda: run_sink(s)))


# --- pipeline ----------------------------------------------------------------------------------
def _supervisor():
    from tokenaudit.infra.services import Supervisor

    return Supervisor(_settings(), echo=click.echo)


def _run_up(supervisor) -> dict[str, str]:
    from tokenaudit.infra.services import ServiceError

    try:
        return _run(supervisor.up)
    except ServiceError as exc:
        raise CliError(str(exc)) from None


@main.command()
def up() -> None:
    """Start Kafka, the sink (+ usage API), the stream worker and the inference app in the
    background (pid files and logs under the data directory); returns when all are ready."""
    endpoints = _run_up(_supervisor())
    click.echo("tokenaudit is up:")
    for name, value in endpoints.items():
        click.echo(f"  {name:<10} {value}")


@main.command()
def down() -> None:
    """Stop every service gracefully (inference first, so its events reach Kafka)."""
    stopped = _supervisor().down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@main.command()
@FORMAT_OPTION
def status(fmt: str) -> None:
    """Show each service's state."""
    rows = [{"service": k, "state": v} for k, v in _supervisor().status().items()]
    print_rows(rows, fmt)


@main.command()
@click.option("--steady", default=40.0, show_default=True, help="Seconds of steady traffic.")
@click.option("--spike", default=15.0, show_default=True, help="Seconds of spike traffic after it.")
@click.option("--keep-running", is_flag=True, help="Leave the pipeline up afterwards (skip `down`).")
def demo(steady: float, spike: float, keep_running: bool) -> None:
    """Run the whole pipeline end to end on embedded defaults: up, traffic, reports, down."""
    from tokenaudit.infra.demo import run_demo
    from tokenaudit.infra.services import ServiceError

    try:
        code = _run(lambda: run_demo(click.echo, steady, spike, keep_running))
    except ServiceError as exc:
        raise CliError(str(exc)) from None
    sys.exit(code)


# --- queries: usage, top, report, latency, anomalies (defined beside the queries, in sinks/) ----
from tokenaudit.sinks.cli_reports import register as _register_report_commands  # noqa: E402

_register_report_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
