"""``tokenaudit sink``: the sink loop in a thread, an HTTP listener in the main thread.

The listener serves ``GET /healthz`` (answering means the store is open and migrated and the
consumer is subscribed: the readiness check) and ``GET /metrics`` (the sink's counters,
:mod:`tokenaudit.sinks.metrics`), on ``usage_api_host:sink_port``. For the embedded store only
one process may open the chDB directory, so the process that writes is also where queries
are answered: given ``api`` (the usage API over the sink's :class:`Store`, composed by the
CLI: the read side is not the sink's to import), the listener is the usage API's, on
``usage_api_host:usage_api_port``, with ``/metrics`` added.

SIGTERM/SIGINT: the listener stops, the sink inserts its batch, commits, and the process exits
0; while ClickHouse is unreachable it retries that batch for at most ``sink_shutdown_seconds``
and exits without committing it (it is read again at the next start).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tokenaudit.infra.store import Store

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

log = logging.getLogger("tokenaudit.sink")


#: The sink holds a batch of up to ``sink_ledger_batch_rows`` acyclic rows and allocates a dict
#: and a tuple per event; with the default thresholds the cyclic GC kept walking the batch (the
#: worker's reasoning and figures, streams/app.py). Rarer collections: bench/bench_ledger.py
#: measured the sink path ~1.4x as fast, side by side in one run.
GC_THRESHOLDS = (50_000, 20, 1000)


async def _healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def run_sink(settings: Settings, api: Callable[[Store], Starlette] | None = None) -> int:
    """Run until SIGTERM/SIGINT; the exit code (1 if the sink loop failed)."""
    import uvicorn

    from tokenaudit.infra.schema_registry import prepare
    from tokenaudit.infra.topics import ensure_declared
    from tokenaudit.sinks.metrics import metrics_route
    from tokenaudit.sinks.sink import Sink

    ensure_declared(settings)  # the topics it reads and dead-letters to, as declared, before subscribing
    prepare(settings)  # registry ids, so Confluent-framed records resolve
    store = Store.from_settings(settings)
    sink = Sink(settings, store)
    gc.set_threshold(*GC_THRESHOLDS)
    stop = threading.Event()
    failed: list[BaseException] = []
    if api is not None:
        app, port = api(store), settings.usage_api_port
    else:
        app, port = Starlette(routes=[Route("/healthz", _healthz)]), settings.sink_port
    app.router.routes.append(metrics_route(sink))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.usage_api_host,
            port=port,
            log_level="warning",
            lifespan="off",
            # the usage API's open dashboard streams never end by themselves: cancel them
            timeout_graceful_shutdown=settings.usage_api_shutdown_seconds,
        )
    )

    def loop() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:  # surface it: the process must not serve stale data silently
            log.exception("sink loop failed")
            failed.append(exc)
        finally:
            server.should_exit = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        server.should_exit = True

    # uvicorn re-raises the signal after its shutdown; our handler turns that into a stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=loop, name="sink", daemon=True)
    thread.start()
    builder = threading.Thread(target=_build_daily, args=(settings, store, stop), name="daily-rollup", daemon=True)
    if settings.daily_rollup_seconds > 0:
        builder.start()
    if not sink.ready.wait(30):
        raise RuntimeError("sink consumer did not start")
    try:
        server.run()
    finally:
        stop.set()
        thread.join(60)
        if builder.is_alive():  # a round in progress ends before the store closes
            builder.join(60)
        store.close()
    c = sink.counters
    log.warning(
        "sink stopped: %d messages, %d rollup rows, %d sampled, %d anomalies, %d batches",
        c.messages,
        c.inserted_rollups,
        c.inserted_sampled,
        c.inserted_anomalies,
        c.batches,
    )
    return 1 if failed else 0


def _build_daily(settings: Settings, store: Store, stop: threading.Event) -> None:
    """Keep the daily pre-aggregate current (infra/daily_rollup.py) until the sink stops; a
    failed round is logged and retried next time: readers fall back to the windows meanwhile."""
    from tokenaudit.infra.daily_rollup import DailyBuilder, settle_seconds

    builder = DailyBuilder(store, settle_seconds(settings), quiet_seconds=settings.daily_rollup_seconds)
    while not stop.wait(settings.daily_rollup_seconds):
        try:
            builder.run_once()
        except Exception:
            log.exception("daily rollup build failed; reports read the windows until it succeeds")
