"""The one declaration of the project's Kafka topics, and the code that makes a cluster match it.

`tokenaudit up`, the stream worker, the sink and the inference app's publisher all create
topics through :func:`ensure_declared` (or, for the publisher, which knows only its own
topic, :func:`ensure_specs` with :func:`usage_topic`), so a topic has the same partitions,
replication and cleanup policy whichever process happens to create it first. Before this
module, `up` created the rollups topic with the default delete policy and the DLQ with one
partition while the worker intended compaction and n partitions.

Replication is read from the cluster, never configured: ``min(3, brokers listed in its
metadata)``, with ``min.insync.replicas`` 2 from 3 brokers (so an acknowledged write with
``acks=all`` is on two brokers and survives the loss of any one). External clusters are
counted the same way. faust's own topics (table changelogs, its leader topic) get the same
rule through :func:`replication` (``topic_replication_factor``, the table's topic configs).

Existing topics are not re-partitioned (that would move keys between partitions) or
re-replicated (that needs a reassignment an operator should plan), but a drifted cleanup
policy is corrected in place and a ``min.insync.replicas`` below the rule is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokenaudit.infra import kafka_clients
from tokenaudit.schemas import ANOMALY, BUDGET, EVENT, ROLLUP, SAMPLED, SPEND

log = logging.getLogger(__name__)

DELETE = "delete"
COMPACT = "compact"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    role: str  # usage | anomalies | dlq | rollups | sampled | budgets | spend
    partitions: int
    cleanup_policy: str  # delete | compact
    key: str  # what the record key holds
    value: str  # what the record value holds
    record: str = ""  # the Avro record on the topic (schemas.codec name; registry subject "<topic>-value"), if any


@dataclass(frozen=True)
class Replication:
    factor: int
    min_insync: int

    @classmethod
    def for_brokers(cls, brokers: int) -> Replication:
        return cls(factor=max(1, min(3, brokers)), min_insync=2 if brokers >= 3 else 1)

    def topic_configs(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_insync)}


AVRO = "Avro: Confluent wire format (registry subject <topic>-value) or single-object encoding"


def usage_topic(name: str, partitions: int) -> TopicSpec:
    return TopicSpec(
        name, "usage", partitions, DELETE, "client_id (UTF-8)", f"token_usage_event, {AVRO}; CloudEvents headers", EVENT
    )


def declared_topics(settings) -> list[TopicSpec]:
    """Every topic the project reads or writes, with its settings (names from the settings)."""
    n = settings.kafka_partitions
    return [
        usage_topic(settings.topic_usage, n),
        TopicSpec(settings.topic_anomalies, "anomalies", n, DELETE, "client_id", f"anomaly, {AVRO}", ANOMALY),
        TopicSpec(
            settings.topic_dlq,
            "dlq",
            n,
            DELETE,
            "the source record's key",
            "the source record's bytes; headers: reason, source_topic, source_partition, source_offset",
        ),
        # One key per window: compaction keeps each window's latest version, so the topic
        # stays a complete, bounded picture of every window the sink must hold.
        TopicSpec(
            settings.topic_rollups,
            "rollups",
            n,
            COMPACT,
            "client_id \\x1f model \\x1f window_start (epoch ms)",
            f"usage_rollup, {AVRO}",
            ROLLUP,
        ),
        TopicSpec(settings.topic_sampled, "sampled", n, DELETE, "client_id", f"sampled_record, {AVRO}", SAMPLED),
        # Budgets and spend are small and read whole by every process: one partition each, and
        # compaction keeps each key's latest value (a budget's tombstone removes it).
        TopicSpec(
            settings.topic_budgets,
            "budgets",
            1,
            COMPACT,
            "scope \\x1f scope_id",
            f"budget, {AVRO}; a tombstone removes the budget",
            BUDGET,
        ),
        TopicSpec(
            settings.topic_spend,
            "spend",
            1,
            COMPACT,
            "scope \\x1f scope_id \\x1f usage-topic partition",
            f"budget_spend, {AVRO}",
            SPEND,
        ),
    ]


def topic_configs(spec: TopicSpec, replication: Replication) -> dict[str, str]:
    return {"cleanup.policy": spec.cleanup_policy, **replication.topic_configs()}


@dataclass(frozen=True)
class Ensured:
    brokers: int
    replication: Replication
    partitions: dict[str, int]  # topic -> partitions it has (existing topics keep theirs)
    created: tuple[str, ...]
    corrected: tuple[str, ...]


def replication(settings, timeout: float = 30.0) -> Replication:
    """The replication rule for the cluster the settings name (one metadata request)."""
    return Replication.for_brokers(kafka_clients.check_access(kafka_clients.admin_config(settings), timeout))


def ensure_declared(settings, roles: Iterable[str] | None = None, timeout: float = 30.0) -> Ensured:
    """Create the declared topics (all, or those of ``roles``) that are missing; correct drift."""
    wanted = set(roles) if roles is not None else None
    specs = [s for s in declared_topics(settings) if wanted is None or s.role in wanted]
    return ensure_specs(kafka_clients.admin_config(settings), specs, timeout)


def ensure_specs(config: dict[str, Any], specs: list[TopicSpec], timeout: float = 30.0) -> Ensured:
    """Make the cluster reached with ``config`` (a confluent-kafka admin configuration) hold
    ``specs``: create the missing topics, correct the cleanup policy and raise a low
    ``min.insync.replicas`` of existing ones."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    brokers = kafka_clients.check_access(config, timeout)
    rule = Replication.for_brokers(brokers)
    admin = AdminClient({**config, "log_level": 3})  # errors only: no librdkafka chatter in CLI output
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=rule.factor, config=topic_configs(s, rule))
        for s in specs
        if s.name not in existing
    ]
    created = []
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result(timeout)
                created.append(name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
                existing.add(name)  # another process created it a moment ago: check it like the rest
    metadata = _wait_visible(admin, {s.name for s in specs}, timeout)
    corrected = _correct_drift(admin, [s for s in specs if s.name in existing], metadata, brokers, timeout)
    partitions = {s.name: len(metadata[s.name].partitions) for s in specs}
    return Ensured(brokers, rule, partitions, tuple(created), tuple(corrected))


def _wait_visible(admin, names: set[str], timeout: float):
    """Topic metadata once every topic in ``names`` is listed with its partitions (a topic
    just created reaches the brokers' metadata a moment after the controller said yes)."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        if all(n in topics and topics[n].error is None and topics[n].partitions for n in names):
            return topics
        if time.monotonic() > deadline:
            missing = sorted(n for n in names if n not in topics or topics[n].error is not None)
            raise kafka_clients.KafkaAccessError(f"topics {missing} did not appear in the cluster's metadata")
        time.sleep(0.2)


def _correct_drift(admin, specs: list[TopicSpec], metadata, brokers: int, timeout: float) -> list[str]:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    if not specs:
        return []
    resources = {s.name: ConfigResource(ResourceType.TOPIC, s.name) for s in specs}
    current = {}
    for res, fut in admin.describe_configs(list(resources.values()), request_timeout=timeout).items():
        current[res.name] = {k: v.value for k, v in fut.result(timeout).items()}
    corrected = []
    for spec in specs:
        have = current.get(spec.name, {})
        parts = metadata[spec.name].partitions
        topic_rf = min((len(p.replicas) for p in parts.values()), default=1)
        want_isr = Replication.for_brokers(min(brokers, topic_rf)).min_insync
        changes = []
        if have.get("cleanup.policy") != spec.cleanup_policy:
            changes.append(
                ConfigEntry("cleanup.policy", spec.cleanup_policy, incremental_operation=AlterConfigOpType.SET)
            )
        if int(have.get("min.insync.replicas") or 1) < want_isr:
            changes.append(
                ConfigEntry("min.insync.replicas", str(want_isr), incremental_operation=AlterConfigOpType.SET)
            )
        if topic_rf < Replication.for_brokers(brokers).factor:
            log.warning(
                "topic %s has replication factor %d on a cluster of %d brokers; raising it needs a "
                "partition reassignment (kafka-reassign-partitions)",
                spec.name,
                topic_rf,
                brokers,
            )
        if not changes:
            continue
        res = ConfigResource(ResourceType.TOPIC, spec.name, incremental_configs=changes)
        for fut in admin.incremental_alter_configs([res], request_timeout=timeout).values():
            fut.result(timeout)
        log.warning(
            "topic %s drifted from its declaration: set %s",
            spec.name,
            ", ".join(f"{c.name}={c.value}" for c in changes),
        )
        corrected.append(spec.name)
    return corrected
