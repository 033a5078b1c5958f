"""TLS on the real stack (docs/security.md, "Transport"): `make up` serves TLS from Postgres
and, optionally, from Cassandra's CQL port with a certificate its own CA signs
(infra/tls.py). With sslmode=verify-full and that CA, every role's connection and the
Debezium connector's walsender are encrypted and verified; a wrong CA, and an unencrypted
client where pg_hba wants TLS, are refused with an error that names the problem. A session
from tasks.adapters.scylla with TLS on reads the read models over TLS."""

from __future__ import annotations

import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cassandra.cluster import Session
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr

from infra import tls
from infra.postgres import TLS_CONF, sync_tls, tls_conf_text
from tasks.adapters import postgres, scylla
from tasks.adapters.kafka_connect import KafkaConnectClient, connector_config, register_connector
from tasks.core.errors import ConfigurationError, is_transient
from tasks.settings import PostgresSettings, Settings, get_settings

ROLES = ("admin", "app", "reader", "debezium")
# The role pg_hba lets in over TLS only (infra/conf/pg_hba.conf); created and dropped here.
PROBE_ROLE = "cqrs_tls_probe"


def verified(pg: PostgresSettings, ca: Path = tls.CA_CERT) -> PostgresSettings:
    return pg.model_copy(update={"sslmode": "verify-full", "sslrootcert": str(ca)})


def ssl_of(conn: psycopg.Connection[Any], pid: int | None = None) -> tuple[bool, str | None]:
    row = conn.execute(
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = coalesce(%s, pg_backend_pid())",
        (pid,),
    ).fetchone()
    assert row is not None
    return bool(row[0]), row[1]


def test_the_cluster_serves_tls_with_the_stacks_certificate(
    pg_admin: psycopg.Connection[Any],
) -> None:
    settings = {
        name: value
        for name, value in pg_admin.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('ssl', 'ssl_cert_file', 'ssl_key_file', 'ssl_min_protocol_version')"
        ).fetchall()
    }
    assert settings == {
        "ssl": "on",
        "ssl_cert_file": str(tls.SERVER_CERT),
        "ssl_key_file": str(tls.SERVER_KEY),
        "ssl_min_protocol_version": "TLSv1.2",
    }
    for path in tls.FILES:
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert tls.TLS_DIR.stat().st_mode & 0o777 == 0o700


def test_syncing_tls_is_idempotent(tmp_path: Path) -> None:
    """What `make up` does to a data dir from before TLS: the include, once; the settings
    file, mode 0600; nothing more the second time."""
    conf = tmp_path / "postgresql.conf"
    conf.write_text("# initdb's\nmax_connections = 100\n")
    assert sync_tls(tmp_path) is True
    assert (tmp_path / TLS_CONF).read_text() == tls_conf_text()
    assert (tmp_path / TLS_CONF).stat().st_mode & 0o777 == 0o600
    assert conf.read_text().splitlines().count(f"include_if_exists = '{TLS_CONF}'") == 1
    assert sync_tls(tmp_path) is False


@pytest.mark.parametrize("role", ROLES)
def test_every_role_connects_encrypted_and_verified(role: str) -> None:
    pg = verified(get_settings().postgres)
    # The settings reach the connection string every connection of the code is opened with.
    params = conninfo_to_dict(pg.conninfo(role))
    assert params["sslmode"] == "verify-full"
    assert params["sslrootcert"] == str(tls.CA_CERT)
    with postgres.connect(role, pg, autocommit=True) as conn:
        assert conn.info.get_parameters()["sslmode"] == "verify-full"
        assert conn.pgconn.ssl_in_use
        encrypted, version = ssl_of(conn)
        assert encrypted, f"{role}'s connection is not encrypted"
        assert version in ("TLSv1.2", "TLSv1.3")


