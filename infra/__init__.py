"""Operations: the local Kafka broker launcher, ClickHouse access and migrations, the CLI,
and background service management."""
