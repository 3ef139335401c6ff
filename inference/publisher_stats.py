"""What the publisher counts: every event is on the topic or counted as dropped, and these
counters say which (read by /metrics, see ``PUBLISHER_COUNTERS`` in metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PublisherStats:
    """Plain counters, read by the /metrics collector at scrape time (no locks on the hot path:
    ``enqueued`` has one writer, the request thread; the rest are written off the direct path
    under a lock, and a slightly stale scrape is fine).

    ``dropped`` counts every event that will not reach the topic, whatever the reason; the
    ``dropped_unauthenticated``, ``write_failures``, ``quarantined`` and ``torn_tails`` counters
    say why for some of them (each of those events is in ``dropped`` too)."""

    enqueued: int = 0
    failed: int = 0
    spooled: int = 0
    replayed: int = 0
    replay_failed: int = 0
    dropped: int = 0
    dropped_unauthenticated: int = 0
    write_failures: int = 0
    quarantined: int = 0
    torn_tails: int = 0
