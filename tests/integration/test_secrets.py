"""Secrets stay out of what services show (issue #14): the Debezium connector's config, as
Kafka Connect's REST API returns it, holds a reference to the replication role's password,
resolved by the worker's config provider, and the connector runs with it."""

from __future__ import annotations

import httpx

from tasks.settings import get_settings


def test_the_connector_config_holds_a_reference_not_the_password() -> None:
    s = get_settings()
    url = f"{s.kafka.connect_url}/connectors/{s.kafka.connector_name}"
    config = httpx.get(f"{url}/config", timeout=10).json()
    password = s.postgres.debezium_password.get_secret_value()
    assert config["database.password"] == s.kafka.debezium_password_ref
    assert password not in httpx.get(url, timeout=10).text
    status = httpx.get(f"{url}/status", timeout=10).json()
    assert status["connector"]["state"] == "RUNNING"
    assert [t["state"] for t in status["tasks"]] == ["RUNNING"]
