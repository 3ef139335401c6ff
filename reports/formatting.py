"""How the CLI prints what the read side returns: rows as a table, JSON or CSV; anomalies one
at a time as they stream in; a verify report."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

import click

from tokenaudit.schemas.columns import ANOMALIES

if TYPE_CHECKING:
    from tokenaudit.reports.verify import VerifyReport


def print_rows(rows: list[dict[str, Any]], fmt: str) -> None:
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

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric))

    click.echo(line(columns))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo(line(row))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class AnomalyPrinter:
    """Prints anomalies one at a time (a stream has no end to wait for before printing)."""

    TABLE = ("ts", "severity", "rule", "client_id", "observed", "threshold", "message")

    def __init__(self, fmt: str, out: TextIO | None = None) -> None:
        self.fmt, self.out, self.columns, self._header = fmt, out or sys.stdout, ANOMALIES, False

    def __call__(self, anomaly: dict[str, Any]) -> None:
        from tokenaudit.reports.webhook import anomaly_json

        row = anomaly_json(anomaly)
        if self.fmt == "json":
            line = json.dumps(row)
        elif self.fmt == "csv":
            import csv
            import io

            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
            if not self._header:
                writer.writeheader()
            writer.writerow(row)
            line = buf.getvalue().rstrip("\n")
        else:
            cells = [_short(row.get(c)) for c in self.TABLE]
            head = "" if self._header else "  ".join(c.ljust(w) for c, w in zip(self.TABLE, _WIDTHS)) + "\n"
            line = head + "  ".join(v.ljust(w) for v, w in zip(cells, _WIDTHS))
        self._header = True
        click.echo(line, file=self.out)
        self.out.flush()


_WIDTHS = (24, 8, 14, 20, 12, 12, 0)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_verify(report: VerifyReport) -> None:
    """A :class:`~tokenaudit.reports.verify.VerifyReport` for people: what was checked, notes,
    pending buckets, and every drift as a table."""
    out = report.as_json()
    topic = out["topic"]
    click.echo(
        f"checked window starts {out['checked_from']} .. {out['checked_until']} (settled up to "
        f"{out['settled_until']}); {out['buckets']} client/model/hour buckets; topic: {topic['distinct_events']:,} "
        f"distinct events in range, {topic['duplicates']:,} duplicate copies; "
        f"ledger {'compared' if out['ledger'] else 'absent'}"
    )
    for note in out["notes"]:
        click.echo(f"note: {note}")
    if out["pending"]:
        click.echo(
            f"pending: {len(out['pending'])} bucket(s) where an event arrived in the last "
            f"{out['settle_seconds']:g}s (late events still being applied); not compared, run again"
        )
    if not out["drift"]:
        click.echo(
            "OK: ClickHouse holds every event on the topic, each once"
            + (" (in the buckets compared)" if out["pending"] else "")
        )
        return
    rows = []
    for d in out["drift"]:
        rows.append(
            {
                "client_id": d["client_id"],
                "model": d["model"],
                "hour": d["hour"],
                "what": d["what"],
                **{f"topic_{k}": v for k, v in d["topic"].items()},
                **{f"store_{k}": v for k, v in d["clickhouse"].items()},
            }
        )
    print_rows(rows, "table")
    click.echo(f"DRIFT in {len(rows)} bucket(s)")
