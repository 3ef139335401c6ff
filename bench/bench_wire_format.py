"""The Confluent wire format and CloudEvents headers against today's single-object encoding,
side by side in one run (this box is shared and noisy: ratios, interleaved rounds, best of 5).

- encode: the publisher's event encoder in each framing (only the constant header differs);
- publish: what the inference hot path does per event (encode + enqueue to a real broker):
  single-object without headers (the previous path) vs Confluent + the six CloudEvents headers;
- decode: the worker's event decoder on each framing, and the previous decoder (the
  single-object header check alone, rebuilt here around the same body) on single-object
  records, so the dispatch's cost on the existing path shows.

Registry ids are bound in-process (the ids a registry would give; the registry is not on
these paths by design). Prints RESULT lines.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 30_000
ROUNDS = 5


def best(fn, n: int = N) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    from tests.support import synth
    from tokenaudit.inference.cloudevents import CloudEventHeaders
    from tokenaudit.inference.publisher import EventPublisher
    from tokenaudit.infra.kafka_admin import ensure_topics
    from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
    from tokenaudit.infra.procutil import free_port
    from tokenaudit.schemas import EVENT, AvroDecodeError, catalog
    from tokenaudit.schemas.compiled import NATIVE, _BadValue, _field_program, _native, compile_decoder, compile_encoder
    from tokenaudit.settings import load_settings

    for i, sv in enumerate(catalog.by_name[EVENT]):
        catalog.bind_id(100 + i, sv)
    events = [
        synth.event(f"req-{i:08d}", 1_795_000_000_000 + i, "acme", input_tokens=120, output_tokens=16) for i in range(N)
    ]
    enc_single, enc_confluent = compile_encoder(EVENT), compile_encoder(EVENT, confluent=True)
    single = [enc_single(e) for e in events]
    confluent = [enc_confluent(e) for e in events]
    decode = compile_decoder(EVENT)
    sv = catalog.current(EVENT)
    body = _native.FlatCodec(_field_program(sv.raw), sv.header, _BadValue, None).decode_body
    header = sv.header

    def previous_decode(data: bytes) -> dict:  # the decoder before the dispatch, as it was
        if data.__class__ is not bytes or data[:10] != header:
            raise AssertionError("not on this bench's path")
        try:
            return body(data)
        except _BadValue as exc:
            raise AvroDecodeError(f"corrupt body: {exc}") from None
        except IndexError:
            raise AvroDecodeError("truncated body") from None

    ce = CloudEventHeaders("tokenaudit/bench-1")
    results: dict[str, list[float]] = {}

    def measure(name: str, fn) -> None:
        results.setdefault(name, []).append(best(fn))

    for _ in range(ROUNDS):
        measure("encode_single_object_us", lambda i: enc_single(events[i]))
        measure("encode_confluent_us", lambda i: enc_confluent(events[i]))
        measure("cloudevents_headers_us", lambda i: ce.of_event(events[i]))  # what publish() calls
        measure("decode_previous_single_object_us", lambda i: previous_decode(single[i]))
        measure("decode_single_object_us", lambda i: decode(single[i]))
        measure("decode_confluent_us", lambda i: decode(confluent[i]))

    s = load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        broker = KafkaBroker(
            BrokerConfig(
                home=Path(tmp) / "kafka",
                cache_dir=s.cache_dir,
                version=s.kafka_version,
                port=free_port(),
                controller_port=free_port(),
                heap="384m",
            )
        )
        broker.start()
        try:
            ensure_topics(broker.bootstrap, {"bench-wire": 4})
            previous = EventPublisher(broker.bootstrap, "bench-wire", Path(tmp) / "spool-a").start()
            new = EventPublisher(
                broker.bootstrap, "bench-wire", Path(tmp) / "spool-b", confluent=True, cloudevents_source="tokenaudit/b"
            ).start()
            for pub in (previous, new):  # warm up
                for i in range(2000):
                    pub.publish(events[i])
                pub._producer.flush(30)
            for _ in range(ROUNDS):
                for name, pub in (("publish_previous_us", previous), ("publish_confluent_cloudevents_us", new)):
                    measure(name, lambda i, pub=pub: pub.publish(events[i]))
                    pub._producer.flush(30)
            previous.close(30)
            new.close(30)
        finally:
            broker.stop()

    got = {k: min(v) for k, v in results.items()}
    print(f"RESULT wire_native_codec={NATIVE}")
    for k, v in got.items():
        print(f"RESULT wire_{k}={v:.3f}")
    print(
        f"RESULT wire_encode_confluent_vs_single_ratio={got['encode_confluent_us'] / got['encode_single_object_us']:.3f}"
    )
    print(
        f"RESULT wire_decode_single_object_vs_previous_ratio="
        f"{got['decode_single_object_us'] / got['decode_previous_single_object_us']:.3f}"
    )
    print(
        f"RESULT wire_decode_confluent_vs_single_ratio={got['decode_confluent_us'] / got['decode_single_object_us']:.3f}"
    )
    print(
        f"RESULT wire_publish_confluent_cloudevents_vs_previous_ratio="
        f"{got['publish_confluent_cloudevents_us'] / got['publish_previous_us']:.3f}"
    )


if __name__ == "__main__":
    main()
