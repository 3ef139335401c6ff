"""Topic management with confluent-kafka's AdminClient."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30.0,
                  configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create the topics that do not exist yet (name -> partitions); existing ones are left alone."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})  # errors only: no librdkafka chatter in CLI output
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [NewTopic(name, num_partitions=parts, replication_factor=1, config=(configs or {}).get(name, {}))
           for name, parts in topics.items() if name not in existing]
    if not new:
        return
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def delete_topics(bootstrap: str, names: list[str], timeout: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})  # errors only: no librdkafka chatter in CLI output
    for fut in admin.delete_topics(names, request_timeout=timeout).values():
        try:
            fut.result(timeout)
        except KafkaException:
            pass
