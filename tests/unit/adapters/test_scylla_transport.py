"""Scylla's TLS and authentication settings reach the driver's ``Cluster`` (built here, never
connected): an ``ssl.SSLContext`` that verifies the nodes with the configured CA, a client
certificate when set, and PlainTextAuthProvider (docs/security.md, "Transport")."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster
from pydantic import SecretStr, ValidationError

from infra import tls
from tasks.adapters import scylla, sstable_setup
from tasks.core.errors import ConfigurationError
from tasks.settings import ScyllaSettings


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls") / "certs"
    tls.ensure_certificates(None, directory)
    return directory


def tls_settings(certs: Path, **extra: Any) -> ScyllaSettings:
    return ScyllaSettings(
        username="reader",
        password=SecretStr("cql-pw"),
        ssl=True,
        ssl_ca_file=str(certs / "ca.crt"),
        **extra,
    )


def test_tls_and_credentials_reach_the_cluster(certs: Path) -> None:
    kwargs = scylla.cluster_kwargs(tls_settings(certs))
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    subjects = [str(ca.get("subject")) for ca in context.get_ca_certs()]
    assert any("cqrs-sync local stack CA" in subject for subject in subjects), subjects
    auth = kwargs["auth_provider"]
    assert isinstance(auth, PlainTextAuthProvider)
    assert (auth.username, auth.password) == ("reader", "cql-pw")
    # The driver takes them as they are (a Cluster connects only on connect()).
    cluster = Cluster(**kwargs)
    try:
        assert cluster.ssl_context is context
        assert cluster.auth_provider is auth
    finally:
        cluster.shutdown()


def test_connect_builds_its_cluster_from_them(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[dict[str, Any]] = []

    class FakeCluster:
        def __init__(self, **kwargs: Any) -> None:
            built.append(kwargs)

        def connect(self, keyspace: str | None = None) -> str:
            return "session"

    monkeypatch.setattr(scylla, "Cluster", FakeCluster)
    assert scylla.connect(tls_settings(certs)) == "session"
    assert isinstance(built[0]["ssl_context"], ssl.SSLContext)
    assert isinstance(built[0]["auth_provider"], PlainTextAuthProvider)


def test_a_certificate_that_does_not_verify_is_configuration(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class RefusingCluster:
        def __init__(self, **_kwargs: Any) -> None:
            pass

        def connect(self, keyspace: str | None = None) -> None:
            raise OSError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(scylla, "Cluster", RefusingCluster)
    with pytest.raises(ConfigurationError) as info:
        scylla.connect(tls_settings(certs))
    assert f"ssl_ca_file={certs / 'ca.crt'}" in str(info.value)
    assert "cql-pw" not in str(info.value)


def test_a_client_certificate_and_no_hostname_check(certs: Path) -> None:
    cfg = tls_settings(
        certs,
        ssl_certfile=str(certs / "server.crt"),
        ssl_keyfile=str(certs / "server.key"),
        ssl_check_hostname=False,
    )
    context = scylla.ssl_context(cfg)
    assert context is not None
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED  # still verifies the certificate


def test_no_tls_and_no_credentials_by_default() -> None:
    kwargs = scylla.cluster_kwargs(ScyllaSettings())
    assert kwargs["ssl_context"] is None
    assert kwargs["auth_provider"] is None


def test_an_unusable_ca_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(ConfigurationError, match=r"absent\.pem"):
        scylla.ssl_context(ScyllaSettings(ssl=True, ssl_ca_file=str(missing)))


def test_settings_refuse_half_configurations() -> None:
    with pytest.raises(ValidationError, match="both"):
        ScyllaSettings(username="only-a-name")
    with pytest.raises(ValidationError, match="CQRS_SCYLLA_SSL is not true"):
        ScyllaSettings(ssl_ca_file="/etc/ca.pem")
    with pytest.raises(ValidationError, match="needs CQRS_SCYLLA_SSL_CERTFILE"):
        ScyllaSettings(ssl=True, ssl_keyfile="/etc/client.key")


def test_the_password_stays_out_of_reprs(certs: Path) -> None:
    cfg = tls_settings(certs)
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert "cql-pw" not in text


def test_the_sstable_method_refuses_a_tls_cluster(certs: Path) -> None:
    """Its JVM would connect and stream without TLS (docs/security.md, "Transport")."""
    cluster = Cluster(**scylla.cluster_kwargs(tls_settings(certs)))
    try:
        fake_session = SimpleNamespace(cluster=cluster)
        with pytest.raises(ConfigurationError, match="does not support TLS"):
            sstable_setup.check_target(fake_session)  # type: ignore[arg-type]
    finally:
        cluster.shutdown()
