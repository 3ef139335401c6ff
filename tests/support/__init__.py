"""Helpers of the test suite and the benchmarks (never shipped in the package): synthetic
streams with ground truth (``synth``), cached tiny models and a threaded app server
(``apps``), usage seed data (``usage_seed``), a raw ASGI caller (``asgi``) and in-memory
stand-ins for unit tests of pure logic (``fakes``). Import as ``from tests.support import ...``
(pytest puts the repository root on the path; bench scripts add it themselves)."""
