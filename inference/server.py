"""`tokenaudit serve`: the app on uvicorn in the foreground.

uvicorn turns SIGTERM/SIGINT into a graceful shutdown: it stops accepting, lets in-flight
requests finish (each still gets its event), then runs the app's lifespan shutdown, which
flushes the producer within ``shutdown_flush_seconds`` and spools the rest.
"""

from __future__ import annotations

import logging
import sys

from tokenaudit.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def serve(settings: Settings, log_level: str = "info") -> None:
    import uvicorn

    from tokenaudit.inference.app import create_app

    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=30,
        log_config=None,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # uvicorn returns normally when start-up failed (a held spool lock, a
        sys.exit(3)  # busy port): a supervisor must see a failure, not a clean exit
