"""POST anomalies to a webhook as JSON, retrying with exponential backoff until delivered.

Delivery is at least once: the follower commits an anomaly's Kafka offset only after this
returns, so an endpoint that is down for a while (or a forwarder that is restarted) delays
anomalies but loses none. Receivers deduplicate on ``anomaly_id`` (also sent as the
``Idempotency-Key`` header). Retried: connection errors, timeouts, 408, 429 and 5xx; any
other 4xx means the endpoint rejects the payload, so retrying cannot help:
:class:`WebhookRejected` is raised and the offset stays uncommitted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from tokenaudit.errors import WebhookError, WebhookRejected
from tokenaudit.reports.report_sql import jsonable

log = logging.getLogger(__name__)


class _Retryable(Exception):
    pass


def validate_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise WebhookError(f"--webhook: expected an http(s)://host[:port]/path URL, got {url!r}")
    return url


def anomaly_json(anomaly: dict[str, Any]) -> dict[str, Any]:
    """A decoded anomaly with times as ISO 8601 UTC strings (the webhook and --format json body)."""
    return jsonable([anomaly])[0]


class WebhookForwarder:
    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        backoff_max: float = 30.0,
        give_up_after: float | None = None,
        on_retry: Callable[[int, str], None] | None = None,
    ) -> None:
        self.url = validate_url(url)
        self.http = httpx.Client(timeout=timeout)
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.on_retry = on_retry

    def deliver(self, anomaly: dict[str, Any]) -> int:
        """POST one anomaly; returns the number of attempts it took."""
        body = json.dumps(anomaly_json(anomaly)).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": str(anomaly.get("anomaly_id", ""))}
        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            wait=wait_exponential_jitter(multiplier=0.2, max=self.backoff_max, jitter=min(1.0, self.backoff_max)),
            stop=stop_after_delay(self.give_up_after) if self.give_up_after else stop_never,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:  # the loop ends after the first attempt that did not raise
                with attempt:
                    self._post(body, headers)
        except _Retryable as exc:
            raise WebhookError(f"webhook {self.url}: gave up after {self.give_up_after}s: {exc}") from None
        attempts: int = retrying.statistics["attempt_number"]  # tenacity's statistics are an untyped dict
        return attempts

    def _post(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            response = self.http.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise _Retryable(f"{exc.__class__.__name__}: {exc}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}")
        raise WebhookRejected(f"webhook {self.url} rejected the anomaly: HTTP {status} {response.text[:200]!r}")

    def _before_sleep(self, state: RetryCallState) -> None:
        reason = str(state.outcome.exception()) if state.outcome is not None else "no outcome"
        log.warning("webhook %s: attempt %d failed (%s); retrying", self.url, state.attempt_number, reason)
        if self.on_retry:
            self.on_retry(state.attempt_number, reason)

    def close(self) -> None:
        self.http.close()
