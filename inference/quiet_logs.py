"""Logs that stay readable during an outage: a broker that is down or a disk that is full
repeats the same complaint many times a second, and the log must not drown in it."""

from __future__ import annotations

import logging
import time

LOG_EVERY_SECONDS = 10.0


class Quieter(logging.Filter):
    """librdkafka repeats "connection refused" several times a second while the broker is down;
    let each distinct message through once per ``every`` seconds."""

    def __init__(self, every: float = 30.0):
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        key = text.split("]: ", 1)[-1]
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


def librdkafka_logger() -> logging.Logger:
    logger = logging.getLogger("tokenaudit.inference.librdkafka")
    if not any(isinstance(f, Quieter) for f in logger.filters):
        logger.addFilter(Quieter())
    return logger


class RateLimitedLog:
    """One line per reason per ``LOG_EVERY_SECONDS``: a disk-full or queue-full storm must not
    flood the log (or the disk)."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger
        self._last: dict[str, float] = {}

    def __call__(self, reason: str, level: int, msg: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._last[reason] = now
            self._logger.log(level, msg, *args, exc_info=exc_info)
