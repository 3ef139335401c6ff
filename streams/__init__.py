"""Streams: the faust-streaming worker (windows, anomalies, sampling, dead letters). The logic
(``processor`` and its steps) is free of faust; ``app`` runs it inside faust, and every private
faust/aiokafka access is in ``faust_compat``. Invariant: each event_id counted once, state
updates idempotent by source offset."""
