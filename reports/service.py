"""``tokenaudit api``: the read-only usage API alone, in the foreground.

For a ClickHouse server (``http(s)://`` DSN), where the API need not live beside the writer.
For the embedded store one process owns the chDB directory, so the supervisor runs the API
inside the sink process instead (``tokenaudit sink``, :mod:`tokenaudit.infra.services`); run
alone against an embedded store, this process opens the store itself (and a sink cannot).

The schema is not migrated here (the API only reads; ``db migrate`` or the sink migrate).
SIGTERM/SIGINT: uvicorn finishes the requests in flight and the store is closed; exit 0.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

log = logging.getLogger("tokenaudit.api")


def run_api(settings: Settings) -> int:
    import uvicorn

    from tokenaudit.infra.store import Store
    from tokenaudit.reports.usage_api import create_app

    store = Store.from_settings(settings, migrate_schema=False)
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(store, settings),
                host=settings.usage_api_host,
                port=settings.usage_api_port,
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=settings.usage_api_shutdown_seconds,  # dashboards' live streams
            )
        )

        def on_signal(signum: int, frame: FrameType | None) -> None:
            server.should_exit = True

        # uvicorn re-raises the signal after its graceful shutdown; this handler takes it then
        # (a stop already under way), so SIGTERM ends the process with 0, as the sink's does
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.run()
        return 0 if server.started else 3  # a busy port: the supervisor must see a failure
    finally:
        store.close()
