"""Hot-path cost of one audit event: build the record, Avro-encode it, enqueue it to the
confluent-kafka producer (a real broker receives it), plus the per-request metrics update.

Prints RESULT lines; the target is <= 15 us per event for build + encode + enqueue.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 30_000
TARGET_US = 15.0


def main() -> None:
    from tokenaudit.inference.audit import AuditContext
    from tokenaudit.inference.metrics import AppMetrics
    from tokenaudit.inference.publisher import EventPublisher
    from tokenaudit.infra.kafka_admin import ensure_topics
    from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
    from tokenaudit.infra.procutil import free_port
    from tokenaudit.schemas import EVENT, encode
    from tokenaudit.settings import load_settings

    s = load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        broker = KafkaBroker(BrokerConfig(home=Path(tmp) / "kafka", cache_dir=s.cache_dir, version=s.kafka_version,
                                          port=free_port(), controller_port=free_port(), heap="384m"))
        broker.start()
        try:
            ensure_topics(broker.bootstrap, {"bench-hot-path": 4})
            pub = EventPublisher(broker.bootstrap, "bench-hot-path", Path(tmp) / "spool").start()
            metrics = AppMetrics(lambda: pub, lambda: {})

            def build(i: int) -> dict:
                ctx = AuditContext.new(f"req-{i:08d}")
                ctx.client_id, ctx.department, ctx.api_key_id, ctx.client_ip = "acme", "research", "k_0123456789ab", "10.1.2.3"
                ctx.model, ctx.input_tokens, ctx.untruncated_input_tokens = "t5-tiny", 120, 120
                ctx.output_tokens, ctx.finish_reason, ctx.device = 16, "length", "/device:CPU:0"
                ctx.batch_id, ctx.batch_size, ctx.position_in_batch = "0123456789abcdef", 8, 3
                ctx.queue_ms, ctx.inference_ms, ctx.prompt_digest = 1.5, 10.25, "ab" * 32
                return ctx.to_event("POST", "/v1/generate", 200)

            # warm up every path once
            for i in range(2000):
                pub.publish(build(i))
            pub._producer.flush(30)

            def timed(fn) -> float:
                t0 = time.perf_counter()
                for i in range(N):
                    fn(i)
                return (time.perf_counter() - t0) / N * 1e6

            events = [build(i) for i in range(N)]
            payloads = [encode(EVENT, e) for e in events]
            build_us = timed(build)
            encode_us = timed(lambda i: pub._encode(events[i]))
            generic_encode_us = timed(lambda i: encode(EVENT, events[i]))
            enqueue_us = timed(lambda i: pub.publish_encoded(b"acme", payloads[i]))
            pub._producer.flush(30)
            total_us = timed(lambda i: pub.publish(build(i)))
            pub._producer.flush(30)
            metrics_us = timed(lambda i: metrics.observe(events[i]))
            # the irreducible library floor on this machine right now: fastavro + librdkafka alone
            from confluent_kafka import Producer

            raw = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5, "acks": "all",
                            "enable.idempotence": True, "compression.type": "lz4"})
            floor_us = timed(lambda i: raw.produce("bench-hot-path", encode(EVENT, events[i]), b"acme"))
            raw.flush(30)
            t0 = time.perf_counter()
            for _ in range(1_000_000):
                pass
            loop_ns = (time.perf_counter() - t0) * 1000
            print(f"RESULT hot_path_build_us={build_us:.2f}")
            print(f"RESULT hot_path_encode_us={encode_us:.2f}")
            print(f"RESULT hot_path_generic_fastavro_encode_us={generic_encode_us:.2f}")
            print(f"RESULT hot_path_encode_speedup_vs_fastavro={generic_encode_us / encode_us:.2f}")
            print(f"RESULT hot_path_enqueue_us={enqueue_us:.2f}")
            print(f"RESULT hot_path_us_per_event={total_us:.2f}")
            print(f"RESULT hot_path_metrics_observe_us={metrics_us:.2f}")
            print(f"RESULT hot_path_vs_target_ratio={total_us / TARGET_US:.3f}")
            print(f"RESULT hot_path_library_floor_us={floor_us:.2f}")
            print(f"RESULT hot_path_vs_library_floor_ratio={total_us / floor_us:.3f}")
            print(f"RESULT machine_empty_loop_ns_per_iter={loop_ns:.1f}  # ~20 on an idle modern core")
            pub.close(30)
            print(f"RESULT hot_path_events_produced={pub.produced}")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
