"""Top-fraction sampling from a streaming quantile sketch (Apache DataSketches KLL).

A request is kept when its total_tokens lies in the top ``fraction`` of its model's
distribution so far. The KLL sketch keeps memory bounded (a few KB per model) with a known
rank error (about 0.8% at k=400). Ties: when the cut falls inside a run of equal values
(rank(<v) < 1-f < rank(<=v)), only the needed share of that run is kept, chosen by a hash
of the request id, so the kept share holds even when most requests have the same count,
and a replay makes the same choice.
"""

from __future__ import annotations

import base64
import hashlib

from datasketches import kll_floats_sketch

from tokenaudit.streams.state import State
from tokenaudit.streams.state_keys import sketch_key

SKETCH_K = 400


def new_sketch() -> kll_floats_sketch:
    return kll_floats_sketch(SKETCH_K)


def dump_sketch(sketch: kll_floats_sketch) -> str:
    return base64.b64encode(sketch.serialize()).decode("ascii")


def load_sketch(text: str) -> kll_floats_sketch:
    return kll_floats_sketch.deserialize(base64.b64decode(text))


def unit_hash(request_id: str) -> float:
    """A uniform number in [0, 1) fixed by the request id."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def keep(sketch: kll_floats_sketch, value: float, fraction: float, request_id: str, warmup: int) -> bool:
    """Whether ``value`` is in the top ``fraction`` of what the sketch has seen."""
    if sketch.n < max(warmup, 1):
        return False
    cut = 1.0 - fraction
    below_or_equal: float = sketch.get_rank(value, True)  # datasketches ships no type hints
    if below_or_equal <= cut:
        return False
    below: float = sketch.get_rank(value, False)
    if below >= cut:
        return True
    # The cut falls inside a run of values equal to ``value``: keep its share of the run.
    return unit_hash(request_id) < (below_or_equal - cut) / (below_or_equal - below)


class TopSampler:
    """:func:`keep` with the cut's value and ranks cached, refreshed every ``refresh`` updates
    (two sketch rank queries per event cost more than the rest of the event's processing).

    Same decision as :func:`keep`: above the cut value keep, below skip, equal to it keep the
    run's needed share by request-id hash."""

    def __init__(self, sketch: kll_floats_sketch, offset: int = -1, refresh: int = 256):
        self.sketch = sketch
        self.n = sketch.n  # kept here: reading the sketch's own count is a C++ call per event
        self.offset = offset  # last source offset folded into the sketch
        self.refresh = refresh
        self._n_at = -1
        self._value = 0.0
        self._p_equal = 0.0

    def _update_cut(self, fraction: float) -> None:
        sk = self.sketch
        cut = 1.0 - fraction
        self._value = float(sk.get_quantile(cut))
        le, lt = sk.get_rank(self._value, True), sk.get_rank(self._value, False)
        self._p_equal = (le - cut) / (le - lt) if le > lt else 1.0
        self._n_at = sk.n

    def keep(self, value: float, fraction: float, request_id: str, warmup: int) -> bool:
        n = self.n
        if n < max(warmup, 1):
            return False
        if self._n_at < 0 or n - self._n_at >= self.refresh or n < 4 * self.refresh:
            self._update_cut(fraction)
        if value > self._value:
            return True
        if value < self._value:
            return False
        return unit_hash(request_id) < self._p_equal

    def threshold(self) -> float:
        return self._value

    def update(self, value: float, offset: int) -> None:
        self.sketch.update(value)
        self.n += 1
        self.offset = offset


def threshold(sketch: kll_floats_sketch, fraction: float) -> float:
    return float(sketch.get_quantile(1.0 - fraction)) if sketch.n else 0.0


class Sampling:
    """The top-fraction sampler of each (source partition, model), kept in state (``s`` keys)
    so a restarted worker samples as it would have: written once per batch, for the models
    whose sketch took new values."""

    def __init__(self, state: State, fraction: float, warmup: int) -> None:
        self.state = state
        self.fraction = fraction
        self.warmup = warmup
        self.sketches: dict[tuple[int, str], TopSampler] = {}  # (partition, model)
        self.dirty: set[tuple[int, str]] = set()

    def sketch(self, p: int, model: str) -> TopSampler:
        entry = self.sketches.get((p, model))
        if entry is None:
            stored = self.state.get(sketch_key(p, model))
            entry = TopSampler(load_sketch(stored[0]), stored[1]) if stored else TopSampler(new_sketch())
            self.sketches[(p, model)] = entry
        return entry

    def flush(self) -> None:
        for p, model in self.dirty:
            top = self.sketches[(p, model)]
            self.state.put(p, sketch_key(p, model), [dump_sketch(top.sketch), top.offset])
        self.dirty.clear()

    def drop(self, p: int) -> None:
        for key in [k for k in self.sketches if k[0] == p]:
            self.sketches.pop(key, None)
            self.dirty.discard(key)
