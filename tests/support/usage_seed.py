"""Seed data for the query / usage API tests: rollups, sampled records and anomalies written
straight into a chDB database, plus the expected totals computed from the same rows. The seeds
name a few columns of each table, in the order of its one column list (schemas/columns.py)."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from tokenaudit.schemas import columns

ROLLUP_COLUMNS = columns.subset(
    columns.USAGE_ROLLUP,
    "client_id",
    "department",
    "model",
    "window_start",
    "window_end",
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "latency_ms_sum",
    "latency_ms_max",
    "max_input_tokens",
    "truncated",
    "version",
)
CLIENTS = {"acme-web": "sales", "acme-batch": "research", "beta-app": "sales", "gamma-bot": "support"}
MODELS = ["t5-tiny", "gpt2-tiny"]


def rollup_rows(now: datetime, windows: int = 30, seed: int = 7) -> list[list]:
    """One row per (client, model, minute) over the last ``windows`` minutes (final versions)."""
    rng = random.Random(seed)
    rows = []
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=windows + 1)
    for client, dept in CLIENTS.items():
        for model in MODELS:
            for w in range(windows):
                ws = start + timedelta(minutes=w)
                req = rng.randint(1, 20)
                inp, out = rng.randint(10, 900) * req, rng.randint(5, 300) * req
                rows.append(
                    [
                        client,
                        dept,
                        model,
                        ws,
                        ws + timedelta(minutes=1),
                        req,
                        rng.randint(0, 1),
                        inp,
                        out,
                        inp + out,
                        12.5 * req,
                        40.0,
                        900,
                        0,
                        2,
                    ]
                )
    return rows


def superseded(rows: list[list]) -> list[list]:
    """Earlier, wrong versions of some windows (version 1): FINAL must drop them."""
    out = []
    for row in rows[::5]:
        old = list(row)
        old[5] += 100
        old[7] += 99_999
        old[9] += 99_999
        old[-1] = 1
        out.append(old)
    return out


def seed_rollups(store, now: datetime, windows: int = 30) -> list[list]:
    rows = rollup_rows(now, windows)
    columns = ROLLUP_COLUMNS
    if store.query(
        "SELECT count() AS n FROM system.columns WHERE database = {d:String} AND table = 'usage_rollup' "
        "AND name = 'api_key_id'",
        {"d": store.database},
    )[0]["n"]:
        # a window is (client, department, api key, model, start) since migration 0011: each
        # client's rows come from one key (the rows keep their shape: totals index them)
        columns = ROLLUP_COLUMNS + ["api_key_id"]

        def keyed(rs):
            return [r + [f"key-{r[0]}"] for r in rs]
    else:  # seeding a store migrated only up to an older version (migration tests)

        def keyed(rs):
            return rs

    store.insert("usage_rollup", keyed(superseded(rows)), columns)
    store.insert("usage_rollup", keyed(rows), columns)
    store.insert("usage_rollup", keyed(rows[: len(rows) // 2]), columns)  # a replay of half of them
    return rows


def totals(rows: list[list], key_index: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        t = out[r[key_index]]
        t["requests"] += r[5]
        t["errors"] += r[6]
        t["input_tokens"] += r[7]
        t["output_tokens"] += r[8]
        t["total_tokens"] += r[9]
    return {k: dict(v) for k, v in out.items()}


SAMPLED_COLUMNS = columns.subset(
    columns.USAGE_SAMPLED,
    "request_id",
    "ts",
    "client_id",
    "department",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "latency_ms",
    "status_code",
    "sample_reason",
)


def seed_sampled(store, now: datetime) -> list[list]:
    """Requests whose latency grows with input length: 10 ms + 0.1 ms per input token."""
    rows = []
    for i, inp in enumerate([5, 10, 16, 20, 30, 60, 100, 120, 250, 500, 1000, 1500, 2000] * 3):
        rows.append(
            [
                f"r{i}",
                now - timedelta(minutes=5, seconds=i),
                "acme-web" if i % 2 else "beta-app",
                CLIENTS["acme-web" if i % 2 else "beta-app"],
                "t5-tiny",
                inp,
                8,
                inp + 8,
                10.0 + 0.1 * inp,
                200,
                "top",
            ]
        )
    rows.append(["err", now - timedelta(minutes=4), "acme-web", "sales", "t5-tiny", 40, 0, 40, 9999.0, 500, "top"])
    store.insert("usage_sampled", rows, SAMPLED_COLUMNS)
    store.insert("usage_sampled", rows[:5], SAMPLED_COLUMNS)  # replayed
    return rows


ANOMALY_COLUMNS = list(columns.ANOMALIES)


def seed_anomalies(store, now: datetime) -> list[list]:
    rows = [
        [
            "a1",
            now - timedelta(minutes=30),
            "acme-web",
            "sales",
            "t5-tiny",
            "input_tokens",
            "warning",
            4096.0,
            2048.0,
            None,
            "req-1",
            "oversized prompt",
        ],
        [
            "a2",
            now - timedelta(minutes=10),
            "beta-app",
            "sales",
            "t5-tiny",
            "spike",
            "critical",
            90000.0,
            12000.0,
            now - timedelta(minutes=11),
            None,
            "volume spike",
        ],
        [
            "a3",
            now - timedelta(days=3),
            "acme-web",
            "sales",
            "t5-tiny",
            "error_rate",
            "warning",
            0.8,
            0.5,
            now - timedelta(days=3, minutes=1),
            None,
            "errors",
        ],
    ]
    store.insert("anomalies", rows, ANOMALY_COLUMNS)
    store.insert("anomalies", rows, ANOMALY_COLUMNS)  # replayed
    return rows


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
