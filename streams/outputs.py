"""What one processed batch produces, and what the processor has counted so far."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenaudit.schemas.records import Anomaly, SampledRecord, UsageRollup


@dataclass
class Outputs:
    """One batch's records for the output topics (rollups, sampled records, anomalies) and its
    dead letters: ``(key, value, reason, source partition, source offset)``."""

    rollups: list[UsageRollup] = field(default_factory=list)
    sampled: list[SampledRecord] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    dlq: list[tuple[bytes | None, bytes | None, str, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rollups) + len(self.sampled) + len(self.anomalies) + len(self.dlq)


@dataclass
class Counters:
    """This process's counts (the copies dropped, which must survive restarts, are kept per
    partition in the meta records: :meth:`~tokenaudit.streams.processor.Processor.duplicates`)."""

    consumed: int = 0  # source records read (replays, copies and dead letters included)
    events: int = 0  # decodable, valid events (replays and copies included)
    counted: int = 0  # events added to a window or sent as a late delta (first time only)
    replayed: int = 0
    dead_lettered: int = 0
    late: int = 0  # events whose window had closed: sent as deltas
    rollups: int = 0
    sampled: int = 0
    anomalies: int = 0
