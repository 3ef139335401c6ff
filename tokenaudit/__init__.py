"""tokenaudit: exact, cheap token-usage auditing for self-hosted LLM inference.

Rooms, each a top-level folder of the repository assembled into this package (see
pyproject.toml), in layers (each imports only the layers below it; enforced by import-linter,
tests/test_layers.py; docs/architecture.md):

* ``tokenaudit.cli`` (the command line), then ``tokenaudit.demo``;
* ``inference`` (the app), ``streams`` (the worker), ``sinks`` (the write path into
  ClickHouse), ``reports`` (the read side), beside each other;
* ``infra``: the platform (Kafka, ClickHouse, migrations, API keys, process supervision);
* ``schemas``: the contract (Avro schemas and codecs, typed records, column lists, the event
  rule, the HTTP error envelope);
* ``tokenaudit.settings``, then ``tokenaudit.errors`` at the bottom.
"""

__version__ = "0.1.0"
