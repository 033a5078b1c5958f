"""Kafka adapter: topic creation and client configs (confluent-kafka)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from tasks.core.catalog import SOURCE_TABLES
from tasks.core.errors import ConfigurationError, ServiceUnavailable, TransientError, classify
from tasks.settings import KafkaSettings


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """What every client of this code needs to reach the brokers: their addresses and the
    transport and authentication settings (docs/security.md, "Transport"). The consumer,
    producer and admin configs below start from it, so no client can miss them."""
    cfg = settings
    config: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap_servers,
        "security.protocol": cfg.security_protocol,
    }
    if cfg.security_protocol.startswith("SASL_"):
        # The settings' validator checks this too, but model_copy(update=...) skips it.
        if cfg.sasl_username is None or cfg.sasl_password is None:
            raise ConfigurationError(
                f"Kafka's security_protocol {cfg.security_protocol} needs a SASL username "
                f"and password (CQRS_KAFKA_SASL_USERNAME, CQRS_KAFKA_SASL_PASSWORD)"
            )
        config |= {
            "sasl.mechanism": cfg.sasl_mechanism,
            "sasl.username": cfg.sasl_username,
            "sasl.password": cfg.sasl_password.get_secret_value(),
        }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if cfg.ssl_check_hostname else "none"
        )
        optional = {
            "ssl.ca.location": cfg.ssl_ca_location,
            "ssl.certificate.location": cfg.ssl_certificate_location,
            "ssl.key.location": cfg.ssl_key_location,
            "ssl.key.password": (
                cfg.ssl_key_password.get_secret_value() if cfg.ssl_key_password else None
            ),
        }
        config |= {k: v for k, v in optional.items() if v is not None}
    return config


def admin_config(settings: KafkaSettings, /, **overrides: Any) -> dict[str, Any]:
    return {**client_config(settings), **overrides}


def admin(settings: KafkaSettings) -> AdminClient:
    return AdminClient(admin_config(settings))


def change_topics(settings: KafkaSettings) -> list[str]:
    return [settings.topic(t) for t in SOURCE_TABLES]


def ensure_topics(
    settings: KafkaSettings,
    partitions: int | None = None,
    replication_factor: int | None = None,
) -> list[str]:
    """Create the change topics and the dead-letter topic if missing; returns those created.
    Partitions are the unit of scale for the CDC consumer group; records are keyed by primary
    key, so every change of one row stays in order within one partition. ``partitions`` and
    ``replication_factor`` default to the settings' ``topic_partitions`` and
    ``topic_replication_factor``."""
    cfg = settings
    partitions = cfg.topic_partitions if partitions is None else partitions
    replicas = cfg.topic_replication_factor if replication_factor is None else replication_factor
    client = admin(cfg)
    existing = set(_topic_partitions(client, cfg))
    wanted = [*change_topics(cfg), cfg.dead_letter_topic]
    new = [
        NewTopic(t, num_partitions=partitions, replication_factor=replicas)
        for t in wanted
        if t not in existing
    ]
    created = []
    for topic, fut in client.create_topics(new).items() if new else []:
        try:
            fut.result()
            created.append(topic)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise classify(exc, f"creating topic {topic}") from exc
    return created


def grow_partitions(settings: KafkaSettings, partitions: int | None = None) -> dict[str, int]:
    """Give every existing change topic and the dead-letter topic ``partitions`` (default:
    the settings' ``topic_partitions``) if it has fewer; returns {topic: partitions before}
    of those grown. Kafka cannot take partitions away, so a topic with more keeps them.

    Growing moves some keys to other partitions: a row's changes published before and after
    may then be applied by different members, out of order. That is safe here because every
    write carries the source version as its timestamp (docs/operations.md, "Scaling out
    CDC"), but it is why this runs only from flows.setup, on request of the setting."""
    cfg = settings
    partitions = cfg.topic_partitions if partitions is None else partitions
    client = admin(cfg)
    counts = _topic_partitions(client, cfg)
    smaller = {
        t: n
        for t in [*change_topics(cfg), cfg.dead_letter_topic]
        if (n := counts.get(t)) is not None and n < partitions
    }
    if not smaller:
        return {}
    futures = client.create_partitions([NewPartitions(t, partitions) for t in smaller])
    for topic, fut in futures.items():
        try:
            fut.result()
        except KafkaException as exc:
            raise classify(exc, f"growing topic {topic} to {partitions} partitions") from exc
    return smaller


def _topic_partitions(client: AdminClient, cfg: KafkaSettings) -> dict[str, int]:
    """Every topic on the cluster and its partition count."""
    try:
        topics = client.list_topics(timeout=10).topics
    except KafkaException as exc:
        error = classify(exc, f"listing topics on {cfg.bootstrap_servers}")
        if isinstance(error, TransientError):
            raise ServiceUnavailable("Kafka", f"{cfg.bootstrap_servers}: {exc}") from exc
        raise error from exc
    return {name: len(meta.partitions) for name, meta in topics.items()}


def consumer_config(settings: KafkaSettings, /, **overrides: Any) -> dict[str, Any]:
    """A consumer of ``settings.consumer_group`` (``overrides`` win, e.g. another group.id)."""
    cfg = settings
    return {
        **client_config(cfg),
        "group.id": cfg.consumer_group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Rebalances move partitions one at a time instead of stopping the whole group.
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": cfg.session_timeout_ms,
        "fetch.wait.max.ms": cfg.fetch_wait_max_ms,  # CQRS_KAFKA_FETCH_WAIT_MAX_MS
        # Bound the prefetch queue (librdkafka's default is 64 MiB): memory stays flat
        # however far behind the consumer is.
        "queued.max.messages.kbytes": 8192,
        "max.poll.interval.ms": 300000,
        **overrides,
    }


def producer_config(settings: KafkaSettings, /, **overrides: Any) -> dict[str, Any]:
    cfg = settings
    return {
        **client_config(cfg),
        "enable.idempotence": True,
        "linger.ms": 5,
        **overrides,
    }
