"""`tokenaudit budgets set|list|remove` on the session broker: bad input is a clear error with
exit code 2 and leaves the budgets topic unchanged; good input is stored, listed with the
stream's spend (spent, remaining, resets at) and removed by a tombstone."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer, TopicPartition

from tokenaudit.infra import topics
from tokenaudit.schemas import SPEND, encode
from tokenaudit.schemas.budgets import period_bounds, spend_key
from tokenaudit.settings import get_settings


@pytest.fixture
def cli(data_dir, kafka_bootstrap, monkeypatch):
    tag = f"c{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TOKENAUDIT_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("TOKENAUDIT_TOPIC_BUDGETS", f"{tag}-budgets")
    monkeypatch.setenv("TOKENAUDIT_TOPIC_SPEND", f"{tag}-spend")
    get_settings.cache_clear()
    topics.ensure_declared(get_settings(), roles=("budgets", "spend"))
    from tokenaudit.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, list(args))

    return run


def _records(topic: str, bootstrap: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "budgets-cli-test"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


def test_bad_budgets_are_refused_with_exit_code_2_and_nothing_stored(cli, kafka_bootstrap):
    assert cli("keys", "add", "--client", "acme", "--department", "research").exit_code == 0
    topic = get_settings().topic_budgets
    before = _records(topic, kafka_bootstrap)
    cases = {
        ("--client", "nobody", "--tokens", "100", "--period", "day"): "no API key maps to client 'nobody'",
        ("--department", "nowhere", "--tokens", "100", "--period", "day"): "no API key maps to department",
        ("--client", "ac\x07me", "--tokens", "100", "--period", "day"): "non-printable character",
        ("--department", "", "--tokens", "100", "--period", "day"): "must not be empty",
        ("--client", "acme", "--tokens", "0", "--period", "day"): "> 0",
        ("--client", "acme", "--tokens", "-5", "--period", "day"): "> 0",
        ("--client", "acme", "--cost", "-0.5", "--period", "month"): "> 0",
        ("--client", "acme", "--tokens", "many", "--period", "day"): "'many' is not a valid float",
        ("--client", "acme", "--tokens", "1.5", "--period", "day"): "whole number",
        ("--client", "acme", "--tokens", "100", "--period", "week"): "unknown budget period 'week'",
        ("--client", "acme", "--tokens", "100"): "Missing option '--period'",
        ("--client", "acme", "--department", "research", "--tokens", "1", "--period", "day"): "exactly one of --client",
        ("--tokens", "1", "--period", "day"): "exactly one of --client",
        ("--client", "acme", "--tokens", "1", "--cost", "1", "--period", "day"): "exactly one of --tokens",
        ("--client", "acme", "--period", "day"): "exactly one of --tokens",
    }
    for args, message in cases.items():
        result = cli("budgets", "set", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    removed = cli("budgets", "remove", "--client", "acme")
    assert removed.exit_code == 2 and "client 'acme' has no budget" in removed.output, removed.output
    assert cli("budgets", "remove").exit_code == 2
    assert _records(topic, kafka_bootstrap) == before, "nothing was written to the budgets topic"


def test_set_list_remove_with_the_streams_spend(cli, kafka_bootstrap):
    assert cli("keys", "add", "--client", "acme", "--department", "research").exit_code == 0
    s = get_settings()
    done = cli("budgets", "set", "--client", "acme", "--tokens", "1000", "--period", "day", "--hard")
    assert done.exit_code == 0 and "client acme: hard budget of 1000 tokens per day" in done.output, done.output
    done = cli("budgets", "set", "--department", "research", "--cost", "2.5", "--period", "month")
    assert done.exit_code == 0, done.output
    # the stream's spend of acme this day: 300 tokens on one partition
    now = int(time.time() * 1000)
    start, end = period_bounds(now, "day")
    spend = {
        "scope": "client",
        "scope_id": "acme",
        "period_start": start,
        "period_end": end,
        "partition": 0,
        "offset": 7,
        "input_tokens": 200,
        "output_tokens": 100,
        "cost": 0.0,
        "unpriced_tokens": 300,
        "events": 3,
        "updated_at": now,
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(s.topic_spend, key=spend_key("client", "acme", 0), value=encode(SPEND, spend))
    producer.flush(10)

    listed = cli("budgets", "list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    rows = {r["scope"]: r for r in json.loads(listed.stdout)}
    assert rows["client"] == {
        "scope": "client",
        "scope_id": "acme",
        "unit": "tokens",
        "limit": 1000,
        "period": "day",
        "hard": True,
        "spent": 300,
        "remaining": 700,
        "unpriced_tokens": 300,
        "resets_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end / 1000)),
    }
    dept = rows["department"]
    assert (dept["unit"], dept["limit"], dept["spent"], dept["remaining"], dept["hard"]) == ("cost", 2.5, 0, 2.5, False)
    table = cli("budgets", "list")
    assert table.exit_code == 0 and "acme" in table.output and "research" in table.output

    removed = cli("budgets", "remove", "--client", "acme")
    assert removed.exit_code == 0 and "client acme: budget removed" in removed.output, removed.output
    rows = json.loads(cli("budgets", "list", "--format", "json").stdout)
    assert [(r["scope"], r["scope_id"]) for r in rows] == [("department", "research")]


def test_development_mode_knows_a_client_or_department_by_its_usage(
    cli, kafka_bootstrap, ch_client, ch_database, chdb_dsn, monkeypatch
):
    """No key registry: a client or department is known when it appears in usage (ClickHouse)."""
    from tests.support.usage_seed import seed_rollups, utcnow
    from tokenaudit.infra.store import Store

    monkeypatch.setenv("TOKENAUDIT_CLICKHOUSE_DSN", chdb_dsn)
    monkeypatch.setenv("TOKENAUDIT_CLICKHOUSE_DATABASE", ch_database)
    monkeypatch.delenv("TOKENAUDIT_API_KEY", raising=False)
    monkeypatch.delenv("TOKENAUDIT_API_KEYS_FILE", raising=False)
    get_settings.cache_clear()
    store = Store(ch_client, ch_database)
    store.migrate()
    seed_rollups(store, utcnow())
    topic = get_settings().topic_budgets
    before = _records(topic, kafka_bootstrap)
    unknown = cli("budgets", "set", "--client", "10.9.9.9", "--tokens", "10", "--period", "day")
    assert unknown.exit_code == 2 and "client '10.9.9.9' has no usage yet" in unknown.output, unknown.output
    assert _records(topic, kafka_bootstrap) == before
    known = cli("budgets", "set", "--client", "acme-web", "--tokens", "10", "--period", "day")
    assert known.exit_code == 0, known.output
    dept = cli("budgets", "set", "--department", "research", "--cost", "1", "--period", "month")
    assert dept.exit_code == 0, dept.output
    assert _records(topic, kafka_bootstrap) == before + 2
