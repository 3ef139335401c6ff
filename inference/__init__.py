"""Inference: the Starlette app serving a TensorFlow model, its pure-ASGI identity and audit
layers, and the publisher that puts one event per request on Kafka or, while it cannot, in
a disk spool. Invariant: every request's event is on the topic or counted as dropped."""
