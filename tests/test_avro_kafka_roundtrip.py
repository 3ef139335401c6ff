"""An Avro event produced with confluent-kafka and consumed with aiokafka (faust's client)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer

from tokenaudit.schemas import EVENT, decode, encode


def sample_event(i: int = 0) -> dict:
    return {
        "request_id": f"req-{i}",
        "ts": datetime(2026, 11, 28, 12, 0, i % 60, 123000, tzinfo=UTC),
        "client_id": "acme",
        "department": "research",
        "api_key_id": "k_3f2a",
        "client_ip": "10.1.2.3",
        "method": "POST",
        "path": "/v1/generate",
        "status_code": 200,
        "error_type": None,
        "model": "t5-tiny",
        "input_tokens": 17 + i,
        "untruncated_input_tokens": 17 + i,
        "truncated": False,
        "output_tokens": 9,
        "total_tokens": 26 + i,
        "latency_ms": 12.5,
        "queue_ms": 0.75,
        "inference_ms": 11.0,
        "batch_id": "b-1",
        "batch_size": 4,
        "position_in_batch": 2,
        "device": "/CPU:0",
        "prompt_digest": "ab" * 32,
        "finish_reason": "length",
        "event_id": f"0190b9c3-5f4e-7b2a-9c1d-{i:012x}",
        "instance": "host-a:8000",
        "ttft_ms": 41.5 if i % 2 else None,
        "tpot_ms": 3.25 if i % 2 else None,  # v4: streamed responses
    }


def test_confluent_to_aiokafka_byte_exact(kafka_bootstrap, topic_name):
    events = [sample_event(i) for i in range(5)]
    payloads = [encode(EVENT, e) for e in events]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    for e, p in zip(events, payloads):
        producer.produce(topic_name, key=e["client_id"].encode(), value=p)
    assert producer.flush(20) == 0

    async def consume() -> list:
        consumer = AIOKafkaConsumer(
            topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        try:
            got = []
            async with asyncio.timeout(30):
                while len(got) < len(events):
                    batch = await consumer.getmany(timeout_ms=1000)
                    for msgs in batch.values():
                        got.extend(msgs)
            return got
        finally:
            await consumer.stop()

    messages = asyncio.run(consume())
    assert [m.value for m in messages] == payloads, "bytes on the wire must be unchanged"
    assert all(m.key == b"acme" for m in messages)
    assert [decode(m.value) for m in messages] == events
