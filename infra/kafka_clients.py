"""The one place that turns settings into Kafka client configurations.

Every client the project makes takes its bootstrap servers and security settings from here:
confluent-kafka producers, consumers and admin clients (:func:`kafka_config`,
:func:`producer_config`, :func:`admin_config`) and aiokafka through faust
(:func:`faust_options`, :func:`aiokafka_kwargs`). A cluster with TLS or SASL is then
configured once, in the settings, and no client can be left speaking PLAINTEXT.

Defaults for the local cluster: when the settings name the local cluster of this data
directory (``tokenaudit kafka start``), the bootstrap list grows to all of its nodes (so a
client started while node 1 is down still finds the others), and a cluster started with
``--sasl`` lends its client credentials (``<data_dir>/kafka/credentials.json``). Explicit
settings win: a username or password set in the environment replaces the local one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenaudit.errors import KafkaAccessError, KafkaAuthError, KafkaConfigError, KafkaLaunchError
from tokenaudit.infra.kafka_layout import SCRAM_MECHANISM, read_credentials, read_layout

PLAINTEXT = "PLAINTEXT"
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class Security:
    """How a client proves itself to the cluster (and checks the cluster's certificate)."""

    protocol: str = PLAINTEXT
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = field(default=None, repr=False)

    @property
    def sasl(self) -> bool:
        return self.protocol in SASL_PROTOCOLS

    @property
    def tls(self) -> bool:
        return self.protocol in TLS_PROTOCOLS

    def describe(self) -> str:
        """One line for messages, without secrets."""
        if self.sasl:
            return f"{self.protocol} {self.mechanism} as user {self.username!r}"
        return self.protocol

    def librdkafka(self) -> dict[str, str]:
        """Settings for confluent-kafka (librdkafka) clients."""
        conf = {"security.protocol": self.protocol}
        if self.sasl:
            conf.update(
                {
                    "sasl.mechanism": self.mechanism or "",
                    "sasl.username": self.username or "",
                    "sasl.password": self.password or "",
                }
            )
        if self.tls:
            for key, value in (
                ("ssl.ca.location", self.ca_file),
                ("ssl.certificate.location", self.cert_file),
                ("ssl.key.location", self.key_file),
                ("ssl.key.password", self.key_password),
            ):
                if value:
                    conf[key] = str(value)
        return conf

    def ssl_context(self):
        """An ``ssl.SSLContext`` for aiokafka (None without TLS)."""
        if not self.tls:
            return None
        from aiokafka.helpers import create_ssl_context

        return create_ssl_context(
            cafile=str(self.ca_file) if self.ca_file else None,
            certfile=str(self.cert_file) if self.cert_file else None,
            keyfile=str(self.key_file) if self.key_file else None,
            password=self.key_password,
        )

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            kwargs.update(
                sasl_mechanism=self.mechanism, sasl_plain_username=self.username, sasl_plain_password=self.password
            )
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs


# --- from settings -----------------------------------------------------------------------------
def _local_cluster(settings):
    """The local cluster of this data directory, if the settings' bootstrap names it."""
    home = settings.data_dir / "kafka"
    try:
        layout = read_layout(home)
    except KafkaLaunchError:
        return None
    if layout is None:
        return None
    local = {f"127.0.0.1:{settings.kafka_port + i}" for i in range(layout.brokers)}
    local |= {a.replace("127.0.0.1", "localhost") for a in local}
    named = {a.strip() for a in settings.kafka_bootstrap.split(",") if a.strip()}
    return (home, layout) if named and named <= local else None


def bootstrap_servers(settings) -> str:
    """The bootstrap list: the settings', or every node of the local cluster they name."""
    found = _local_cluster(settings)
    if found is None:
        return settings.kafka_bootstrap
    _, layout = found
    return ",".join(f"127.0.0.1:{settings.kafka_port + i}" for i in range(layout.brokers))


def _secret(value) -> str | None:
    return value.get_secret_value() if value is not None else None


def local_cluster_security(users) -> Security:
    """Security towards a local cluster whose SCRAM users are ``users`` (None: no SASL)."""
    if not users:
        return Security()
    client = users["client"]
    return Security("SASL_PLAINTEXT", SCRAM_MECHANISM, client.username, client.password)


def security(settings) -> Security:
    """The security every client uses, from the settings (and the local cluster's defaults)."""
    protocol = settings.kafka_security_protocol
    username, password = settings.kafka_sasl_username or None, _secret(settings.kafka_sasl_password)
    mechanism = settings.kafka_sasl_mechanism
    found = _local_cluster(settings)
    if found is not None and found[1].sasl and protocol in ("", "SASL_PLAINTEXT"):
        local = local_cluster_security(read_credentials(found[0]))
        protocol, mechanism = local.protocol, local.mechanism
        username, password = username or local.username, password or local.password
    protocol = protocol or PLAINTEXT
    if protocol in SASL_PROTOCOLS and not (username and password):
        raise KafkaConfigError(
            f"TOKENAUDIT_KAFKA_SECURITY_PROTOCOL={protocol} needs TOKENAUDIT_KAFKA_SASL_USERNAME "
            "and TOKENAUDIT_KAFKA_SASL_PASSWORD"
        )
    if protocol not in SASL_PROTOCOLS and (username or password):
        raise KafkaConfigError(
            "TOKENAUDIT_KAFKA_SASL_USERNAME/PASSWORD are set but TOKENAUDIT_KAFKA_SECURITY_PROTOCOL "
            f"is {protocol}: set it to SASL_SSL (or SASL_PLAINTEXT) to use them"
        )
    tls = dict(
        ca_file=settings.kafka_ssl_ca_file,
        cert_file=settings.kafka_ssl_cert_file,
        key_file=settings.kafka_ssl_key_file,
        key_password=_secret(settings.kafka_ssl_key_password),
    )
    if protocol in TLS_PROTOCOLS:
        for name, path in tls.items():
            if name != "key_password" and path is not None and not Path(path).is_file():
                raise KafkaConfigError(f"TOKENAUDIT_KAFKA_SSL_{name.upper()}: no such file {str(path)!r}")
        if bool(tls["cert_file"]) != bool(tls["key_file"]):
            raise KafkaConfigError("TOKENAUDIT_KAFKA_SSL_CERT_FILE and TOKENAUDIT_KAFKA_SSL_KEY_FILE go together")
    elif any(tls.values()):
        raise KafkaConfigError(
            f"TOKENAUDIT_KAFKA_SSL_* files are set but TOKENAUDIT_KAFKA_SECURITY_PROTOCOL is "
            f"{protocol}: set it to SSL or SASL_SSL to use them"
        )
    if protocol not in SASL_PROTOCOLS:
        return Security(protocol, **(tls if protocol in TLS_PROTOCOLS else {}))
    return Security(protocol, mechanism, username, password, **(tls if protocol in TLS_PROTOCOLS else {}))


def kafka_config(settings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A confluent-kafka configuration (consumer, producer or admin): bootstrap servers and
    security from the settings, then ``extra``."""
    return {"bootstrap.servers": bootstrap_servers(settings), **security(settings).librdkafka(), **(extra or {})}


def producer_config(settings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A confluent-kafka producer configuration: every write waits for all in-sync replicas
    (with ``min.insync.replicas`` 2 on a cluster of 3, an acknowledged event survives the loss
    of any one broker) and retries cannot duplicate or reorder (idempotence)."""
    return kafka_config(settings, {"acks": "all", "enable.idempotence": True, **(extra or {})})


def admin_config(settings) -> dict[str, Any]:
    """A confluent-kafka AdminClient configuration; librdkafka's own log lines stay out of CLI output."""
    return kafka_config(settings, {"log_level": 3})


def aiokafka_kwargs(settings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka client (bootstrap servers and security)."""
    return {"bootstrap_servers": bootstrap_servers(settings).split(","), **security(settings).aiokafka()}


def faust_options(settings) -> dict[str, Any]:
    """faust App settings that carry the security to its aiokafka consumer, producer and
    admin client, and make its producer wait for all in-sync replicas."""
    import faust

    sec = security(settings)
    options: dict[str, Any] = {"producer_acks": -1}
    if sec.sasl:
        options["broker_credentials"] = faust.SASLCredentials(
            username=sec.username, password=sec.password, mechanism=sec.mechanism, ssl_context=sec.ssl_context()
        )
    elif sec.tls:
        options["broker_credentials"] = faust.SSLCredentials(sec.ssl_context())
    return options


# --- does the cluster let us in? ---------------------------------------------------------------
_AUTH_CODES = (
    "_AUTHENTICATION",
    "SASL_AUTHENTICATION_FAILED",
    "_SSL",
    "TOPIC_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
)


def check_access(config: dict[str, Any], timeout: float = 15.0) -> int:
    """Fetch cluster metadata with ``config``; return the number of brokers listed.

    A refused credential is a :class:`KafkaAuthError` as soon as librdkafka reports it (a
    plain metadata call would just time out), anything else a :class:`KafkaAccessError`
    after ``timeout``; both name the bootstrap and the security in use, never a password."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[KafkaError] = []
    quiet = logging.getLogger("tokenaudit.kafka.access")
    quiet.setLevel(logging.CRITICAL)
    # confluent-kafka's hints allow only scalar config values; the client takes these two objects too
    admin = AdminClient({**config, "error_cb": errors.append, "logger": quiet, "log_level": 0})  # type: ignore[dict-item]
    where = config.get("bootstrap.servers", "?")
    how = config.get("security.protocol", PLAINTEXT)
    if config.get("sasl.username"):
        how += f" {config.get('sasl.mechanism')} as user {config['sasl.username']!r}"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            md = admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            if md.brokers:
                return len(md.brokers)
        except KafkaException as exc:
            last = str(exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc)
        admin.poll(0)  # serves error_cb
        for err in errors:
            if err.name() in _AUTH_CODES or "authentication" in err.str().lower():
                raise KafkaAuthError(
                    f"Kafka at {where} refused this client ({how}): {err.str()}; check "
                    "TOKENAUDIT_KAFKA_SASL_USERNAME / TOKENAUDIT_KAFKA_SASL_PASSWORD "
                    "(and the TLS settings)"
                ) from None
        if errors:
            last = errors[-1].str()
        if time.monotonic() >= deadline:
            break
    hint = (
        ""
        if how != PLAINTEXT
        else "; if the cluster requires TLS or SASL, set TOKENAUDIT_KAFKA_SECURITY_PROTOCOL and its credentials"
    )
    raise KafkaAccessError(f"cannot reach Kafka at {where} ({how}) within {timeout:.0f}s: {last}{hint}")