@pytest.fixture()
def wrong_ca(tmp_path: Path) -> Path:
    """A CA that did not sign the server's certificate."""
    ca = tmp_path / "other-ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(tmp_path / "other-ca.key"), "-out", str(ca), "-days", "1",
         "-subj", "/CN=not the stack's CA"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return ca


def test_a_wrong_ca_fails_verify_full_and_says_why(wrong_ca: Path) -> None:
    pg = verified(get_settings().postgres, ca=wrong_ca)
    with pytest.raises(ConfigurationError) as info:
        postgres.connect("app", pg)
    message = str(info.value)
    assert "certificate verify failed" in message
    assert f"127.0.0.1:{pg.port} as app with sslmode=verify-full" in message
    assert f"sslrootcert={wrong_ca}" in message
    assert pg.app_password.get_secret_value() not in message
    assert not is_transient(info.value)  # no retry fixes a certificate


def test_a_missing_ca_file_says_which(tmp_path: Path) -> None:
    pg = verified(get_settings().postgres, ca=tmp_path / "absent.crt")
    with pytest.raises(ConfigurationError, match=r"absent\.crt"):
        postgres.connect("reader", pg)


@pytest.fixture()
def probe_role(pg_admin: psycopg.Connection[Any]) -> Iterator[str]:
    password = "probe-local"
    pg_admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(PROBE_ROLE), sql.Literal(postgres.scram_verifier(password))
        )
    )
    pg_admin.commit()
    try:
        yield password
    finally:
        pg_admin.rollback()
        pg_admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(PROBE_ROLE)))
        pg_admin.commit()


def test_pg_hba_hostssl_refuses_a_client_that_does_not_encrypt(probe_role: str) -> None:
    as_probe = get_settings().postgres.model_copy(
        update={"app_user": PROBE_ROLE, "app_password": SecretStr(probe_role)}
    )
    with pytest.raises(ConfigurationError) as info:
        postgres.connect("app", as_probe.model_copy(update={"sslmode": "disable"}))
    assert "pg_hba.conf rejects connection" in str(info.value)
    assert "no encryption" in str(info.value)
    assert "sslmode=disable" in str(info.value)
    with postgres.connect("app", verified(as_probe), autocommit=True) as conn:
        assert ssl_of(conn)[0]
        assert conn.execute("SELECT current_user").fetchone() == (PROBE_ROLE,)


def _walsender(admin: psycopg.Connection[Any], slot: str) -> tuple[int, bool, str] | None:
    """The slot's walsender: pid, whether its connection is encrypted, its role."""
    row = admin.execute(
        """SELECT r.pid, s.ssl, r.usename FROM pg_replication_slots slot
             JOIN pg_stat_replication r ON r.pid = slot.active_pid
             JOIN pg_stat_ssl s ON s.pid = r.pid
            WHERE slot.slot_name = %s""",
        (slot,),
    ).fetchone()
    return (int(row[0]), bool(row[1]), str(row[2])) if row else None


