"""The sink as the tests drive it: settings on a topic set of its own, the process started and
awaited until ready, and its /metrics read."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from tokenaudit.settings import Settings, load_settings


def sink_settings(bootstrap: str, tag: str, **kw: Any) -> Settings:
    """Settings whose worker-output topics are named after ``tag`` (no test sees another's)."""
    return load_settings(
        kafka_bootstrap=bootstrap,
        topic_rollups=f"{tag}-rollups",
        topic_sampled=f"{tag}-sampled",
        topic_anomalies=f"{tag}-anomalies",
        topic_dlq=f"{tag}-dlq",
        **kw,
    )


def start_sink(env: dict[str, str], port: int, timeout: float = 60.0) -> subprocess.Popen:
    """`tokenaudit sink` in a child process, returned once its /healthz answers on ``port``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenaudit.cli", "sink"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "the sink exited"
            time.sleep(0.3)
    proc.kill()
    pytest.fail("sink never became ready")


def metric(port: int, name: str) -> float | None:
    """A sample of the sink's /metrics (the first series of ``name``), None when unreachable or absent."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def sink_env(bootstrap: str, data_dir: str, tag: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of a sink process on ``tag``'s topics, its usage API on ``port``."""
    return dict(
        os.environ,
        TOKENAUDIT_KAFKA_BOOTSTRAP=bootstrap,
        TOKENAUDIT_DATA_DIR=data_dir,
        TOKENAUDIT_TOPIC_ROLLUPS=f"{tag}-rollups",
        TOKENAUDIT_TOPIC_SAMPLED=f"{tag}-sampled",
        TOKENAUDIT_TOPIC_ANOMALIES=f"{tag}-anomalies",
        TOKENAUDIT_TOPIC_DLQ=f"{tag}-dlq",
        TOKENAUDIT_USAGE_API_PORT=str(port),
        TOKENAUDIT_SINK_GROUP_ID=f"{tag}-sink",
        **extra,
    )
