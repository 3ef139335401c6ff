"""The ledger (usage_requests): one row per event however many copies arrived, fed by the sink
from the real token-usage topic; the requests / request reports and their usage API routes,
scoped by key; the client-IP privacy regimes; retention; `erase --client`; TOKENAUDIT_LEDGER=off."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from starlette.testclient import TestClient

from tests.support import synth
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.migrate import ttl_days_from_settings
from tokenaudit.infra.store import Store
from tokenaudit.reports.erase import erase_client
from tokenaudit.reports.params import QueryParamError, parse_report_params
from tokenaudit.reports.queries import run_raw
from tokenaudit.reports.usage_api import create_app
from tokenaudit.schemas import EVENT, encode
from tokenaudit.schemas.client_ip import hash_ip, ip_policy, stored_forms, truncate_ip
from tokenaudit.settings import load_settings
from tokenaudit.sinks.ledger import LEDGER_COLUMNS, LedgerRows
from tokenaudit.sinks.sink import Sink

pytestmark = pytest.mark.timeout(180)
T0 = int(time.time() * 1000) - 600_000  # recent: inside the default 90-day retention


# --- pure logic: no broker, no store -------------------------------------------------------------
def test_client_ip_regimes():
    assert truncate_ip("203.0.113.77") == "203.0.113.0"
    assert truncate_ip("2001:db8:abcd:12:1:2:3:4") == "2001:db8:abcd::"
    assert truncate_ip("not an ip") == ""
    assert ip_policy("full")("203.0.113.77") == "203.0.113.77"
    hashed = ip_policy("hashed", b"k1")
    assert hashed("203.0.113.77") == hashed("203.0.113.77") == hash_ip("203.0.113.77", b"k1")
    assert hashed("203.0.113.77") != ip_policy("hashed", b"k2")("203.0.113.77") and len(hashed("1.2.3.4")) == 32
    assert stored_forms("203.0.113.77") == ["203.0.113.77", "203.0.113.0"]
    with pytest.raises(ValueError, match="secret"):
        ip_policy("hashed")
    with pytest.raises(ValueError, match="full, truncated, hashed"):
        ip_policy("masked")


def test_ledger_row_stores_the_default_request_id_once():
    ev = synth.event("r1", T0, "c1")
    rows = LedgerRows(str)
    at = LEDGER_COLUMNS.index
    row = rows.row(ev, ev["event_id"])
    assert row[at("request_id")] == "r1"
    assert uuid.UUID(int=row[at("event_id_hi")] << 64 | row[at("event_id_lo")]) == uuid.UUID(ev["event_id"])
    ev["request_id"] = ev["event_id"].replace("-", "")  # the app's default: the event id's hex
    assert rows.row(ev, ev["event_id"])[at("request_id")] == ""


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"ip": "10.0.0.1' OR 1=1"}, "ip: expected"),
        ({"status": "99"}, "status: expected"),
        ({"status": "²00"}, "status: expected"),
        ({"model": "m; DROP"}, "model: expected"),
        ({"limit": "0"}, "limit: expected"),
    ],
)
def test_requests_parameters_are_validated(raw, match):
    with pytest.raises(QueryParamError, match=match):
        parse_report_params("requests", raw)
    with pytest.raises(QueryParamError, match="id: required"):
        parse_report_params("request", {})
    with pytest.raises(QueryParamError, match="id: expected"):
        parse_report_params("request", {"id": "a b"})


# --- through the real topic and the real store ------------------------------------------------------
def _events() -> list[dict]:
    """15 requests of 3 clients from 2 IPs, 3 models, a few errors; one with the default id."""
    out = []
    for i in range(15):
        client = f"c{i % 3}"
        ev = synth.event(
            f"req-{i}",
            T0 + i * 1000,
            client,
            model=f"m{i % 5 % 3}",
            input_tokens=10 + i,
            output_tokens=i,
            status_code=500 if i % 7 == 6 else 200,
            truncated=i == 4,
        )
        ev["client_ip"] = "203.0.113.7" if i % 2 else "198.51.100.9"
        out.append(ev)
    out[0]["request_id"] = out[0]["event_id"].replace("-", "")
    # a request without a model run (GET /v1/models): no batch, position -1
    out[5].update(method="GET", path="/v1/models", batch_id=None, batch_size=0, position_in_batch=-1)
    return out


def _feed(kafka_bootstrap: str, store: Store, events: list[dict], copies: list[dict], **settings_kw) -> Sink:
    """Produce events, copies of some, an invalid event and undecodable bytes onto a fresh usage
    topic, and run the sink until it has stored the ledger rows."""
    tag = f"l{uuid.uuid4().hex[:8]}"
    s = load_settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_usage=f"{tag}-usage",
        topic_rollups=f"{tag}-rollups",
        topic_sampled=f"{tag}-sampled",
        topic_anomalies=f"{tag}-anomalies",
        topic_dlq=f"{tag}-dlq",
        sink_batch_rows=8,  # several batches: copies land in different inserts
        sink_ledger_batch_rows=8,
        sink_batch_seconds=0.3,
        **settings_kw,
    )
    ensure_topics(
        kafka_bootstrap, dict.fromkeys((s.topic_usage, s.topic_rollups, s.topic_sampled, s.topic_anomalies), 2)
    )
    from confluent_kafka import Producer

    invalid = dict(events[1], event_id=str(uuid.uuid4()), status_code=999)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for ev in [*events, *copies, invalid]:
        producer.produce(s.topic_usage, key=ev["client_id"].encode(), value=encode(EVENT, ev))
    producer.produce(s.topic_usage, key=b"c1", value=b"not avro")
    producer.flush(10)
    sink = Sink(s, store, group_id=f"{tag}-sink")
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,))
    thread.start()
    expected_messages = len(events) + len(copies) + 2
    deadline = time.monotonic() + 60
    try:
        while sink.counters.messages < expected_messages or sink.batch.messages:
            assert time.monotonic() < deadline, f"sink consumed {sink.counters.messages} of {expected_messages}"
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
    assert sink.counters.ledger_invalid == 2  # the invalid event and the undecodable bytes
    assert sink.counters.undecodable == 0  # not dead-lettered by the sink: the worker does that, once
    return sink


@pytest.fixture
def store(ch_client, ch_database):
    s = Store(ch_client, ch_database)
    s.migrate(ttl_days_from_settings(load_settings()))  # TOKENAUDIT_TTL_REQUESTS_DAYS: 90
    return s


def test_every_event_once_and_the_reports_over_it(kafka_bootstrap, store):
    events = _events()
    _feed(kafka_bootstrap, store, events, copies=events[::4] + events[:2])
    stored = store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM {db}.usage_requests FINAL")[0]
    # the ALIAS puts the stored halves back together into the event's UUID
    assert {str(r["e"]) for r in store.query("SELECT event_id AS e FROM {db}.usage_requests")} == {
        e["event_id"] for e in events
    }
    assert (stored["n"], stored["u"]) == (len(events), len(events))

    since = {"since": "1d"}
    got = run_raw(store, "requests", since)
    assert [r["event_id"] for r in got] == [e["event_id"] for e in events]  # oldest first, each once
    first = got[0]
    assert first["request_id"] == events[0]["event_id"].replace("-", "")  # put back from ''
    row = got[4]
    for field in ("request_id", "client_id", "department", "client_ip", "method", "path", "status_code", "model"):
        assert row[field] == events[4][field], field
    for field in ("input_tokens", "untruncated_input_tokens", "output_tokens", "total_tokens", "batch_size"):
        assert row[field] == events[4][field], field
    assert row["truncated"] is True and row["instance"] == "synth:0" and row["finish_reason"] == "stop"
    assert row["latency_ms"] == pytest.approx(events[4]["latency_ms"], abs=0.005)  # Decimal32(2): 10 us steps
    assert row["ts"].startswith("20") and row["ts"].endswith("Z")
    unbatched = got[5]
    assert (unbatched["path"], unbatched["batch_id"], unbatched["position_in_batch"]) == ("/v1/models", "", -1)

    def ids(**filters) -> list[str]:
        return [r["request_id"] for r in run_raw(store, "requests", {**since, **filters})]

    assert ids(client="c1", ip="203.0.113.7") == [
        e["request_id"] for e in events if e["client_id"] == "c1" and e["client_ip"] == "203.0.113.7"
    ]
    assert ids(status="500") == ["req-6", "req-13"]
    assert ids(model="m2", client="c2") == [
        e["request_id"] for e in events if e["model"] == "m2" and e["client_id"] == "c2"
    ]
    assert ids(limit="2") == ["req-13", "req-14"]  # the latest two
    assert ids(until=time_iso(T0 + 3000)) == [events[0]["request_id"], "req-1", "req-2"]

    one = run_raw(store, "request", {"id": "req-9"})
    assert [r["event_id"] for r in one] == [events[9]["event_id"]]
    assert run_raw(store, "request", {"id": events[9]["event_id"]}) == one  # by event id too
    assert (
        run_raw(store, "request", {"id": events[0]["event_id"].replace("-", "")})[0]["event_id"]
        == events[0]["event_id"]
    )
    assert run_raw(store, "request", {"id": "req-9", "client": "c1"}) == []  # req-9 is c0's

    # retention: TOKENAUDIT_TTL_REQUESTS_DAYS, applied by migrate
    ddl = store.query("SHOW CREATE TABLE {db}.usage_requests")[0]
    assert "toIntervalDay(90)" in next(iter(ddl.values()))


def time_iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def test_refused_ledger_rows_land_in_rejected_rows_and_their_neighbours_are_stored(kafka_bootstrap, store):
    """The split isolates each row the Arrow conversion refuses (a value its column cannot
    hold) or ClickHouse refuses (a constraint added for the purpose), and stores the rest."""
    store.command("ALTER TABLE {db}.usage_requests ADD CONSTRAINT sane_batches CHECK batch_size < 1000")
    events = _events()
    events[3]["batch_size"] = 5000  # refused by ClickHouse
    events[8]["position_in_batch"] = 40_000  # Int16: refused by the conversion
    events[11]["queue_ms"] = -1.0  # UInt32 hundredths: refused by the conversion
    sink = _feed(kafka_bootstrap, store, events, copies=[])
    stored = {r["request_id"] for r in run_raw(store, "requests", {"since": "1d"})}
    refused = {"req-3", "req-8", "req-11"}
    assert stored == {e["request_id"] for e in events[1:]} - refused | {events[0]["request_id"]}
    rejected = store.query("SELECT table, reason, record FROM {db}.rejected_rows FINAL")
    reasons = {json.loads(r["record"])["request_id"]: r["reason"] for r in rejected}
    assert {r["table"] for r in rejected} == {"usage_requests"} and set(reasons) == refused
    assert "VIOLATED_CONSTRAINT" in reasons["req-3"] and "sane_batches" in reasons["req-3"]
    assert reasons["req-8"].startswith("column position_in_batch: ")
    assert reasons["req-11"].startswith("column queue_ms_x100: ")
    assert json.loads(next(r["record"] for r in rejected if "req-11" in r["record"]))["queue_ms"] == -1.0
    assert sink.counters.rejected_rows == 3 and sink.counters.inserted_requests == len(events) - 3


def test_usage_api_routes_are_scoped_by_key(kafka_bootstrap, store, tmp_path):
    events = _events()
    _feed(kafka_bootstrap, store, events, copies=[])
    registry = tmp_path / "api_keys.toml"
    keys = {c: add_key(registry, c, "eng") for c in ("c0", "c1")}
    keys["admin"] = add_key(registry, "ops", "", role="admin")
    http = TestClient(create_app(store, load_settings(data_dir=tmp_path, api_keys_file=registry)))

    def get(path: str, key: str, **params):
        return http.get(path, params=params, headers={"Authorization": f"Bearer {keys[key]}"})

    mine = get("/v1/requests", "c1", since="1d").json()
    assert mine["scope"] == "c1" and {r["client_id"] for r in mine["rows"]} == {"c1"} and len(mine["rows"]) == 5
    assert get("/v1/requests", "c1", since="1d", client="c0").status_code == 403
    assert len(get("/v1/requests", "admin", since="1d").json()["rows"]) == 15
    assert get("/v1/requests/req-1", "c1").json()["rows"][0]["event_id"] == events[1]["event_id"]
    hidden = get("/v1/requests/req-0", "c1")  # c0's request: not in c1's scope
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
    assert get(f"/v1/requests/{events[0]['event_id']}", "c0").json()["rows"][0]["request_id"] == events[0][
        "event_id"
    ].replace("-", "")
    assert get("/v1/requests/a%20b", "admin").status_code == 400

    erase = http.post("/v1/admin/erase", params={"client": "c1"}, headers={"Authorization": f"Bearer {keys['c1']}"})
    assert erase.status_code == 403
    erased = http.post("/v1/admin/erase", params={"client": "c1"}, headers={"Authorization": f"Bearer {keys['admin']}"})
    assert erased.status_code == 200
    assert {r["table"]: r["rows_removed"] for r in erased.json()["rows"]} == {"usage_requests": 5, "usage_sampled": 0}
    assert get("/v1/requests", "c1", since="1d").json()["rows"] == []
    assert len(get("/v1/requests", "admin", since="1d").json()["rows"]) == 10


def test_erase_removes_ledger_rows_and_sampled_records_of_one_client(kafka_bootstrap, store):
    from tests.support.usage_seed import seed_sampled, utcnow

    events = _events()
    _feed(kafka_bootstrap, store, events, copies=events[:3])
    seed_sampled(store, utcnow())
    sampled = {
        r["client_id"]: r["n"]
        for r in store.query("SELECT client_id, count() AS n FROM {db}.usage_sampled GROUP BY client_id")
    }
    victim = next(iter(sampled))
    store.insert(
        "usage_requests",
        [[victim, T0, 1, uuid.uuid4().int >> 64, "x", "", "", "", "", "", "", 200]],
        [
            "client_id",
            "ts",
            "event_id_hi",
            "event_id_lo",
            "request_id",
            "instance",
            "department",
            "api_key_id",
            "client_ip",
            "method",
            "path",
            "status_code",
        ],
    )
    before = store.query("SELECT count() AS n FROM {db}.usage_requests")[0]["n"]
    removed = {r["table"]: r["rows_removed"] for r in erase_client(store, victim)}
    assert removed == {"usage_requests": 1, "usage_sampled": sampled[victim]}
    assert store.query("SELECT count() AS n FROM {db}.usage_requests")[0]["n"] == before - 1
    left = store.query("SELECT count() AS n FROM {db}.usage_sampled WHERE client_id = {c:String}", {"c": victim})
    assert left[0]["n"] == 0
    others = store.query("SELECT count() AS n FROM {db}.usage_sampled WHERE client_id != {c:String}", {"c": victim})
    assert others[0]["n"] == sum(n for c, n in sampled.items() if c != victim)
    c0 = erase_client(store, "c0")
    assert c0[0]["table"] == "usage_requests" and c0[0]["rows_removed"] >= 5  # copies not yet merged count too
    assert run_raw(store, "requests", {"since": "1d", "client": "c0"}) == []


def test_truncated_and_hashed_ips_and_the_ledger_switched_off(kafka_bootstrap, store, tmp_path):
    events = _events()
    _feed(kafka_bootstrap, store, events, copies=[], ledger_client_ip="truncated")
    stored = {r["client_ip"] for r in run_raw(store, "requests", {"since": "1d"})}
    assert stored == {"203.0.113.0", "198.51.100.0"}
    # a caller's full address finds the rows of its network
    assert len(run_raw(store, "requests", {"since": "1d", "ip": "203.0.113.7"})) == 7

    erase_client(store, "c0"), erase_client(store, "c1"), erase_client(store, "c2")
    _feed(
        kafka_bootstrap,
        store,
        events,
        copies=[],
        ledger_client_ip="hashed",
        ledger_client_ip_secret="s3cret",
        data_dir=tmp_path,
    )
    rows = run_raw(store, "requests", {"since": "1d"})
    assert {r["client_ip"] for r in rows} == {hash_ip("203.0.113.7", b"s3cret"), hash_ip("198.51.100.9", b"s3cret")}
    assert len(run_raw(store, "requests", {"since": "1d", "ip": hash_ip("203.0.113.7", b"s3cret")})) == 7

    erase_client(store, "c0"), erase_client(store, "c1"), erase_client(store, "c2")
    off = Sink(load_settings(ledger=False), store, consumer=object())  # type: ignore[arg-type]
    assert load_settings().topic_usage not in off.topics and off.ledger is None
