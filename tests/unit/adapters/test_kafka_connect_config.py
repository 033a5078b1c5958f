"""The Debezium connector's config from the settings (no Kafka Connect needed)."""

from __future__ import annotations

from tasks.adapters.kafka_connect import connector_config
from tasks.settings import KafkaSettings, Settings


def test_the_poll_interval_comes_from_the_settings() -> None:
    assert connector_config(Settings())["poll.interval.ms"] == "5"
    slow = Settings(kafka=KafkaSettings(debezium_poll_interval_ms=50))
    assert connector_config(slow)["poll.interval.ms"] == "50"
