"""Typed worker state: a window's totals and bookkeeping as an object with named slots, and
the named slots of the other state values (meta, client baseline, latency norm).

Why a class with ``__slots__`` (and not the 17-slot list indexed by constants it replaced):
the names say what each number is, and attribute access on slots costs what list indexing
cost (measured on bench_stream_throughput.py, see the README). The changelog keeps the list:
:meth:`Window.as_list` writes exactly the JSON list the previous release wrote (byte for byte:
tests/test_window_state.py; since issue 15 with the latency histogram appended as an 18th slot),
and :meth:`Window.from_list` reads it back, including the shorter lists of older releases (13
slots before the latency norm, 16 before ``first_offset``, 17 before the histogram).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenaudit.schemas.records import TokenUsageEvent

from tokenaudit.schemas import latency_hist


class Window:
    """One (client, department, api key, model, window start) window of a source partition.

    ``closed_at``: -1 while open, else the source offset at which the window was closed (and
    its rollup emitted). ``fired_at``: the offset of the event that fired the window's
    per-request input-token rule (-1: none yet). ``norm_*``: the model's latency norm (per
    source partition) as of this window's last applied event, so the latency rule gives the
    same answer however batches were cut; None in a window from before norms were kept.
    ``first_offset``: the offset of the event that opened the window (unique per partition:
    it names the window in id chunks); None in a window from before it was kept."""

    __slots__ = (
        "applied_offset",
        "closed_at",
        "department",
        "errors",
        "fired_at",
        "first_offset",
        "hist",
        "input_tokens",
        "latency_ms_max",
        "latency_ms_sum",
        "max_input_tokens",
        "norm_count",
        "norm_input",
        "norm_latency",
        "output_tokens",
        "requests",
        "total_tokens",
        "truncated",
    )

    def __init__(self, department: str, first_offset: int | None) -> None:
        self.department = department
        self.requests = self.errors = self.input_tokens = self.output_tokens = self.total_tokens = 0
        self.latency_ms_sum = self.latency_ms_max = 0.0
        self.max_input_tokens = self.truncated = 0
        self.applied_offset = self.closed_at = self.fired_at = -1
        self.norm_latency: float | None = 0.0
        self.norm_input: int | None = 0
        self.norm_count: int | None = 0
        self.first_offset = first_offset
        self.hist: dict[int, int] = {}  # latency histogram cell -> requests (schemas/latency_hist.py)

    @classmethod
    def one_event(cls, department: str, ev: TokenUsageEvent, offset: int) -> Window:
        """The totals of one event alone (a late event's delta)."""
        w = cls(department, None)
        w.requests, w.errors = 1, int(ev["status_code"] >= 400)
        w.input_tokens, w.output_tokens, w.total_tokens = ev["input_tokens"], ev["output_tokens"], ev["total_tokens"]
        w.latency_ms_sum = w.latency_ms_max = ev["latency_ms"]
        w.max_input_tokens, w.truncated = ev["input_tokens"], int(bool(ev["truncated"]))
        w.applied_offset = offset
        w.hist = {latency_hist.cell(ev["input_tokens"], ev["latency_ms"]): 1}
        return w

    @property
    def is_open(self) -> bool:
        return self.closed_at < 0

    def as_list(self) -> list[Any]:
        """The changelog value: the list layout of every release so far. One list display for
        the current layout (~0.1 us; it runs for every window written, about once per event
        when nearly every event opens a window), the shorter layouts of older releases after it."""
        if self.first_offset is not None:
            return [
                self.department,
                self.requests,
                self.errors,
                self.input_tokens,
                self.output_tokens,
                self.total_tokens,
                self.latency_ms_sum,
                self.latency_ms_max,
                self.max_input_tokens,
                self.truncated,
                self.applied_offset,
                self.closed_at,
                self.fired_at,
                self.norm_latency,
                self.norm_input,
                self.norm_count,
                self.first_offset,
                [x for item in self.hist.items() for x in item],  # flat: cell, count, cell, count...
            ]
        out = [
            self.department,
            self.requests,
            self.errors,
            self.input_tokens,
            self.output_tokens,
            self.total_tokens,
            self.latency_ms_sum,
            self.latency_ms_max,
            self.max_input_tokens,
            self.truncated,
            self.applied_offset,
            self.closed_at,
            self.fired_at,
        ]
        if self.norm_count is not None:
            out += (self.norm_latency, self.norm_input, self.norm_count)
        return out

    @classmethod
    def from_list(cls, value: list[Any]) -> Window:
        w = cls.__new__(cls)
        (
            w.department,
            w.requests,
            w.errors,
            w.input_tokens,
            w.output_tokens,
            w.total_tokens,
            w.latency_ms_sum,
            w.latency_ms_max,
            w.max_input_tokens,
            w.truncated,
            w.applied_offset,
            w.closed_at,
            w.fired_at,
        ) = value[:13]
        w.norm_latency, w.norm_input, w.norm_count = value[13:16] if len(value) >= 16 else (None, None, None)
        w.first_offset = value[16] if len(value) > 16 else None
        # before the histogram (0.2.0 and older): none, so the window's rollup is not covered
        # (its histogram counts fewer requests than the window) and never guessed
        flat = value[17] if len(value) > 17 else ()
        w.hist = dict(zip(flat[::2], flat[1::2]))
        return w

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Window) and self.as_list() == other.as_list()

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, so not hashable

    def __repr__(self) -> str:
        return f"Window({self.as_list()!r})"


# Slots of the other state values (JSON lists, small and fast to copy; written as they are).
# meta (the partition's record, written last in each batch): watermark ms, last processed
# offset, copies dropped (ever, on this partition), offsets dead-lettered for clock skew that
# are not committed yet (so a replay decides the same whatever the clock says then)
M_WM, M_LAST, M_DUPS, M_SKEWED = range(4)
# client baseline: windows seen, EWMA mean and variance of tokens per window, last closed
# window_start, first window_start
C_N, C_MEAN, C_VAR, C_LAST, C_FIRST = range(5)
# a model's latency norm per partition: latency sum, input tokens, requests, last offset
N_LATENCY, N_INPUT, N_COUNT, N_OFFSET = range(4)


def state_value_for_changelog(value: Any) -> Any:
    """What the changelog stores for a state value (windows as their lists, the rest as is)."""
    return value.as_list() if value.__class__ is Window else value
