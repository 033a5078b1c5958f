"""libpq connection strings are built by psycopg, never by string formatting: a password can
hold any character without changing where the connection goes (issue #14, secrets)."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr

from tasks.settings import PostgresSettings

HOSTILE = [
    "pw host=evil.example port=1",
    "with space",
    "quote ' and backslash \\ end",
    "dbname=postgres",
    "",
]


@pytest.mark.parametrize("password", HOSTILE)
@pytest.mark.parametrize("role", ["admin", "app", "reader", "debezium"])
def test_a_password_is_only_a_password(role: str, password: str) -> None:
    cfg = PostgresSettings(**{f"{role}_password": SecretStr(password)})  # type: ignore[arg-type]
    parsed = conninfo_to_dict(cfg.conninfo(role))
    assert parsed["password"] == password
    assert parsed["host"] == cfg.host
    assert parsed["port"] == str(cfg.port)
    assert parsed["dbname"] == cfg.database
    assert parsed["user"] == getattr(cfg, f"{role}_user")
