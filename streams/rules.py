"""The anomaly rules: per window (token spike against the client's baseline, error-rate burst,
latency per input token against the model's norm, a never-seen client's volume, truncated
inputs when switched on) and per request (input tokens the client sent over a threshold). Anomalies are built by the contract's one builder
(:func:`tokenaudit.schemas.records.anomaly`); their ids are fixed by (rule, window), so a
replay re-emits the same anomaly, never a new one.

The baseline (``C_*`` slots of the client's state value) is an EWMA of tokens per window,
updated once per window, when it closes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tokenaudit.schemas import records
from tokenaudit.streams.outputs import Counters
from tokenaudit.streams.state import State
from tokenaudit.streams.state_keys import client_key
from tokenaudit.streams.window_state import C_FIRST, C_LAST, C_MEAN, C_N, C_VAR, Window

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

EWMA_ALPHA = 0.1  # after warm-up; before it, 1/(n+1) (the running mean and variance)


def sent_input_tokens(ev: Mapping[str, Any]) -> int:
    """The input tokens the client sent: the untruncated length, or the fed count when a
    producer left the untruncated one below it (never less than what the model consumed)."""
    fed: int = ev["input_tokens"]
    untruncated: int = ev["untruncated_input_tokens"]
    return untruncated if untruncated > fed else fed


class Rules:
    def __init__(self, settings: Settings, state: State, window_ms: int, counters: Counters) -> None:
        self.state = state
        self.window_ms = window_ms
        self.counters = counters
        # settings read per event, hoisted (pydantic attribute access is not free)
        self.input_threshold = settings.anomaly_input_tokens
        self.spike_min_history = settings.anomaly_spike_min_history
        self.spike_floor = float(settings.anomaly_spike_floor_tokens)
        self.spike_k = settings.anomaly_spike_k
        self.error_min_requests = settings.anomaly_error_min_requests
        self.error_rate = settings.anomaly_error_rate
        self.latency_min_requests = settings.anomaly_latency_min_requests
        self.latency_factor = settings.anomaly_latency_factor
        self.new_client_tokens = settings.anomaly_new_client_tokens
        self.truncated_requests = settings.anomaly_truncated_requests

    def anomaly(
        self,
        rule: str,
        client: str,
        dept: str,
        model: str,
        ws: int,
        observed: float,
        thr: float,
        message: str,
        request_id: str | None = None,
        ts: int | None = None,
        api_key_id: str = "",
    ) -> records.Anomaly:
        self.counters.anomalies += 1
        return records.anomaly(
            rule,
            client,
            dept,
            model,
            ws,
            observed,
            thr,
            message,
            ts if ts is not None else ws + self.window_ms,
            request_id,
            api_key_id,
        )

    def window(
        self,
        client: str,
        dept: str,
        akey: str,
        model: str,
        ws: int,
        w: Window,
        closing: bool,
        anomalies: list[records.Anomaly],
    ) -> None:
        """The window rules on ``w`` (appended to ``anomalies``); ``closing``: the window closes
        now, so it also moves its client's baseline (once per window)."""
        ckey = client_key(client)
        c = self.state.data.get(ckey)
        tokens = w.total_tokens
        if c is not None and c[C_N] >= self.spike_min_history:
            sigma = max(math.sqrt(max(c[C_VAR], 0.0)), 0.1 * c[C_MEAN], 1.0)
            thr = max(self.spike_floor, c[C_MEAN] + self.spike_k * sigma)
            if tokens > thr:
                anomalies.append(
                    self.anomaly(
                        "token_spike",
                        client,
                        dept,
                        model,
                        ws,
                        tokens,
                        thr,
                        f"{tokens} tokens in the window vs a baseline of {c[C_MEAN]:.0f} (band {thr:.0f})",
                        api_key_id=akey,
                    )
                )
        if w.requests >= self.error_min_requests and w.errors / w.requests >= self.error_rate:
            rate = w.errors / w.requests
            anomalies.append(
                self.anomaly(
                    "error_rate",
                    client,
                    dept,
                    model,
                    ws,
                    rate,
                    self.error_rate,
                    f"{w.errors} of {w.requests} requests failed ({rate:.0%})",
                    api_key_id=akey,
                )
            )
        if (
            w.norm_count is not None
            and w.norm_input is not None
            and w.norm_latency is not None  # the three are None together (a window from before norms)
            and w.norm_count >= self.latency_min_requests
            and w.norm_input > 0
            and w.input_tokens > 0
            and w.requests >= 3
        ):
            model_ratio = w.norm_latency / w.norm_input
            ratio = w.latency_ms_sum / w.input_tokens
            if ratio > self.latency_factor * model_ratio:
                anomalies.append(
                    self.anomaly(
                        "latency_per_token",
                        client,
                        dept,
                        model,
                        ws,
                        ratio,
                        model_ratio,
                        f"{ratio:.3f} ms per input token vs {model_ratio:.3f} for {model}",
                        api_key_id=akey,
                    )
                )
        if c is not None and c[C_N] == 0 and c[C_FIRST] == ws and tokens >= self.new_client_tokens:
            anomalies.append(
                self.anomaly(
                    "new_client_volume",
                    client,
                    dept,
                    model,
                    ws,
                    tokens,
                    self.new_client_tokens,
                    f"never-seen client used {tokens} tokens in its first window",
                    api_key_id=akey,
                )
            )
        if self.truncated_requests and w.truncated >= self.truncated_requests:
            anomalies.append(
                self.anomaly(
                    "truncated_inputs",
                    client,
                    dept,
                    model,
                    ws,
                    w.truncated,
                    self.truncated_requests,
                    f"{w.truncated} of {w.requests} requests were truncated to the model's input limit",
                    api_key_id=akey,
                )
            )
        if closing and c is not None and ws > c[C_LAST]:
            if c[C_N] == 0:
                c[C_MEAN], c[C_VAR] = float(tokens), 0.0
            else:
                alpha = max(EWMA_ALPHA, 1.0 / (c[C_N] + 1))
                diff = tokens - c[C_MEAN]
                c[C_MEAN] += alpha * diff
                c[C_VAR] = (1 - alpha) * (c[C_VAR] + alpha * diff * diff)
            c[C_N] += 1
            c[C_LAST] = ws
            self.state.touch(ckey)

    def request(
        self,
        ev: records.TokenUsageEvent,
        w: Window | None,
        ws: int,
        offset: int,
        touch: Callable[[], None],
        anomalies: list[records.Anomaly],
    ) -> bool:
        """The input-token rule on one request: fires once per window (at the first offset
        over the threshold, so a replay fires it again for that event only). True if it fired.

        It reads what the client sent (:func:`sent_input_tokens`), not what the model was fed:
        inputs are truncated to ``max_input_tokens`` (512 by default), so a rule on the fed count
        could never reach a threshold above it."""
        sent = sent_input_tokens(ev)
        if sent > self.input_threshold and (w is None or w.fired_at in (-1, offset)):
            if w is not None and w.fired_at == -1:
                w.fired_at = offset
                touch()
            obs, thr = sent, self.input_threshold
            fed = ev["input_tokens"]
            cut = f", truncated to {fed} for the model" if fed < sent else ""
            anomalies.append(
                self.anomaly(
                    "input_tokens",
                    ev["client_id"],
                    ev["department"],
                    ev["model"],
                    ws,
                    obs,
                    thr,
                    f"request {ev['request_id']} sent {obs} input tokens (threshold {thr}){cut}",
                    request_id=ev["request_id"],
                    ts=ev["ts"],
                    api_key_id=ev["api_key_id"] or "",
                )
            )
            return True
        return False
