"""The generated blocks of README.md, CONTRIBUTING.md and docs/*.md, made from the code's own
declarations, so the pages that name the contract cannot drift from it.

A block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` (the prose around it is
hand-written); :data:`BLOCKS` says what fills each NAME. ``make docs`` (``python -m
tokenaudit.docs_gen``) rewrites every block and ``docs/models.md``; ``--check`` only says which
files are stale; ``tests/test_docs.py`` regenerates them in memory and compares.

Why outside the layered rooms (pyproject's import-linter contract): it reads the declarations
of every room, the CLI's command tree included, and nothing imports it, so it can sit in no
layer without an upward import; the acyclic-siblings contract still covers it.

Everything is rendered from defaults, never from this process's ``TOKENAUDIT_*`` environment
(``Settings.model_construct`` skips the environment and the TOML file), so the pages read the
same on every machine.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

if TYPE_CHECKING:
    from tokenaudit.infra.store import Store

ROOT = Path(__file__).resolve().parent.parent
#: the hand-written pages that may hold generated blocks (docs/models.md is generated whole)
PAGES = ("README.md", "CONTRIBUTING.md", "docs/*.md")
MODELS_PAGE = "docs/models.md"
_BLOCK = re.compile(r"(<!-- (?P<name>[a-z-]+):start -->\n)(?P<body>.*?)(<!-- (?P=name):end -->)", re.S)


def _defaults():
    """The settings as declared (defaults only: no environment, no TOML file)."""
    from tokenaudit.settings import Settings

    return Settings.model_construct()


def _setting_named(value: object, prefix: str) -> str | None:
    """The settings field (prefix ``prefix``) whose default is ``value``, as its variable."""
    from tokenaudit.settings import ENV_PREFIX, Settings

    for name, info in Settings.model_fields.items():
        if name.startswith(prefix) and info.default == value:
            return f"{ENV_PREFIX}{name.upper()}"
    return None


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, ``<name>`` kept visible (a
    renderer would take it for an HTML tag)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


# --- settings ---------------------------------------------------------------------------------
def settings_block() -> str:
    from tokenaudit.settings import settings_table_markdown

    return settings_table_markdown()


# --- topics -----------------------------------------------------------------------------------
def topics_block() -> str:
    from tokenaudit.infra.topics import declared_topics
    from tokenaudit.streams.state_keys import rollup_record_key

    s = _defaults()
    partitions_var = _setting_named(s.kafka_partitions, "kafka_partitions")
    rows = ["| topic (setting) | role | partitions | cleanup | key | value |", "| --- | --- | --- | --- | --- | --- |"]
    for spec in declared_topics(s):
        key = _cell(spec.key)
        if spec.role == "rollups":
            # the key as the worker builds it, fields named in place of values (topics.py's
            # description of it predates the department and api key in a window's identity)
            names = ("client_id", "department", "api_key_id", "model", "window_start")
            built = rollup_record_key(*names)  # type: ignore[arg-type]
            key = "`" + built.decode().replace("\x1f", " \\x1f ") + "` (window_start: epoch ms)"
        setting = _setting_named(spec.name, "topic_")
        partitions = f"`{partitions_var}` ({spec.partitions})" if partitions_var else str(spec.partitions)
        rows.append(
            f"| `{spec.name}` (`{setting}`) | {spec.role} | {partitions} | {spec.cleanup_policy} "
            f"| {key} | {_cell(spec.value)} |"
        )
    return "\n".join(rows)


# --- records ----------------------------------------------------------------------------------
def _avro_type(t: Any) -> str:
    if isinstance(t, list):
        return " or ".join(_avro_type(x) for x in t)
    if isinstance(t, dict):
        if "logicalType" in t:
            return f"{t['type']} ({t['logicalType']})"
        if t.get("type") == "array":
            return f"array of {_avro_type(t['items'])}"
        if t.get("type") == "map":
            return f"map of {_avro_type(t['values'])}"
        return str(t.get("name") or t.get("type"))
    return str(t)


def records_block() -> str:
    from tokenaudit.schemas.codec import catalog

    out: list[str] = []
    for name in sorted(catalog.by_name):
        versions = catalog.by_name[name]
        current = versions[-1]
        raw = current.raw
        shipped = ", ".join(f"[v{v.version}](../schemas/avsc/{name}.v{v.version}.avsc)" for v in versions)
        out += [
            f"### `{name}` (v{current.version})",
            "",
            _cell(raw.get("doc", "")) + f" Versions: {shipped}.",
            "",
            "| field | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for f in raw["fields"]:
            default = f"`{json.dumps(f['default'])}`" if "default" in f else ""
            out.append(f"| `{f['name']}` | {_avro_type(f['type'])} | {default} | {_cell(f.get('doc', ''))} |")
        out.append("")
    return "\n".join(out).rstrip()


# --- tables -----------------------------------------------------------------------------------
def tables_block() -> str:
    from tokenaudit.schemas import columns

    keys = {
        "usage_rollup": columns.ROLLUP_KEY,
        "usage_sampled": columns.SAMPLED_KEY,
        "anomalies": columns.ANOMALY_KEY,
        "usage_requests": columns.REQUESTS_KEY,
    }
    extra = {"usage_rollup": f" (and `{columns.ROLLUP_LATE_IDS}`, written with rows that merged late deltas)"}
    rows = ["| table | key (one row per) | columns the sink writes, in its order |", "| --- | --- | --- |"]
    for table, cols in columns.TABLES.items():
        key = ", ".join(f"`{c}`" for c in keys[table]) if table in keys else ""
        rows.append(f"| `{table}` | {key} | {', '.join(f'`{c}`' for c in cols)}{extra.get(table, '')} |")
    return "\n".join(rows)


# --- routes -----------------------------------------------------------------------------------
def _starlette_routes(app: Any) -> list:
    """The routes of the Starlette app inside ``app``'s pure-ASGI layers."""
    while not hasattr(app, "router"):
        app = app.app
    return list(app.router.routes)


