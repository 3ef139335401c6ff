"""Budget anomalies travel like every anomaly: `anomalies --follow` prints them and its webhook
delivers them (Idempotency-Key: the deterministic id), and following as a client shows only
that client's own (a department's budget alert has no client)."""

from __future__ import annotations

import json
import uuid

from click.testing import CliRunner

from tests.test_anomaly_follow_kafka import produce, serve_hook
from tokenaudit.cli import main
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import ANOMALY, encode
from tokenaudit.schemas.budgets import budget, budget_anomaly_id
from tokenaudit.settings import get_settings
from tokenaudit.streams.budget_alerts import budget_anomaly

START = 1_796_083_200_000  # 2026-12-01 00:00 UTC


def test_follow_and_webhook_carry_budget_anomalies_scoped_by_client(kafka_bootstrap, topic_name, data_dir, monkeypatch):
    dept = budget_anomaly(budget("department", "research", "tokens", 1000, "day", True, 0), START, 0.8, 812, START + 5)
    own = budget_anomaly(budget("client", "acme", "cost", 10, "month", False, 0), START, 1.0, 10.5, START + 6)
    produce(kafka_bootstrap, topic_name, [encode(ANOMALY, dept), encode(ANOMALY, own)])
    monkeypatch.setenv("TOKENAUDIT_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("TOKENAUDIT_TOPIC_ANOMALIES", topic_name)
    get_settings.cache_clear()
    port = free_port()
    server = serve_hook(port)
    try:
        for client, expected in ((None, [dept, own]), ("acme", [own])):
            server.RequestHandlerClass.received.clear()
            args = ["anomalies", "--follow", "--from-beginning", "--group", f"g-{uuid.uuid4().hex[:8]}"]
            args += ["--max-messages", "2", "--format", "json", "--webhook", f"http://127.0.0.1:{port}/hook"]
            args += ["--client", client] if client else []
            result = CliRunner().invoke(main, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            printed = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
            assert [a["anomaly_id"] for a in printed] == [a["anomaly_id"] for a in expected]
            received = server.RequestHandlerClass.received
            assert [key for key, _ in received] == [a["anomaly_id"] for a in expected]
            assert all(body["rule"] == "budget" for _, body in received)
    finally:
        server.shutdown()
    assert own["anomaly_id"] == budget_anomaly_id("client", "acme", START, 1.0)
    assert (dept["client_id"], dept["department"], dept["threshold"], dept["observed"]) == (
        "",
        "research",
        800.0,
        812.0,
    )
