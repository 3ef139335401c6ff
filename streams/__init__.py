"""Streams: the faust-streaming worker (windows, anomalies, sampling, dead letters)."""
