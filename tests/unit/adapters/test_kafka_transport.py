"""Kafka's transport and authentication settings reach every client config the code builds
(consumer, producer, admin; the CDC consumer and its dead-letter producer), librdkafka
accepts them, and the SASL password stays out of reprs (docs/security.md, "Transport")."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr, ValidationError

from tasks.adapters import kafka
from tasks.cdc import consumer as cdc_consumer
from tasks.cdc import dead_letters
from tasks.cdc.options import CdcOptions
from tasks.core.errors import ConfigurationError
from tasks.settings import KafkaSettings

PASSWORD = "s3cret-sasl-pw"
SASL_SSL = KafkaSettings(
    bootstrap_servers="127.0.0.1:1",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-256",
    sasl_username="cqrs-sync",
    sasl_password=SecretStr(PASSWORD),
    ssl_ca_location="/etc/kafka/ca.pem",
    ssl_certificate_location="/etc/kafka/client.pem",
    ssl_key_location="/etc/kafka/client.key",
    ssl_key_password=SecretStr("key-pw"),
)
EXPECTED = {
    "bootstrap.servers": "127.0.0.1:1",
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-256",
    "sasl.username": "cqrs-sync",
    "sasl.password": PASSWORD,
    "ssl.ca.location": "/etc/kafka/ca.pem",
    "ssl.certificate.location": "/etc/kafka/client.pem",
    "ssl.key.location": "/etc/kafka/client.key",
    "ssl.key.password": "key-pw",
    "ssl.endpoint.identification.algorithm": "https",
}


@pytest.mark.parametrize(
    "build", [kafka.client_config, kafka.consumer_config, kafka.producer_config, kafka.admin_config]
)
def test_every_config_carries_the_transport(build: Any) -> None:
    config = build(SASL_SSL)
    assert {k: config.get(k) for k in EXPECTED} == EXPECTED


def test_overrides_keep_the_transport() -> None:
    config = kafka.consumer_config(SASL_SSL, **{"group.id": "other"})
    assert config["group.id"] == "other"
    assert config["security.protocol"] == "SASL_SSL"


def test_plaintext_is_the_default_and_sends_no_credentials() -> None:
    config = kafka.client_config(KafkaSettings())
    assert config == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}


def test_ssl_without_sasl_and_without_hostname_check() -> None:
    cfg = KafkaSettings(security_protocol="SSL", ssl_check_hostname=False)
    config = kafka.client_config(cfg)
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert not any(k.startswith("sasl.") for k in config)
    assert "ssl.ca.location" not in config  # the system's CAs


def test_sasl_needs_credentials() -> None:
    with pytest.raises(ValidationError, match="CQRS_KAFKA_SASL_USERNAME"):
        KafkaSettings(security_protocol="SASL_SSL")
    # model_copy skips validation: the config builder checks again.
    copied = KafkaSettings().model_copy(update={"security_protocol": "SASL_SSL"})
    with pytest.raises(ConfigurationError, match="SASL username and password"):
        kafka.client_config(copied)


def test_secrets_stay_out_of_reprs() -> None:
    for text in (repr(SASL_SSL), str(SASL_SSL), SASL_SSL.model_dump_json()):
        assert PASSWORD not in text
        assert "key-pw" not in text


def test_librdkafka_accepts_the_config() -> None:
    """A typo in a property name or value fails when the client is created."""
    cfg = SASL_SSL.model_copy(
        update={
            "ssl_ca_location": None,
            "ssl_certificate_location": None,
            "ssl_key_location": None,
            "ssl_key_password": None,
        }
    )
    producer = Producer(kafka.producer_config(cfg, log_level=0, error_cb=lambda _e: None))
    producer.flush(0)


class Captured:
    """Stands in for a confluent-kafka client class: records the config it is given."""

    configs: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        type(self).configs.append(config)

    def close(self) -> None:
        pass


class Consumers(Captured):
    pass


class Producers(Captured):
    pass


class Admins(Captured):
    pass


def test_the_cdc_consumer_and_its_dead_letter_producer_get_the_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for fake in (Consumers, Producers, Admins):
        monkeypatch.setattr(fake, "configs", [])
    monkeypatch.setattr(cdc_consumer, "Consumer", Consumers)
    monkeypatch.setattr(dead_letters, "Producer", Producers)
    monkeypatch.setattr(kafka, "AdminClient", Admins)
    cdc_consumer.CdcConsumer(object(), CdcOptions(), SASL_SSL)  # type: ignore[arg-type]
    kafka.admin(SASL_SSL)
    for built in (Consumers.configs, Producers.configs, Admins.configs):
        assert len(built) == 1
        assert {k: built[0].get(k) for k in EXPECTED} == EXPECTED


def test_the_consumers_fetch_wait_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kafka.consumer_config(KafkaSettings())["fetch.wait.max.ms"] == 10
    monkeypatch.setenv("CQRS_KAFKA_FETCH_WAIT_MAX_MS", "100")
    assert kafka.consumer_config(KafkaSettings())["fetch.wait.max.ms"] == 100
    with pytest.raises(ValidationError):
        KafkaSettings(fetch_wait_max_ms=0)
