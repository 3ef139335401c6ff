"""`tokenaudit demo`: the whole pipeline end to end on embedded defaults.

Starts everything (`up`), sends realistic traffic through the HTTP API from several API keys
in several departments — steady clients, one that sends oversized prompts, one that suddenly
multiplies its volume, one never seen before that arrives with a burst — waits until every
request is accounted for in ClickHouse, prints the usage table, top clients, the cost report
and the anomalies, then runs `down`.

The demo shortens the windows (5 s) and scales the volume thresholds (spike, new client) to
its few requests, so the whole story fits in about two minutes; variables the user set are left
alone. The input-token rule keeps its default (2048): it reads the length the client sent, so
dave-docs' documents (about 3,000 tokens, truncated to 512 for the model) fire it as they would
in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

DEMO_OVERRIDES = {
    "TOKENAUDIT_WINDOW_SECONDS": "5",
    "TOKENAUDIT_GRACE_SECONDS": "1",
    "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "3",
    "TOKENAUDIT_ANOMALY_SPIKE_FLOOR_TOKENS": "1000",
    "TOKENAUDIT_ANOMALY_SPIKE_MIN_HISTORY": "4",
    "TOKENAUDIT_ANOMALY_NEW_CLIENT_TOKENS": "1500",
}

WORDS = [
    "the",
    "model",
    "answers",
    "questions",
    "about",
    "invoices",
    "shipping",
    "orders",
    "refunds",
    "weather",
    "travel",
    "code",
    "reviews",
    "database",
    "latency",
    "budget",
    "quarterly",
    "report",
    "summary",
    "translate",
    "explain",
    "customer",
    "support",
    "ticket",
    "please",
    "short",
    "detailed",
    "list",
    "steps",
    "why",
    "how",
    "when",
    "where",
    "compare",
    "contrast",
    "risks",
    "benefits",
]


@dataclass(frozen=True)
class DemoClient:
    client_id: str
    department: str
    rate: float  # requests per second in the steady phase
    spike_rate: float  # requests per second in the spike phase
    prompt_words: tuple[int, int]
    oversized_every: int = 0  # every n-th request carries a prompt far beyond the model's input limit


CLIENTS = [
    DemoClient("alice-assistant", "research", 1.6, 1.6, (8, 40)),
    DemoClient("bob-batch", "research", 0.8, 0.8, (10, 40)),
    DemoClient("carol-chat", "support", 1.2, 1.2, (5, 25)),
    DemoClient("dave-docs", "finance", 0.6, 0.6, (30, 80), oversized_every=4),
    DemoClient("eve-campaigns", "marketing", 0.8, 10.0, (10, 30)),  # multiplies its volume
    DemoClient("frank-newbot", "operations", 0.0, 5.0, (60, 120)),  # never seen before, arrives big
]


def apply_overrides() -> dict[str, str]:
    applied = {}
    for name, value in DEMO_OVERRIDES.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return applied


def demo_keys(settings, echo: Callable[[str], None]) -> dict[str, str]:
    """One API key per demo client, created once and reused (kept in <data_dir>/demo_keys.json)."""
    from tokenaudit.infra.keys import KeyRegistry, KeyRegistryError, add_key

    registry = settings.default_api_keys_file
    store = settings.data_dir / "demo_keys.json"
    keys: dict[str, str] = {}
    if store.exists() and registry.exists():
        try:
            known = KeyRegistry.load(registry)
            keys = {c: k for c, k in json.loads(store.read_text()).items() if known.lookup(k) is not None}
        except (ValueError, KeyRegistryError):
            keys = {}
    for c in CLIENTS:
        if c.client_id not in keys:
            keys[c.client_id] = add_key(registry, c.client_id, c.department)
    fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh)
    echo(f"api keys   {len(keys)} demo clients in {len({c.department for c in CLIENTS})} departments ({registry})")
    return keys


def prompt(rng: random.Random, words: tuple[int, int], oversized: bool) -> str:
    n = rng.randint(2600, 3200) if oversized else rng.randint(*words)  # over the default 2048 tokens
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "?"


async def send_traffic(
    base_url: str, keys: dict[str, str], steady_s: float, spike_s: float, echo: Callable[[str], None]
) -> tuple[Counter, Counter]:
    """Open-loop traffic: each client sends at its rate whatever the latency (like real users)."""
    sent: Counter = Counter()
    failed: Counter = Counter()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        tasks: set[asyncio.Task] = set()

        async def one(c: DemoClient, body: dict) -> None:
            try:
                r = await http.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {keys[c.client_id]}"})
                if r.status_code != 200:
                    failed[c.client_id] += 1
            except httpx.HTTPError:
                failed[c.client_id] += 1

        async def client_loop(c: DemoClient, seed: int) -> None:
            rng = random.Random(seed)  # noqa: S311 (the demo's traffic shape, not a secret)
            start = time.monotonic()
            n = 0
            while (elapsed := time.monotonic() - start) < steady_s + spike_s:
                rate = c.rate if elapsed < steady_s else c.spike_rate
                if rate <= 0:
                    await asyncio.sleep(min(1.0, steady_s - elapsed + 0.01))
                    continue
                n += 1
                oversized = bool(c.oversized_every) and n % c.oversized_every == 0
                body = {"prompt": prompt(rng, c.prompt_words, oversized), "max_new_tokens": rng.randint(4, 16)}
                sent[c.client_id] += 1
                task = asyncio.create_task(one(c, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(rng.expovariate(rate))

        async def progress() -> None:
            t0 = time.monotonic()
            while True:
                await asyncio.sleep(10)
                phase = "steady" if time.monotonic() - t0 < steady_s else "spike"
                echo(f"traffic    {int(time.monotonic() - t0)}s ({phase}): {sum(sent.values())} requests sent")

        ticker = asyncio.create_task(progress())
        await asyncio.gather(*(client_loop(c, i) for i, c in enumerate(CLIENTS)))
        ticker.cancel()
        if tasks:
            await asyncio.gather(*tasks)
    return sent, failed


def wait_accounted(settings, since: str, sent: Counter, timeout: float, echo) -> dict[str, int]:
    """Poll the usage reports until every sent request is in usage_rollup (exactly)."""
    from tokenaudit.errors import UsageApiError
    from tokenaudit.reports.usage_client import open_reports

    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            rows = open_reports(settings).fetch("usage", {"since": since, "by": "client"})
            seen = {r["client_id"]: int(r["requests"]) for r in rows}
        except UsageApiError:
            pass
        if all(seen.get(c, 0) >= n for c, n in sent.items()):
            return seen
        time.sleep(1.0)
    missing = {c: n - seen.get(c, 0) for c, n in sent.items() if seen.get(c, 0) < n}
    echo(f"warning: not all requests reached ClickHouse within {timeout:.0f}s: missing {missing}")
    return seen


def show(title: str, args: list[str], echo) -> None:
    echo(f"\n=== {title}  (tokenaudit {' '.join(args)})")
    out = subprocess.run([sys.executable, "-m", "tokenaudit.cli", *args], check=False, capture_output=True, text=True)
    echo((out.stdout + out.stderr).rstrip())


def run_demo(
    echo: Callable[[str], None] = print, steady_s: float = 40.0, spike_s: float = 15.0, keep_running: bool = False
) -> int:
    from tokenaudit.infra.services import Supervisor
    from tokenaudit.settings import get_settings

    applied = apply_overrides()
    get_settings.cache_clear()
    settings = get_settings()
    supervisor = Supervisor(settings, echo=echo)
    if applied:
        echo("demo settings: " + ", ".join(f"{k.removeprefix('TOKENAUDIT_').lower()}={v}" for k, v in applied.items()))
    if any(supervisor.pid(name) for name in ("sink", "worker", "inference")):
        echo("note: services are already running; they keep the settings they were started with")
    t0 = time.monotonic()
    endpoints = supervisor.up()
    echo(
        f"pipeline up in {time.monotonic() - t0:.0f}s: inference {endpoints['inference']}, "
        f"usage API {endpoints['usage_api']}"
    )
    try:
        keys = demo_keys(settings, echo)
        # Rollups are per window: start the report range at the boundary of the first window.
        now = int(time.time())
        since = datetime.fromtimestamp(now - now % settings.window_seconds, UTC).isoformat()
        echo(
            f"traffic    {len(CLIENTS)} clients for {steady_s + spike_s:.0f}s "
            f"(eve-campaigns x10 and a new client after {steady_s:.0f}s; dave-docs sends oversized prompts)"
        )
        sent, failed = asyncio.run(send_traffic(endpoints["inference"], keys, steady_s, spike_s, echo))
        echo(f"traffic    done: {sum(sent.values())} requests, {sum(failed.values())} non-200")
        echo("waiting    until every request is in ClickHouse (windows close on event time or idle timeout)")
        seen = wait_accounted(settings, since, sent, timeout=180, echo=echo)
        exact = all(seen.get(c) == n for c, n in sent.items())
        echo(
            f"accounted  {sum(seen.get(c, 0) for c in sent)} of {sum(sent.values())} requests "
            f"({'exact per client' if exact else 'MISMATCH'})"
        )
        time.sleep(2)  # anomalies travel on their own topic; give the sink one more batch
        prices = settings.data_dir / "demo-prices.toml"
        prices.write_text('currency = "USD"\n\n[models."t5-tiny"]\ninput_per_1k = "0.50"\noutput_per_1k = "1.50"\n')
        month = datetime.now(UTC).strftime("%Y-%m")
        show("usage by client", ["usage", "--since", since, "--by", "client"], echo)
        show("usage by department", ["usage", "--since", since, "--by", "department"], echo)
        show("top clients", ["top", "--since", since, "--limit", "5"], echo)
        show(f"cost report {month}", ["report", "--month", month, "--prices", str(prices)], echo)
        show("latency by input-token bucket", ["latency", "--since", since], echo)
        show("anomalies", ["anomalies", "--since", since], echo)
        return 0 if exact else 1
    finally:
        if not keep_running:
            echo("")
            stopped = supervisor.down()
            echo(f"down: stopped {', '.join(stopped)}")
