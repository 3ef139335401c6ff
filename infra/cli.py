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
    """The local Kafka (KRaft): one broker, or a cluster of N (--brokers N), optionally SASL."""


def _cluster(brokers: int | None = None, sasl: bool | None = None):
    from tokenaudit.infra.kafka_broker import ClusterConfig, KafkaCluster

    return _run(lambda: KafkaCluster(ClusterConfig.from_settings(_settings(), brokers=brokers, sasl=sasl)))


def _run(fn):
    """Call fn, turning the project's known error types into a one-line CliError."""
    from tokenaudit.infra.clickhouse import ClickHouseError
    from tokenaudit.infra.kafka_broker import KafkaLaunchError
    from tokenaudit.infra.kafka_clients import KafkaAccessError, KafkaConfigError
    from tokenaudit.infra.kafka_install import KafkaInstallError

    try:
        return fn()
    except (KafkaLaunchError, KafkaInstallError, KafkaAccessError, KafkaConfigError, ClickHouseError,
            SettingsError) as exc:
        raise CliError(str(exc)) from None


BROKERS_OPTION = click.option(
    "--brokers", type=click.IntRange(1, 9), default=None,
    help="Nodes of the local cluster when it is first created (default 1); an existing cluster keeps its size.")


@kafka.command("start")
@BROKERS_OPTION
@click.option("--sasl", is_flag=True, default=None,
              help="Create the cluster with SASL/SCRAM-SHA-512 client listeners (credentials in <data_dir>/kafka).")
def kafka_start(brokers: int | None, sasl: bool | None) -> None:
    """Start the nodes that are not running (fetching Kafka on first use); returns once every
    node answers metadata."""
    cluster = _cluster(brokers, sasl)
    started = _run(cluster.start)
    shape = f"{cluster.size} broker{'s' if cluster.size > 1 else ''}" + (" (SASL/SCRAM-SHA-512)" if cluster.sasl else "")
    if not started:
        click.echo(f"kafka already running at {cluster.bootstrap}: {shape}")
    elif cluster.size == 1:
        click.echo(f"kafka started at {cluster.bootstrap}" + (" (SASL/SCRAM-SHA-512)" if cluster.sasl else ""))
    else:
        others = [str(n) for n in range(1, cluster.size + 1) if n not in started]
        click.echo(f"kafka at {cluster.bootstrap}: {shape}; started broker(s) {', '.join(map(str, started))}"
                   + (f"; {', '.join(others)} already running" if others else ""))
    if cluster.sasl:
        from tokenaudit.infra.kafka_broker import CLIENT_USER, CREDENTIALS_FILE

        click.echo(f"client user {CLIENT_USER!r}, password in {cluster.home / CREDENTIALS_FILE} (mode 0600)")


@kafka.command("stop")
def kafka_stop() -> None:
    """Stop every node of the local cluster gracefully."""
    stopped = _run(_cluster().stop)
    click.echo(f"kafka stopped ({stopped} broker{'s' if stopped != 1 else ''})" if stopped else "kafka was not running")


@kafka.command("status")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="Output format.")
def kafka_status(fmt: str) -> None:
    """Every node's address and state; exit 3 unless all of them run."""
    nodes = _run(_cluster().status)
    if all(n.state == "down" for n in nodes):
        click.echo("kafka is down")
        sys.exit(3)
    print_rows([{"broker": n.node_id, "address": n.address, "controller": n.controller, "state": n.state,
                 "pid": str(n.pid or "")} for n in nodes], fmt)
    if any(n.state != "running" for n in nodes):
        sys.exit(3)


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
@click.option("--arch", type=click.Choice(["t5", "gpt2", "bert", "mistral"]), default="t5", show_default=True,
              help="Family: t5 (the default model), gpt2, mistral (the LLaMA family) or bert (embeddings only).")
