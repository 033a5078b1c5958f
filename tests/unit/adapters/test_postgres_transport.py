"""Postgres's TLS settings reach every role's connection string and the Debezium connector's
config; a TLS failure is a configuration error that says what was tried (docs/security.md,
"Transport"). The real handshakes are in tests/integration/test_transport.py."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr

from tasks.adapters import postgres
from tasks.adapters.kafka_connect import connector_config
from tasks.core.errors import ConfigurationError, is_transient
from tasks.settings import PostgresSettings, Settings

ROLES = ("admin", "app", "reader", "debezium")
FULL = PostgresSettings(
    sslmode="verify-full",
    sslrootcert="/etc/pg/ca.crt",
    sslcert="/etc/pg/client.crt",
    sslkey="/etc/pg/client.key",
    sslcrl="/etc/pg/crl.pem",
    sslpassword=SecretStr("key-pass"),
)


@pytest.mark.parametrize("role", ROLES)
def test_every_role_gets_the_tls_parameters(role: str) -> None:
    params = conninfo_to_dict(FULL.conninfo(role))
    assert {k: params.get(k) for k in FULL.ssl_params()} == {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/pg/ca.crt",
        "sslcert": "/etc/pg/client.crt",
        "sslkey": "/etc/pg/client.key",
        "sslcrl": "/etc/pg/crl.pem",
        "sslpassword": "key-pass",
    }


def test_the_default_is_prefer_and_no_files() -> None:
    params = conninfo_to_dict(PostgresSettings().conninfo("app"))
    assert params["sslmode"] == "prefer"
    assert not {"sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword"} & set(params)


def test_the_key_passphrase_stays_out_of_reprs() -> None:
    for text in (repr(FULL), str(FULL), FULL.model_dump_json()):
        assert "key-pass" not in text


def test_the_connector_gets_the_same_tls_settings() -> None:
    config = connector_config(Settings(postgres=FULL))
    assert config["database.sslmode"] == "verify-full"
    assert config["database.sslrootcert"] == "/etc/pg/ca.crt"
    assert config["database.sslcert"] == "/etc/pg/client.crt"
    assert config["database.sslkey"] == "/etc/pg/client.key"
    # No secret in a config Kafka Connect's REST API shows.
    assert "key-pass" not in str(config)
    default = connector_config(Settings(postgres=PostgresSettings()))
    assert default["database.sslmode"] == "prefer"
    assert not {"database.sslrootcert", "database.sslcert", "database.sslkey"} & set(default)


@pytest.mark.parametrize(
    "libpq_says",
    [
        'connection to server at "db", port 5432 failed: SSL error: certificate verify failed',
        'root certificate file "/etc/pg/ca.crt" does not exist',
        'server certificate for "db.example" does not match host name "db"',
        "server does not support SSL, but SSL was required",
        'pg_hba.conf rejects connection for host "10.0.0.1", user "cqrs_app", database '
        '"cqrs", no encryption',
    ],
)
def test_a_tls_failure_is_configuration_and_names_the_settings(
    libpq_says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_a: Any, **_k: Any) -> None:
        raise psycopg.OperationalError(libpq_says)

    monkeypatch.setattr(postgres.psycopg, "connect", refuse)
    with pytest.raises(ConfigurationError) as info:
        postgres.connect("app", FULL)
    message = str(info.value)
    assert "as app with sslmode=verify-full, sslrootcert=/etc/pg/ca.crt" in message
    assert libpq_says.split(":")[-1].strip() in message
    assert "key-pass" not in message
    assert not is_transient(info.value)


def test_a_connection_reset_stays_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_k: Any) -> None:
        raise psycopg.OperationalError(
            'connection to server at "db", port 5432 failed: Connection refused'
        )

    monkeypatch.setattr(postgres.psycopg, "connect", refuse)
    with pytest.raises(Exception) as info:
        postgres.connect("app", FULL)
    assert is_transient(info.value)
