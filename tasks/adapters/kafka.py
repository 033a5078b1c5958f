"""Kafka adapter: topic creation and client configs (confluent-kafka)."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

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
    settings: KafkaSettings, partitions: int = 3, replication_factor: int = 1
) -> list[str]:
    """Create the change topics and the dead-letter topic if missing; returns those created.
    Partitions are the unit of scale for the CDC consumer group; records are keyed by primary
    key, so every change of one row stays in order within one partition."""
    cfg = settings
    client = admin(cfg)
    try:
        existing = set(client.list_topics(timeout=10).topics)
    except KafkaException as exc:
        error = classify(exc, f"listing topics on {cfg.bootstrap_servers}")
        if isinstance(error, TransientError):
            raise ServiceUnavailable("Kafka", f"{cfg.bootstrap_servers}: {exc}") from exc
        raise error from exc
    wanted = [*change_topics(cfg), cfg.dead_letter_topic]
    new = [
        NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
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
        "fetch.wait.max.ms": 10,
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
