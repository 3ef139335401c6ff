"""Ad-hoc topic management with confluent-kafka's AdminClient (tests, benchmarks, tools).

The project's own topics are created from their declaration (:mod:`tokenaudit.infra.topics`);
this module is for other topics, with the same replication rule.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tokenaudit.infra.kafka_clients import check_access
from tokenaudit.infra.topics import Replication


def _config(cluster: str | dict[str, Any]) -> dict[str, Any]:
    """A bootstrap string (plaintext) or a full client configuration from kafka_clients."""
    if isinstance(cluster, dict):
        return {**cluster, "log_level": 3}
    return {"bootstrap.servers": cluster, "log_level": 3}  # errors only: no librdkafka chatter in CLI output


def ensure_topics(
    cluster: str | dict[str, Any],
    topics: dict[str, int],
    timeout: float = 30.0,
    configs: dict[str, dict[str, str]] | None = None,
) -> None:
    """Create the topics that do not exist yet (name -> partitions), replicated by the
    cluster-size rule of :class:`~tokenaudit.infra.topics.Replication`; existing ones are left alone."""
    config = _config(cluster)
    rule = Replication.for_brokers(check_access(config, timeout))
    admin = AdminClient(config)
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(
            name,
            num_partitions=parts,
            replication_factor=rule.factor,
            config={**rule.topic_configs(), **(configs or {}).get(name, {})},
        )
        for name, parts in topics.items()
        if name not in existing
    ]
    if not new:
        return
    for _name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def delete_topics(cluster: str | dict[str, Any], names: list[str], timeout: float = 30.0) -> None:
    admin = AdminClient(_config(cluster))
    for fut in admin.delete_topics(names, request_timeout=timeout).values():
        try:
            fut.result(timeout)
        except KafkaException:
            pass