def model_init(arch: str) -> None:
    """Build a tiny offline model of a family (seeded weights, its own locally trained tokenizer)
    into <data_dir>/models/<arch>-tiny and print its path (for TOKENAUDIT_MODEL)."""
    from tokenaudit.inference.model_init import ModelInitError, build_default_model

    s = _settings()
    path = str(s.data_dir / "models" / f"{arch}-tiny")
    if s.model and arch == "t5":
        click.echo(f"TOKENAUDIT_MODEL is set ({s.model}); the app serves that, building the default anyway")
    try:
        built = build_default_model(path, arch=arch)
    except ModelInitError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"model {'built' if built else 'already present'} at {path}")
    if path != s.effective_model:
        click.echo(f"serve it with TOKENAUDIT_MODEL={path}")


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
def _supervisor(brokers: int | None = None):
    from tokenaudit.infra.services import Supervisor

    return _run(lambda: Supervisor(_settings(), echo=click.echo, brokers=brokers))


def _run_up(supervisor) -> dict[str, str]:
    from tokenaudit.infra.services import ServiceError

    try:
        return _run(supervisor.up)
    except ServiceError as exc:
        raise CliError(str(exc)) from None


@main.command()
@BROKERS_OPTION
def up(brokers: int | None) -> None:
    """Start Kafka (the nodes not running, when the bootstrap is the local cluster), the sink
    (+ usage API), the stream worker and the inference app in the background (pid files and
    logs under the data directory); returns when all are ready."""
    endpoints = _run_up(_supervisor(brokers))
    click.echo("tokenaudit is up:")
    for name, value in endpoints.items():
        click.echo(f"  {name:<10} {value}")


@main.command()
def down() -> None:
    """Stop every service gracefully (inference first, so its events reach Kafka)."""
    stopped = _run(_supervisor().down)
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


@main.command()
@click.option("--since", required=True, help="Start: a duration back from now (15m, 24h, 7d) or an ISO time.")
@click.option("--until", default=None, help="End (exclusive), same forms; default now. Unsettled windows are left out.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format.")
def verify(since: str, until: str | None, fmt: str) -> None:
    """Reconcile the usage topic with ClickHouse per client, model and hour: print every
    difference; exit 1 on drift, 0 when everything that reached the topic is stored once."""
    from tokenaudit.sinks.params import QueryParamError
    from tokenaudit.sinks.verify import VerifyError, run_verify

    s = _settings()
    try:
        report = _run(lambda: run_verify(s, since, until))
    except (VerifyError, QueryParamError) as exc:
        raise CliError(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_verify(report)
    sys.exit(0 if report.ok else 1)


def _print_verify(report) -> None:
    out = report.as_json()
    topic = out["topic"]
    click.echo(f"checked window starts {out['checked_from']} .. {out['checked_until']} (settled up to "
               f"{out['settled_until']}); {out['buckets']} client/model/hour buckets; topic: {topic['distinct_events']:,} "
               f"distinct events in range, {topic['duplicates']:,} duplicate copies; "
               f"ledger {'compared' if out['ledger'] else 'absent'}")
    for note in out["notes"]:
        click.echo(f"note: {note}")
    if out["pending"]:
        click.echo(f"pending: {len(out['pending'])} bucket(s) where an event arrived in the last "
                   f"{out['settle_seconds']:g}s (late events still being applied); not compared, run again")
    if not out["drift"]:
        click.echo("OK: ClickHouse holds every event on the topic, each once"
                   + (" (in the buckets compared)" if out["pending"] else ""))
        return
    rows = []
    for d in out["drift"]:
        rows.append({"client_id": d["client_id"], "model": d["model"], "hour": d["hour"], "what": d["what"],
                     **{f"topic_{k}": v for k, v in d["topic"].items()},
                     **{f"store_{k}": v for k, v in d["clickhouse"].items()}})
    print_rows(rows, "table")
    click.echo(f"DRIFT in {len(rows)} bucket(s)")


# --- queries: usage, top, report, latency, anomalies (defined beside the queries, in sinks/) ----
from tokenaudit.sinks.cli_reports import register as _register_report_commands  # noqa: E402

_register_report_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
