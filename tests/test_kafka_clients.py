"""Client configurations from settings (infra/kafka_clients.py) and the local cluster's
shape checks: pure logic over settings and files, no broker."""

from __future__ import annotations

import json
import ssl

import pytest

from tokenaudit.infra import kafka_clients
from tokenaudit.infra.kafka_clients import KafkaConfigError
from tokenaudit.infra.kafka_cluster import ClusterConfig, KafkaCluster, KafkaLaunchError, check_port_ranges
from tokenaudit.infra.topics import COMPACT, Replication, declared_topics
from tokenaudit.settings import load_settings


def _local_cluster(data_dir, brokers: int, sasl: bool, formatted: bool = True) -> None:
    """The files `kafka start --brokers N [--sasl]` leaves in the data dir."""
    home = data_dir / "kafka"
    home.mkdir(parents=True)
    (home / "cluster.json").write_text(json.dumps({"brokers": brokers, "sasl": sasl, "cluster_id": "x"}))
    if formatted:
        storage = (home / "broker-1" if brokers > 1 else home) / "storage"
        storage.mkdir(parents=True)
        (storage / "meta.properties").write_text("cluster.id=x\nnode.id=1\n")
    if sasl:
        (home / "credentials.json").write_text(
            json.dumps(
                {
                    "mechanism": "SCRAM-SHA-512",
                    "users": {
                        "broker": {"username": "broker", "password": "b-secret"},
                        "client": {"username": "tokenaudit", "password": "c-secret"},
                    },
                }
            )
        )


def test_plaintext_by_default(tmp_path):
    s = load_settings(data_dir=tmp_path, kafka_bootstrap="k1:9092,k2:9092")
    assert kafka_clients.kafka_config(s, {"group.id": "g"}) == {
        "bootstrap.servers": "k1:9092,k2:9092",
        "security.protocol": "PLAINTEXT",
        "group.id": "g",
    }
    assert kafka_clients.producer_config(s)["acks"] == "all"
    assert kafka_clients.producer_config(s)["enable.idempotence"] is True
    assert kafka_clients.aiokafka_kwargs(s) == {
        "bootstrap_servers": ["k1:9092", "k2:9092"],
        "security_protocol": "PLAINTEXT",
    }
    assert kafka_clients.faust_options(s) == {"producer_acks": -1}


