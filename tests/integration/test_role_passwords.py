"""Role passwords reach Postgres as SCRAM-SHA-256 verifiers computed by the client, so no
plaintext password is in a statement Postgres could log; logging in with the password works,
for ASCII and for passwords SASLprep normalizes."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tasks.adapters.postgres import scram_verifier
from tasks.settings import get_settings


def test_the_roles_have_scram_verifiers(pg_admin: psycopg.Connection[Any]) -> None:
    cfg = get_settings().postgres
    rows = pg_admin.execute(
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
        ([cfg.app_user, cfg.reader_user, cfg.debezium_user],),
    ).fetchall()
    assert len(rows) == 3
    for name, verifier in rows:
        assert verifier.startswith("SCRAM-SHA-256$4096:"), name


@pytest.mark.parametrize(
    "password",
    [
        "plain-ascii",
        "with space and ' quote",
        "pässwörd ünïcode",
        "\uff26\uff35\uff2c\uff2c\u00a0width",
    ],
    ids=["ascii", "quote", "latin", "nfkc"],
)
def test_a_verifier_set_by_the_client_lets_the_password_in(
    pg_admin: psycopg.Connection[Any], password: str
) -> None:
    cfg = get_settings().postgres
    role = f"cqrs_scram_{uuid.uuid4().hex[:8]}"
    pg_admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(scram_verifier(password))
        )
    )
    pg_admin.commit()
    try:
        with psycopg.connect(
            host=cfg.host, port=cfg.port, dbname=cfg.database, user=role, password=password
        ) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                host=cfg.host, port=cfg.port, dbname=cfg.database, user=role, password="wrong"
            )
    finally:
        pg_admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        pg_admin.commit()