def _wait_walsender(
    admin: psycopg.Connection[Any], slot: str, other_than: int | None, timeout: float = 90.0
) -> tuple[int, bool, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _walsender(admin, slot)
        if found is not None and found[0] != other_than:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no new walsender on slot {slot} after {timeout:.0f}s")


def _stored_config(client: KafkaConnectClient, name: str) -> dict[str, str]:
    """The config Kafka Connect holds (it answers 409 while its group rebalances)."""
    deadline = time.monotonic() + 30
    while True:
        resp = client.http.get(f"/connectors/{name}/config")
        if resp.status_code == 200 or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            config: dict[str, str] = resp.json()
            config.pop("name", None)
            return config
        time.sleep(0.5)


@pytest.mark.solo  # re-registers the shared connector with TLS, then restores it
def test_the_connector_replicates_over_verified_tls(wrong_ca: Path) -> None:
    base = get_settings()
    pg_tls = verified(base.postgres)
    settings: Settings = base.model_copy(update={"postgres": pg_tls})
    config = connector_config(settings)
    assert config["database.sslmode"] == "verify-full"
    assert config["database.sslrootcert"] == str(tls.CA_CERT)
    name = base.kafka.connector_name
    client = KafkaConnectClient(base.kafka.connect_url)
    original = _stored_config(client, name)
    # A CA that did not sign the server's certificate: Debezium's validation connects and
    # refuses the config before it is applied, so the running connector is untouched.
    wrong = base.model_copy(update={"postgres": verified(base.postgres, ca=wrong_ca)})
    with pytest.raises(ConfigurationError, match=r"database\.hostname: .*SSL error"):
        register_connector(wrong)
    with postgres.connect("admin", base.postgres, autocommit=True) as admin:
        before = _walsender(admin, base.postgres.slot_name)
        try:
            register_connector(settings)
            stored = _stored_config(client, name)
            assert stored["database.sslmode"] == "verify-full"
            assert stored["database.sslrootcert"] == str(tls.CA_CERT)
            pid, encrypted, role = _wait_walsender(
                admin, base.postgres.slot_name, before[0] if before else None
            )
            assert role == base.postgres.debezium_user
            assert encrypted, "the connector's walsender is not encrypted"
            # Its SQL connection (the heartbeat's) too: every session of the role.
            sessions = admin.execute(
                """SELECT a.pid, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                    WHERE a.usename = %s AND a.pid <> %s""",
                (base.postgres.debezium_user, pid),
            ).fetchall()
            assert all(ssl for _pid, ssl in sessions), sessions
        finally:
            tls_walsender = _walsender(admin, base.postgres.slot_name)
            client.put_config(name, original)
            client.wait_running(name, timeout=60)
            _wait_walsender(admin, base.postgres.slot_name, tls_walsender and tls_walsender[0])
            assert _stored_config(client, name) == original


def test_a_tls_session_reads_the_read_models(cql: Session) -> None:
    """Cassandra accepts TLS on its CQL port beside plaintext (client_encryption_options,
    optional: true); a session of the adapter with CQRS_SCYLLA_SSL and the stack's CA
    verifies the node (its address, 127.0.0.1, is in the certificate) and reads."""
    base = get_settings().scylla
    cfg = base.model_copy(update={"ssl": True, "ssl_ca_file": str(tls.CA_CERT)})
    assert scylla.cluster_kwargs(cfg)["ssl_context"] is not None
    session_id = uuid.uuid4()
    cql.execute(
        "INSERT INTO sessions_by_id (session_id, title) VALUES (%s, %s)", (session_id, "tls")
    )
    try:
        with scylla.session(cfg, cfg.keyspace) as session:
            row = session.execute(
                "SELECT title FROM sessions_by_id WHERE session_id = %s", (session_id,)
            ).one()
            assert row is not None and row.title == "tls"
            sock = session.cluster.control_connection._connection._socket
            assert isinstance(sock, ssl.SSLSocket)
            port = sock.getsockname()[1]
            # The node's view of that connection.
            clients = cql.execute(
                "SELECT port, ssl_enabled, ssl_protocol FROM system_views.clients"
            ).all()
            mine = [c for c in clients if c.port == port]
            assert mine and mine[0].ssl_enabled, clients
            assert mine[0].ssl_protocol in ("TLSv1.2", "TLSv1.3")
    finally:
        cql.execute("DELETE FROM sessions_by_id WHERE session_id = %s", (session_id,))


def test_a_tls_session_with_a_wrong_ca_is_refused(wrong_ca: Path) -> None:
    base = get_settings().scylla
    cfg = base.model_copy(update={"ssl": True, "ssl_ca_file": str(wrong_ca)})
    with pytest.raises(ConfigurationError) as info:
        scylla.connect(cfg)
    assert "certificate verify failed" in str(info.value)
    assert f"ssl_ca_file={wrong_ca}" in str(info.value)
    assert not is_transient(info.value)