def test_explicit_sasl_ssl_reaches_every_client_kind(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = load_settings(
        data_dir=tmp_path,
        kafka_bootstrap="k1:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="svc",
        kafka_sasl_password="pw",
        kafka_ssl_ca_file=ca,
    )
    conf = kafka_clients.kafka_config(s)
    assert conf == {
        "bootstrap.servers": "k1:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "svc",
        "sasl.password": "pw",
        "ssl.ca.location": str(ca),
    }
    sec = kafka_clients.security(s)
    assert "pw" not in repr(sec) and "pw" not in sec.describe()
    # aiokafka / faust get the same, with an SSL context built from the CA (a real one needs a
    # real certificate: the placeholder above must be refused by the ssl module itself)
    with pytest.raises(ssl.SSLError):
        kafka_clients.aiokafka_kwargs(s)


def test_tls_context_from_the_system_store(tmp_path):
    s = load_settings(
        data_dir=tmp_path,
        kafka_bootstrap="k1:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="svc",
        kafka_sasl_password="pw",
    )
    kwargs = kafka_clients.aiokafka_kwargs(s)
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("svc", "pw")
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    creds = kafka_clients.faust_options(s)["broker_credentials"]
    assert (creds.username, creds.password, creds.mechanism.value, creds.protocol.value) == (
        "svc",
        "pw",
        "SCRAM-SHA-512",
        "SASL_SSL",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs TOKENAUDIT_KAFKA_SASL_USERNAME"),
        ({"kafka_sasl_username": "u", "kafka_sasl_password": "p"}, "set it to SASL_SSL"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/no/such/ca.pem"}, "TOKENAUDIT_KAFKA_SSL_CA_FILE"),
        ({"kafka_ssl_ca_file": "/etc/hostname"}, "set it to SSL or SASL_SSL"),
    ],
)
def test_contradictory_settings_name_the_variables(tmp_path, overrides, message):
    s = load_settings(data_dir=tmp_path, kafka_bootstrap="k1:9092", **overrides)
    with pytest.raises(KafkaConfigError, match=message):
        kafka_clients.kafka_config(s)


def test_local_sasl_cluster_lends_its_credentials_and_all_its_nodes(tmp_path):
    _local_cluster(tmp_path, brokers=3, sasl=True)
    s = load_settings(data_dir=tmp_path, kafka_port=29092)
    conf = kafka_clients.kafka_config(s)
    assert conf["bootstrap.servers"] == "127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094"
    assert (conf["security.protocol"], conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-512",
        "tokenaudit",
        "c-secret",
    )
    # an explicit password wins (how a wrong one is tested), the local user stays
    wrong = load_settings(data_dir=tmp_path, kafka_port=29092, kafka_sasl_password="wrong")
    assert kafka_clients.kafka_config(wrong)["sasl.password"] == "wrong"
    # another cluster gets nothing of the local one
    other = load_settings(data_dir=tmp_path, kafka_port=29092, kafka_bootstrap="remote:9092")
    assert kafka_clients.kafka_config(other) == {"bootstrap.servers": "remote:9092", "security.protocol": "PLAINTEXT"}


def test_local_plain_cluster_is_plaintext(tmp_path):
    _local_cluster(tmp_path, brokers=3, sasl=False)
    s = load_settings(data_dir=tmp_path, kafka_port=29092, kafka_bootstrap="127.0.0.1:29093")
    assert kafka_clients.kafka_config(s)["security.protocol"] == "PLAINTEXT"
    assert kafka_clients.bootstrap_servers(s).count(",") == 2


def test_port_ranges_that_overlap_are_refused():
    check_port_ranges(9092, 9192, 3)
    check_port_ranges(9092, 9093, 1)
    with pytest.raises(KafkaLaunchError, match=r"9092-9094 .* 9093-9095 .* overlap"):
        check_port_ranges(9092, 9093, 3)
    with pytest.raises(KafkaLaunchError, match="above 65535"):
        check_port_ranges(65534, 9192, 3)
    s = load_settings()
    assert (s.kafka_port, s.kafka_controller_port) == (9092, 9192), "the defaults do not overlap for 3 brokers"


def test_an_existing_cluster_keeps_its_shape(tmp_path):
    _local_cluster(tmp_path, brokers=3, sasl=True)
    config = ClusterConfig(home=tmp_path / "kafka", cache_dir=tmp_path, port=29092, controller_port=29192)
    cluster = KafkaCluster(config)
    assert (cluster.size, cluster.sasl, cluster.bootstrap.count(",")) == (3, True, 2)
    assert [n.config.node_id for n in cluster.nodes()] == [1, 2, 3]
    assert cluster.nodes()[2].config.quorum == "1@127.0.0.1:29192,2@127.0.0.1:29193,3@127.0.0.1:29194"
    with pytest.raises(KafkaLaunchError, match="created as 3 brokers with SASL; it cannot become 1 broker"):
        KafkaCluster(ClusterConfig(home=tmp_path / "kafka", cache_dir=tmp_path, brokers=1))
    with pytest.raises(KafkaLaunchError, match="cannot become 3 brokers in place"):
        KafkaCluster(ClusterConfig(home=tmp_path / "kafka", cache_dir=tmp_path, sasl=False))


def test_a_shape_recorded_by_a_start_that_formatted_nothing_can_change(tmp_path):
    _local_cluster(tmp_path, brokers=3, sasl=True, formatted=False)
    cluster = KafkaCluster(ClusterConfig(home=tmp_path / "kafka", cache_dir=tmp_path, brokers=1))
    assert (cluster.size, cluster.sasl) == (1, False)


def test_replication_rule_and_declaration():
    assert [Replication.for_brokers(n) for n in (1, 2, 3, 5)] == [
        Replication(1, 1),
        Replication(2, 1),
        Replication(3, 2),
        Replication(3, 2),
    ]
    s = load_settings(kafka_partitions=6)
    specs = {t.role: t for t in declared_topics(s)}
    assert set(specs) == {"usage", "anomalies", "dlq", "rollups", "sampled", "budgets", "spend"}
    assert {specs[r].partitions for r in ("usage", "anomalies", "dlq", "rollups", "sampled")} == {6}, "the DLQ too"
    assert {specs[r].partitions for r in ("budgets", "spend")} == {1}, "read whole by every process"
    assert [r for r, t in specs.items() if t.cleanup_policy == COMPACT] == ["rollups", "budgets", "spend"]
    assert specs["usage"].name == s.topic_usage and specs["rollups"].name == s.topic_rollups