def _methods(route: Any) -> str:
    return ", ".join(sorted(m for m in (getattr(route, "methods", None) or {"GET"}) if m != "HEAD"))


def routes_block() -> str:
    from tokenaudit.inference.app import OPEN_PATHS
    from tokenaudit.inference.app import create_app as inference_app
    from tokenaudit.reports.budgets_route import PARAMS as BUDGETS_PARAMS
    from tokenaudit.reports.budgets_route import PATH as BUDGETS_PATH
    from tokenaudit.reports.dashboard import OPEN_PATHS as DASHBOARD_OPEN
    from tokenaudit.reports.dashboard import STREAM_PARAMS, STREAM_PATH
    from tokenaudit.reports.openai_usage import PARAMETERS as OPENAI_USAGE_PARAMS
    from tokenaudit.reports.openai_usage import PATH as OPENAI_USAGE_PATH
    from tokenaudit.reports.params import REPORT_PARAMS
    from tokenaudit.reports.usage_api import create_app as usage_app

    with tempfile.TemporaryDirectory() as tmp:  # the app reads its key registry and secret from data_dir
        s = _defaults().model_copy(update={"data_dir": Path(tmp), "prompt_digest_secret": "docs"})
        inference = _starlette_routes(inference_app(s))
        usage = _starlette_routes(usage_app(cast("Store", None), s))  # routes only: nothing is queried
    rows = [
        f"Inference app (`tokenaudit serve`, port `{_setting_named(s.http_port, 'http_port')}` ({s.http_port})):",
        "",
        "| method | path | key | handler (in `inference/`) |",
        "| --- | --- | --- | --- |",
    ]
    for r in inference:
        key = "no" if r.path in OPEN_PATHS else "yes"
        handler = f"{r.endpoint.__module__.rsplit('.', 1)[-1]}.{r.endpoint.__name__}"
        rows.append(f"| {_methods(r)} | `{r.path}` | {key} | `{handler}` |")
    rows += [
        "",
        (
            f"Usage API (`tokenaudit api`, or inside `tokenaudit sink`; port "
            f"`{_setting_named(s.usage_api_port, 'usage_api_port')}` ({s.usage_api_port})):"
        ),
        "",
        "| method | path | key | query parameters |",
        "| --- | --- | --- | --- |",
    ]
    route_params = {OPENAI_USAGE_PATH: OPENAI_USAGE_PARAMS, STREAM_PATH: STREAM_PARAMS, BUDGETS_PATH: BUDGETS_PARAMS}
    for r in usage:
        name = r.path.removeprefix("/v1/")
        params = ", ".join(f"`{p}`" for p in sorted(REPORT_PARAMS.get(name, route_params.get(r.path, ()))))
        if name == "admin/verify":
            params = "`since_ms`, `until_ms` (admin keys only)"
        elif name == "admin/erase":
            params = "`client` (admin keys only)"
        elif name == "requests/{id:path}":
            params = "`{id}`: a request_id or event_id (404 when none in the key's scope)"
        path = f"{r.path}/{{file}}" if r.path in DASHBOARD_OPEN - {"/"} else r.path  # the mounted assets
        key = "no" if r.path == "/healthz" or r.path in DASHBOARD_OPEN else "yes"
        rows.append(f"| {_methods(r)} | `{path}` | {key} | {params} |")
    return "\n".join(rows)


