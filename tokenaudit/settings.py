"""The one settings module: every knob is a ``TOKENAUDIT_*`` environment variable.

An optional TOML file (``TOKENAUDIT_CONFIG=/path/settings.toml``, keys without the prefix,
lower case) provides defaults that environment variables override. Validation happens once,
at start: a bad value raises :class:`SettingsError` naming the variable and the reason, so a
service never starts half-configured.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tokenaudit.errors import SettingsError

ENV_PREFIX = "TOKENAUDIT_"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenaudit"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenaudit"


class Settings(BaseSettings):
    """All settings with their defaults; the README's settings table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- places ---------------------------------------------------------------------------
    data_dir: Path = Field(default_factory=_default_data_dir, description="State, logs, pid files, spool, chDB store.")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Downloaded Kafka jars (never committed).")

    # --- Kafka ----------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "",
        description="Bootstrap servers, comma separated; default: the local broker (127.0.0.1:<kafka_port>; clients of a local cluster get all its nodes).",
    )
    kafka_version: str = Field("4.4.0", description="Apache Kafka version the launcher fetches and runs.")
    kafka_port: int = Field(
        9092, ge=1, le=65535, description="Local broker's client port (broker i of a local cluster: this + i)."
    )
    kafka_controller_port: int = Field(
        9192,
        ge=1,
        le=65535,
        description="Local broker's KRaft controller port (broker i of a local cluster: this + i; moved from 9093 so 3 brokers' ranges do not overlap, see CHANGELOG).",
    )
    kafka_heap: str = Field(
        "512m", pattern=r"^\d+[kmgKMG]$", description="JVM heap of each local broker (-Xmx and -Xms)."
    )
    kafka_partitions: int = Field(4, ge=1, le=1024, description="Partitions of the topics the project creates.")
    kafka_start_timeout: float = Field(60.0, gt=0, description="Seconds `kafka start` waits for metadata.")
    topic_usage: str = Field("token-usage", min_length=1, description="Token-usage event topic.")
    topic_anomalies: str = Field("token-usage-anomalies", min_length=1, description="Anomaly topic.")
    topic_dlq: str = Field("token-usage-dlq", min_length=1, description="Dead-letter topic.")
    kafka_security_protocol: str = Field(
        "",
        pattern=r"^(|PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
        description="security.protocol of every Kafka client; default PLAINTEXT, or SASL_PLAINTEXT towards a local cluster started with `kafka start --sasl`.",
    )
    kafka_sasl_mechanism: str = Field(
        "SCRAM-SHA-512",
        pattern=r"^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$",
        description="SASL mechanism (with a SASL_* protocol).",
    )
    kafka_sasl_username: str = Field("", description="SASL username; default: the local --sasl cluster's client user.")
    kafka_sasl_password: SecretStr | None = Field(
        None,
        description="SASL password (never logged); default: the local --sasl cluster's, from <data_dir>/kafka/credentials.json.",
    )
    kafka_ssl_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signs the brokers' certificates (SSL, SASL_SSL); default: the system's."
    )
    kafka_ssl_cert_file: Path | None = Field(
        None, description="PEM client certificate, for clusters that require TLS client authentication."
    )
    kafka_ssl_key_file: Path | None = Field(None, description="PEM private key of TOKENAUDIT_KAFKA_SSL_CERT_FILE.")
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted TOKENAUDIT_KAFKA_SSL_KEY_FILE."
    )

    # --- schema registry ------------------------------------------------------------------
    schema_registry_url: str = Field(
        "",
        pattern=r"^(|https?://\S+)$",
        description="An external Confluent-compatible schema registry (Confluent, Apicurio /apis/ccompat/v7, Karapace, Redpanda); the project then leaves it alone. Unset: `up` starts the local Apicurio registry and hands its URL to the services.",
    )
    registry_version: str = Field(
        "3.3.3", description="Apicurio Registry version the launcher fetches from Maven Central and runs."
    )
    registry_port: int = Field(8081, ge=1, le=65535, description="Local registry's HTTP port (127.0.0.1).")
    registry_management_port: int = Field(
        9001,
        ge=1,
        le=65535,
        description="Local registry's management port (health, metrics; 127.0.0.1; Apicurio's own default 0.0.0.0:9000 would clash and be reachable from outside).",
    )
    registry_heap: str = Field("256m", pattern=r"^\d+[kmgKMG]$", description="JVM heap (-Xmx) of the local registry.")
    registry_start_timeout: float = Field(120.0, gt=0, description="Seconds `registry start` waits for it to answer.")
    cloudevents_headers: bool = Field(
        True,
        description="CloudEvents Kafka-binding headers (ce_id, ce_source, ce_type, ce_time, ...) on every event, so routers and tracing tools need not decode; about 1.5-2 us of the request thread's CPU per event (bench/bench_hot_path.py).",
    )
    wire_format: str = Field(
        "auto",
        pattern=r"^(auto|confluent|single-object)$",
        description="What writers put on the Avro topics: `confluent` (magic byte 0, 4-byte registry id; needs a registry), `single-object` (the first release's `C3 01` + fingerprint), or `auto`: confluent when a registry is configured (TOKENAUDIT_SCHEMA_REGISTRY_URL, which `up` sets for the services it starts). Readers accept both, always.",
    )

    # --- ClickHouse -----------------------------------------------------------------------
    clickhouse_dsn: str = Field(
        "", description="chdb:///path (embedded, default <data_dir>/clickhouse) or http(s)://user:pass@host:port."
    )
    clickhouse_database: str = Field("tokenaudit", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Database name.")
    ttl_rollup_days: int = Field(730, ge=0, description="usage_rollup retention in days (0 keeps forever).")
    ttl_sampled_days: int = Field(30, ge=0, description="usage_sampled retention in days (0 keeps forever).")
    ttl_anomalies_days: int = Field(365, ge=0, description="anomalies retention in days (0 keeps forever).")
    ttl_requests_days: int = Field(
        90, ge=0, description="usage_requests (the ledger of every request) retention in days (0 keeps forever)."
    )
    ledger: bool = Field(
        True,
        description="Write the ledger (usage_requests: one row per request, from the token-usage topic); "
        "off keeps rollups and sampled records only.",
    )
    ledger_client_ip: Literal["full", "truncated", "hashed"] = Field(
        "full",
        description="Client IP in the ledger: full, truncated (IPv4 /24, IPv6 /48) or hashed (keyed HMAC-SHA256).",
    )
    ledger_client_ip_secret: str = Field(
        "",
        description="HMAC key for hashed ledger IPs; default: generated once in data_dir (sinks on several hosts "
        "must share one).",
    )
    dedup_retention_days: int = Field(
        7,
        ge=0,
        description="Days usage_rollup keeps a row's event ids (event_ids) after the row was written: a copy of an event arriving up to that much later still counts once (0 keeps them forever).",
    )

    # --- inference ------------------------------------------------------------------------
    model: str = Field(
        "", description="HF TF checkpoint path or name; default <data_dir>/models/t5-tiny (built by `model init`)."
    )
    http_host: str = Field("127.0.0.1", description="Inference app bind address.")
    http_port: int = Field(8000, ge=1, le=65535, description="Inference app port.")
    instance: str = Field(
        "", max_length=128, description="This inference instance's name in events; default <hostname>:<http_port>."
    )
    api_keys_file: Path | None = Field(
        None,
        description="API-key registry (TOML); unset: <data_dir>/api_keys.toml, open (development mode) only while no registry has ever existed.",
    )
    trusted_proxies: str = Field("", description="Comma-separated proxy IPs/CIDRs whose X-Forwarded-For is trusted.")
    prompt_digest_secret: str = Field(
        "", description="HMAC key for prompt digests; default: generated once in data_dir."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest accepted request body (enforced while streaming)."
    )
    max_input_tokens: int = Field(512, ge=8, description="Model input is truncated to this many tokens.")
    max_new_tokens_limit: int = Field(256, ge=1, description="Largest max_new_tokens a request may ask for.")
    default_max_new_tokens: int = Field(16, ge=1, description="max_new_tokens when a request gives none.")
    batch_max_size: int = Field(16, ge=1, le=1024, description="Micro-batch size bound.")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="Micro-batch wait bound in milliseconds.")
    max_queue: int = Field(
        256,
        ge=1,
        description="Most requests waiting for the tokenizer or for a micro-batch (each bound); beyond it a 503 `queue_full` with Retry-After.",
    )
    queue_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest wait in the batch queue; beyond it a 503 `queue_timeout` with Retry-After (the request is not run).",
    )
    tokenizer_threads: int = Field(
        2, ge=1, le=64, description="Threads that tokenize prompts, off the event loop and the model thread."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Also serve /metrics on 127.0.0.1 at this port (0 = off).")
    xla: bool = Field(True, description="XLA-compile generation for padded shape buckets.")
    spool_max_bytes: int = Field(256 << 20, ge=1 << 16, description="Bound of the on-disk event spool.")
    producer_queue_max: int = Field(100_000, ge=100, description="confluent-kafka local queue bound (messages).")
    producer_message_timeout_ms: int = Field(
        15_000, ge=1000, description="Delivery timeout before an event is spooled."
    )
    producer_linger_ms: float = Field(
        100.0,
        ge=0,
        description="Producer linger in ms: fewer, larger produce requests (measured: 5 ms cost the app ~30% throughput on a 2-core box shared with the broker).",
    )
    producer_compression: str = Field(
        "lz4", pattern=r"^(none|gzip|snappy|lz4|zstd)$", description="Producer compression codec."
    )
    spool_dir: Path | None = Field(None, description="Event spool folder; default <data_dir>/spool.")
    spool_unauthenticated_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of TOKENAUDIT_SPOOL_MAX_BYTES that unauthenticated events (401s) may fill; beyond it they are dropped and counted, so a keyless flood during an outage cannot push out paid events.",
    )
    spool_retry_seconds: float = Field(2.0, gt=0, description="How often a spooling producer probes the broker.")
    shutdown_flush_seconds: float = Field(
        10.0, ge=0, description="Producer flush timeout on shutdown; the rest is spooled."
    )
    xla_batch_buckets: str = Field(
        "1,16",
        pattern=r"^\d+(,\d+)*$",
        description="XLA batch-size buckets (clipped to batch_max_size); all compiled before /readyz at the smallest length and new-token bucket, larger shapes on first use.",
    )
    xla_length_buckets: str = Field(
        "64,512", pattern=r"^\d+(,\d+)*$", description="XLA input-length buckets (clipped to max_input_tokens)."
    )
    xla_new_token_buckets: str = Field(
        "16,256", pattern=r"^\d+(,\d+)*$", description="XLA max_new_tokens buckets (clipped to max_new_tokens_limit)."
    )
    audit_exclude_paths: str = Field(
        "/healthz,/readyz,/metrics", description="Paths that get no audit event (probes, scrapes)."
    )

    # --- streams --------------------------------------------------------------------------
    window_seconds: int = Field(60, ge=1, description="Tumbling window length (event time).")
    grace_seconds: int = Field(10, ge=0, description="Grace period before a window is emitted.")
    idle_timeout_seconds: float = Field(
        15.0, gt=0, description="Wall-clock idle time after which open windows are emitted."
    )
    worker_id: str = Field("tokenaudit-worker", min_length=1, description="faust app id / consumer group.")
    worker_web_port: int = Field(6066, ge=1, le=65535, description="faust worker web port (metrics).")
    anomaly_input_tokens: int = Field(
        2048,
        ge=1,
        description="Per-request threshold on the input tokens the client sent (untruncated: the rule sees a "
        "document longer than max_input_tokens at its full length).",
    )
    anomaly_truncated_requests: int = Field(
        0,
        ge=0,
        description="Flag a window with at least this many truncated requests (rule truncated_inputs; 0 = off). "
        "Truncation is always counted per window (`truncated` in rollups and usage reports).",
    )
    anomaly_spike_k: float = Field(4.0, ge=3.0, description="Spike band in robust sigmas above baseline (>= 3).")
    anomaly_spike_min_history: int = Field(5, ge=2, description="Windows of history before spike detection starts.")
    anomaly_spike_floor_tokens: int = Field(5000, ge=0, description="Absolute floor: no spike below this many tokens.")
    anomaly_error_rate: float = Field(0.5, gt=0, le=1, description="Error-rate burst threshold per window.")
    anomaly_error_min_requests: int = Field(
        10, ge=1, description="Minimum requests in a window for the error-rate rule."
    )
    anomaly_latency_factor: float = Field(5.0, gt=1, description="Latency per input token over the model norm, factor.")
    anomaly_new_client_tokens: int = Field(50_000, ge=1, description="Tokens in a never-seen client's first window.")
    sample_fraction: float = Field(0.10, gt=0, le=1, description="Share of requests kept as detailed records.")
    sample_warmup: int = Field(
        200, ge=0, description="Requests per model seen before the top-fraction sampler keeps any."
    )
    late_retention_seconds: int = Field(
        3600,
        ge=0,
        description="Event time a closed window stays in worker state after closing (re-emitted after a crash until its close is committed); later events for it go to the sink as deltas.",
    )
    anomaly_latency_min_requests: int = Field(
        200, ge=1, description="Requests of a model before its latency norm is trusted."
    )
    topic_rollups: str = Field(
        "token-usage-rollups", min_length=1, description="Internal topic: window rollups for the sink."
    )
    topic_sampled: str = Field(
        "token-usage-sampled", min_length=1, description="Internal topic: sampled records for the sink."
    )
    topic_budgets: str = Field("token-usage-budgets", min_length=1, description="Compacted topic: the budgets.")
    topic_spend: str = Field("token-usage-spend", min_length=1, description="Compacted topic: budget spend.")
    budget_period_seconds: int | None = Field(None, ge=1, description="Budget period in seconds (tests, demos).")
    spend_publish_seconds: float = Field(1.0, gt=0, description="Worker's budget spend publish interval.")
    worker_batch_size: int = Field(
        20000,
        ge=1,
        description="Most events the worker takes per batch (one fetch; bigger batches coalesce more changelog writes).",
    )
    worker_batch_seconds: float = Field(
        0.2, gt=0, description="Longest wait of one worker fetch for records (a batch is what one fetch returns)."
    )
    worker_fetch_bytes: int = Field(
        4 << 20,
        ge=64 << 10,
        description="Most bytes one worker fetch takes per partition (faust's 1 MiB default left the worker waiting on fetches for half its time).",
    )
    worker_commit_seconds: float = Field(
        1.0, gt=0, description="Worker offset commit interval (state is flushed first)."
    )
    worker_session_timeout: float = Field(
        10.0, ge=6.0, description="Worker consumer session timeout: how soon a dead worker's partitions move."
    )
    sink_group_id: str = Field("tokenaudit-sink", min_length=1, description="Consumer group of the ClickHouse sink.")
    dedup: bool = Field(
        True,
        description="Count each event_id once: the worker drops copies of an event while its window is open, the sink skips late copies (false only to measure what it costs).",
    )
    max_tokens_per_event: int = Field(
        10_000_000,
        ge=1,
        description="Largest token count an event may carry; an event above it (or below 0) goes to the dead-letter topic.",
    )
    max_clock_skew_seconds: float = Field(
        300.0,
        ge=0,
        description="How far an event's time may be ahead of the worker's clock; a later one goes to the dead-letter topic and never moves a watermark.",
    )

    # --- sinks / queries --------------------------------------------------------------------
    sink_batch_rows: int = Field(5000, ge=1, description="Rows per ClickHouse insert.")
    sink_ledger_batch_rows: int = Field(
        20_000,
        ge=1,
        description="Ledger (usage_requests) rows per ClickHouse insert (about 1.3 kB of sink memory each while batched): fewer, larger parts cost ClickHouse less per row (bench/bench_ledger.py).",
    )
    sink_batch_seconds: float = Field(1.0, gt=0, description="Longest wait before a partial batch is inserted.")
    daily_rollup_seconds: float = Field(
        60.0,
        ge=0,
        description="How often the sink builds the daily pre-aggregate of usage_rollup (settled days whose rows have not changed for that long; long report ranges read whole days from it); 0 turns it off and reports read every window.",
    )
    sink_shutdown_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a stopping sink keeps retrying its last batch while ClickHouse is unreachable; then it exits without committing it (replayed on the next start).",
    )
    usage_api_host: str = Field("127.0.0.1", description="Read-only usage API bind address.")
    usage_api_port: int = Field(8001, ge=1, le=65535, description="Read-only usage API port.")
    usage_api_shutdown_seconds: int = Field(
        5,
        ge=1,  # whole seconds: uvicorn's graceful-shutdown timeout
        description="How long a stopping usage API (or the sink serving it) lets requests in flight finish before it cancels them; an open dashboard's live anomaly stream never finishes by itself.",
    )
    sink_port: int = Field(
        8002,
        ge=1,
        le=65535,
        description="The sink's own listener (GET /healthz, GET /metrics; on TOKENAUDIT_USAGE_API_HOST) when it runs without the usage API: `tokenaudit sink --no-api`, what `up` starts for a ClickHouse server beside `tokenaudit api`. A sink serving the API (the embedded store) answers both on the API's port.",
    )
    price_table: Path | None = Field(None, description="TOML price table for `report` (per model, per 1K tokens).")
    api_key: str = Field(
        "", description="Key the CLI sends to the usage API; default: <data_dir>/admin.key (written by `up`)."
    )
    anomaly_group_id: str = Field(
        "tokenaudit-anomaly-follow",
        min_length=1,
        description="Consumer group of `anomalies --follow` (offsets commit after delivery).",
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, description="Per-attempt timeout of an anomaly webhook POST.")
    webhook_backoff_max_seconds: float = Field(
        30.0, gt=0, description="Longest pause between webhook retries (exponential backoff)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_bootstrap(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("kafka_bootstrap"):
            data = {**data, "kafka_bootstrap": f"127.0.0.1:{data.get('kafka_port') or 9092}"}
        return data

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for part in value.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        if self.kafka_port == self.kafka_controller_port:
            raise ValueError("TOKENAUDIT_KAFKA_PORT and TOKENAUDIT_KAFKA_CONTROLLER_PORT must differ")
        if self.registry_port == self.registry_management_port:
            raise ValueError("TOKENAUDIT_REGISTRY_PORT and TOKENAUDIT_REGISTRY_MANAGEMENT_PORT must differ")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get(ENV_PREFIX + "CONFIG")
        if toml_path:
            if not Path(toml_path).is_file():
                raise SettingsError(f"{ENV_PREFIX}CONFIG: no such file {toml_path!r}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    # --- derived --------------------------------------------------------------------------
    @property
    def writes_confluent(self) -> bool:
        """Whether writers frame records in the Confluent wire format (see ``wire_format``)."""
        if self.wire_format == "auto":
            return bool(self.schema_registry_url)
        return self.wire_format == "confluent"

    @property
    def effective_clickhouse_dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def effective_model(self) -> str:
        return self.model or str(self.data_dir / "models" / "t5-tiny")

    @property
    def effective_instance(self) -> str:
        if self.instance:
            return self.instance
        import socket

        return f"{socket.gethostname()}:{self.http_port}"

    @property
    def effective_spool_dir(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def default_api_keys_file(self) -> Path:
        """Where `keys add` writes when TOKENAUDIT_API_KEYS_FILE is unset."""
        return self.api_keys_file or self.data_dir / "api_keys.toml"

    @property
    def effective_api_keys_file(self) -> Path | None:
        """The registry file in force now: the configured one, else the default one if it exists
        (None: none yet). Services follow the registry through ``KeyRegistry.from_settings``,
        which also fails closed once one has existed."""
        if self.api_keys_file:
            return self.api_keys_file
        default = self.data_dir / "api_keys.toml"
        return default if default.is_file() else None

    @property
    def embedded_clickhouse(self) -> bool:
        return self.effective_clickhouse_dsn.startswith("chdb://")

    @property
    def run_dir(self) -> Path:
        """Pid files of background services."""
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and TOML), turning validation errors into one line each."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) if err["loc"] else ""
            name = f"{ENV_PREFIX}{loc.upper()}" if loc else "settings"
            lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("; ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()


def settings_table_markdown() -> str:
    """The README's settings table, generated so it cannot drift from this class."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        if info.default_factory is not None:
            default = {"data_dir": "`~/.local/share/tokenaudit`", "cache_dir": "`~/.cache/tokenaudit`"}.get(
                name, "(computed)"
            )
        else:
            default = f"`{info.default}`" if info.default not in (None, "") else "(unset)"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {default} | {info.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # `python -m tokenaudit.settings` prints the table
    print(settings_table_markdown())  # noqa: T201 (its output is the point)
