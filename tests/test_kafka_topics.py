"""The one topic declaration against the session's real broker: every topic created as
declared, and a topic that drifted (the rollups topic as `up` used to create it, with the
delete policy) corrected in place."""

from __future__ import annotations

import time
import uuid

from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.kafka_clients import admin_config
from tokenaudit.infra.topics import _wait_visible, ensure_declared
from tokenaudit.settings import load_settings


def _settings(bootstrap: str, tmp_path):
    tag = f"decl-{uuid.uuid4().hex[:8]}"
    return load_settings(
        data_dir=tmp_path,
        kafka_bootstrap=bootstrap,
        kafka_partitions=3,
        topic_usage=f"{tag}-usage",
        topic_anomalies=f"{tag}-anomalies",
        topic_dlq=f"{tag}-dlq",
        topic_rollups=f"{tag}-rollups",
        topic_sampled=f"{tag}-sampled",
    )


def _describe(settings) -> dict[str, tuple[int, int, str, str]]:
    """topic -> (partitions, replication factor, cleanup.policy, min.insync.replicas)."""
    admin = AdminClient(admin_config(settings))
    names = [
        settings.topic_usage,
        settings.topic_anomalies,
        settings.topic_dlq,
        settings.topic_rollups,
        settings.topic_sampled,
    ]
    md = _wait_visible(admin, set(names), 10)
    out = {}
    for res, fut in admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names]).items():
        conf = fut.result(10)
        parts = md[res.name].partitions
        out[res.name] = (
            len(parts),
            len(parts[0].replicas),
            conf["cleanup.policy"].value,
            conf["min.insync.replicas"].value,
        )
    return out


def test_every_topic_as_declared(kafka_bootstrap, tmp_path):
    s = _settings(kafka_bootstrap, tmp_path)
    ensured = ensure_declared(s)
    assert ensured.brokers == 1 and (ensured.replication.factor, ensured.replication.min_insync) == (1, 1)
    assert len(ensured.created) == 5 and not ensured.corrected
    assert _describe(s) == {
        s.topic_usage: (3, 1, "delete", "1"),
        s.topic_anomalies: (3, 1, "delete", "1"),
        s.topic_dlq: (3, 1, "delete", "1"),
        s.topic_rollups: (3, 1, "compact", "1"),
        s.topic_sampled: (3, 1, "delete", "1"),
    }
    again = ensure_declared(s)
    assert not again.created and not again.corrected, "a second run changes nothing"


def test_rollups_topic_created_with_delete_policy_is_corrected(kafka_bootstrap, tmp_path):
    s = _settings(kafka_bootstrap, tmp_path)
    # what `tokenaudit up` did before the declaration: default policy, and a 1-partition DLQ
    ensure_topics(kafka_bootstrap, {s.topic_rollups: 3, s.topic_dlq: 1})
    _wait_visible(AdminClient(admin_config(s)), {s.topic_rollups}, 10)
    assert _describe_one(s, s.topic_rollups) == "delete"
    ensured = ensure_declared(s)
    assert ensured.corrected == (s.topic_rollups,)
    deadline = time.monotonic() + 15  # the controller applied it; each broker's view follows shortly
    while _describe_one(s, s.topic_rollups) != "compact":
        assert time.monotonic() < deadline, "cleanup.policy was not corrected"
        time.sleep(0.2)
    assert ensured.partitions[s.topic_dlq] == 1, "an existing topic keeps its partitions (keys would move)"


def _describe_one(settings, topic: str) -> str:
    admin = AdminClient(admin_config(settings))
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res])[res].result(10)["cleanup.policy"].value