# --- CLI --------------------------------------------------------------------------------------
def _walk(group: click.Group, ctx: click.Context, prefix: str) -> Iterator[tuple[str, click.Command]]:
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, ctx, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", cmd


def _param_usage(p: click.Parameter) -> str:
    if isinstance(p, click.Argument):
        return (p.name or "").upper()
    if not isinstance(p, click.Option):
        raise TypeError(f"a click parameter of an unknown kind: {p!r}")
    if p.is_flag:
        text = "|".join(p.opts + p.secondary_opts)
    elif isinstance(p.type, click.Choice):
        text = f"{p.opts[0]} {'|'.join(map(str, p.type.choices))}"
    else:
        text = f"{p.opts[0]} {p.metavar or (p.name or '').upper()}"
    return text if p.required else f"[{text}]"


def cli_block() -> str:
    from tokenaudit.cli import main

    ctx = click.Context(main, info_name="tokenaudit")
    rows = ["| command | arguments and options | what |", "| --- | --- | --- |"]
    for path, cmd in _walk(main, ctx, "tokenaudit"):
        params = [p for p in cmd.params if not (isinstance(p, click.Option) and p.hidden)]
        usage = " ".join(f"`{_param_usage(p)}`" for p in params)
        rows.append(f"| `{path}` | {_cell(usage)} | {_cell((cmd.help or '').split(chr(10) * 2, 1)[0])} |")
    return "\n".join(rows)


#: every block NAME a page may hold, and what fills it
BLOCKS: dict[str, Callable[[], str]] = {
    "settings": settings_block,
    "topics": topics_block,
    "records": records_block,
    "tables": tables_block,
    "routes": routes_block,
    "cli": cli_block,
}


# --- pages ------------------------------------------------------------------------------------
def render(text: str, cache: dict[str, str] | None = None) -> str:
    """``text`` with every generated block filled anew; an unknown block name is an error."""
    cache = {} if cache is None else cache

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        if name not in cache:
            cache[name] = BLOCKS[name]().rstrip("\n")
        return f"{m.group(1)}{cache[name]}\n{m.group(4)}"

    return _BLOCK.sub(fill, text)


def pages(root: Path = ROOT) -> list[Path]:
    found = [p for pattern in PAGES for p in sorted(root.glob(pattern))]
    return [p for p in found if p.relative_to(root).as_posix() != MODELS_PAGE]


def stale(root: Path = ROOT, with_models: bool = False) -> dict[Path, str]:
    """Every page whose generated content differs from what the code declares: path -> new text."""
    cache: dict[str, str] = {}
    changed = {}
    for page in pages(root):
        old = page.read_text()
        new = render(old, cache)
        if new != old:
            changed[page] = new
    if with_models:  # needs transformers' TF mappings: tests/test_inference_families.py checks it
        from tokenaudit.inference.families import models_markdown

        models = root / MODELS_PAGE
        new = models_markdown()
        if not models.exists() or models.read_text() != new:
            changed[models] = new
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    changed = stale(ROOT, with_models=True)
    if "--check" in args:
        for path in changed:
            print(f"stale: {path.relative_to(ROOT)} (run `make docs`)")  # noqa: T201 (a command-line tool)
        return 1 if changed else 0
    for path, text in changed.items():
        path.write_text(text)
        print(f"regenerated {path.relative_to(ROOT)}")  # noqa: T201 (a command-line tool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
