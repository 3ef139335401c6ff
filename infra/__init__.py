"""The platform every service stands on: the local Kafka launcher, client configuration and the
topic declaration, the ClickHouse connection, store and migrations, the API-key registry, and
process supervision (``up``/``down``, which starts the services by command line only). Imports
none of the services."""
