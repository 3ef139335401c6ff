"""`tokenaudit api` runs the usage API alone; `tokenaudit sink --no-api` runs the sink with only
its own /healthz and /metrics; the supervisor composes them: one process for the embedded store
(one process owns a chDB directory), two for a ClickHouse server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.services import Supervisor
from tokenaudit.settings import load_settings

CLI = [sys.executable, "-m", "tokenaudit.cli"]


def _wait_ok(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"{url} never answered")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_api_alone_answers_reports_and_errors_in_the_envelope(tmp_path):
    port = free_port()
    env = dict(os.environ, TOKENAUDIT_DATA_DIR=str(tmp_path / "data"), TOKENAUDIT_USAGE_API_PORT=str(port))
    migrated = subprocess.run(CLI + ["db", "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    added = subprocess.run(
        CLI + ["keys", "add", "--client", "ops", "--admin"], env=env, capture_output=True, text=True, timeout=60
    )
    assert added.returncode == 0, added.stderr
    headers = {"Authorization": f"Bearer {added.stdout.strip()}"}
    proc = subprocess.Popen(CLI + ["api"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ok(proc, f"{base}/healthz")
        ok = httpx.get(f"{base}/v1/usage", params={"since": "1h"}, headers=headers, timeout=30)
        assert ok.status_code == 200 and ok.json()["rows"] == [] and ok.json()["scope"] == "*"
        bad = httpx.get(f"{base}/v1/usage", params={"since": "yesterday-ish"}, headers=headers, timeout=30)
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "since" and bad.json()["error"]["code"] == "invalid_parameter"
        assert httpx.get(f"{base}/v1/usage", timeout=30).json()["error"]["type"] == "authentication_error"
    finally:
        assert _stop(proc) == 0


def test_sink_without_the_api_serves_its_own_health_and_metrics(kafka_bootstrap, tmp_path):
    tag = f"a{uuid.uuid4().hex[:8]}"
    sink_port, api_port = free_port(), free_port()
    env = dict(
        os.environ,
        TOKENAUDIT_KAFKA_BOOTSTRAP=kafka_bootstrap,
        TOKENAUDIT_DATA_DIR=str(tmp_path / "data"),
        TOKENAUDIT_SINK_PORT=str(sink_port),
        TOKENAUDIT_USAGE_API_PORT=str(api_port),
        TOKENAUDIT_SINK_GROUP_ID=f"{tag}-sink",
        TOKENAUDIT_KAFKA_PARTITIONS="1",
        **{f"TOKENAUDIT_TOPIC_{t.upper()}": f"{tag}-{t}" for t in ("usage", "anomalies", "dlq", "rollups", "sampled")},
    )
    proc = subprocess.Popen(CLI + ["sink", "--no-api"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_ok(proc, f"http://127.0.0.1:{sink_port}/healthz")
        metrics = httpx.get(f"http://127.0.0.1:{sink_port}/metrics", timeout=10).text
        assert "tokenaudit_sink_batches_total 0.0" in metrics and "tokenaudit_sink_batch_duplicates_total" in metrics
        assert httpx.get(f"http://127.0.0.1:{sink_port}/v1/usage", timeout=10).status_code == 404  # no read side
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2)
    finally:
        assert _stop(proc) == 0


def test_the_supervisor_composes_the_api_with_the_sink_only_for_the_embedded_store(tmp_path):
    def services(**kw):
        s = load_settings(data_dir=tmp_path / "data", **kw)
        return [(svc.name, svc.argv[3:], svc.ports) for svc in Supervisor(s, echo=lambda _: None).services()]

    embedded = services(usage_api_port=9101, sink_port=9102)
    assert [name for name, *_ in embedded] == ["sink", "worker", "inference"]
    assert embedded[0][1:] == (["sink", "--api"], [("127.0.0.1", 9101)])
    server = services(clickhouse_dsn="http://default:x@clickhouse.internal:8123", usage_api_port=9101, sink_port=9102)
    assert [name for name, *_ in server] == ["sink", "api", "worker", "inference"]
    assert server[0][1:] == (["sink", "--no-api"], [("127.0.0.1", 9102)])
    assert server[1][1:] == (["api"], [("127.0.0.1", 9101)])
