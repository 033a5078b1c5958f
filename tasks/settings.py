"""Typed settings, read from the environment (prefix ``CQRS_``) with defaults that match the
local stack, so the same code points at a remote ScyllaDB cluster, Kafka and Postgres.

Secrets are ``SecretStr``: they never print in logs, reprs or Prefect parameters. In a
Prefect deployment they may instead come from Secret blocks (see ``secret_or_env``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from cassandra import ConsistencyLevel
from psycopg.conninfo import make_conninfo
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# libpq's sslmode values (docs/security.md, "Transport").
PgSslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class PostgresSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRS_PG_")

    # The write model's server and database.
    host: str = "127.0.0.1"
    port: int = 54329
    database: str = "cqrs"
    # Roles (least privilege): admin applies migrations; app writes the write model; reader
    # snapshots and audits; debezium replicates. Passwords: set them in production.
    admin_user: str = "postgres"
    admin_password: SecretStr = SecretStr("postgres-local")
    app_user: str = "cqrs_app"
    app_password: SecretStr = SecretStr("app-local")
    reader_user: str = "cqrs_reader"
    reader_password: SecretStr = SecretStr("reader-local")
    debezium_user: str = "cqrs_debezium"
    debezium_password: SecretStr = SecretStr("debezium-local")
    slot_name: str = "cqrs_sync"  # Debezium's logical replication slot
    publication_name: str = "cqrs_sync"  # the tables Debezium publishes
    # Transport (docs/security.md, "Transport"): libpq's TLS settings, for every role's
    # connection and the Debezium connector's (database.ssl*). prefer encrypts when the
    # server offers TLS but verifies nothing; production sets verify-full and sslrootcert.
    sslmode: PgSslMode = "prefer"
    sslrootcert: str | None = None  # the CA (PEM) that signs the server's certificate
    sslcert: str | None = None  # a client certificate (PEM), when the server asks for one
    sslkey: str | None = None  # its key (the connector's: a format the JDBC driver reads)
    sslcrl: str | None = None  # revoked certificates (PEM; libpq's clients only)
    # The passphrase of an encrypted sslkey (libpq's clients only: the connector is given
    # no secret in its config, so its key file is unencrypted and the worker's alone).
    sslpassword: SecretStr | None = None

    def conninfo(self, role: str = "app") -> str:
        """A libpq connection string for one of the roles: admin, app, reader, debezium."""
        user, password = {
            "admin": (self.admin_user, self.admin_password),
            "app": (self.app_user, self.app_password),
            "reader": (self.reader_user, self.reader_password),
            "debezium": (self.debezium_user, self.debezium_password),
        }[role]
        # make_conninfo quotes every value: a password holding " host=elsewhere" stays a
        # password, and a space in it cannot split it into a part shown in an error.
        return make_conninfo(
            host=self.host,
            port=self.port,
            dbname=self.database,
            user=user,
            password=password.get_secret_value(),
            application_name="cqrs-sync",
            **self.ssl_params(),
        )

    def ssl_params(self) -> dict[str, str]:
        """libpq's TLS parameters from the settings (unset files left out)."""
        params = {
            "sslmode": self.sslmode,
            "sslrootcert": self.sslrootcert,
            "sslcert": self.sslcert,
            "sslkey": self.sslkey,
            "sslcrl": self.sslcrl,
            "sslpassword": self.sslpassword.get_secret_value() if self.sslpassword else None,
        }
        return {k: v for k, v in params.items() if v is not None}


def _single_node_replication() -> dict[str, str | int]:
    return {"class": "SimpleStrategy", "replication_factor": 1}


class ScyllaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRS_SCYLLA_", populate_by_name=True)

    # The cluster (a JSON list of hosts), its CQL port, and the read models' keyspace.
    contact_points: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    port: int = 9042
    keyspace: str = "cqrs"
    # Replication for the keyspace the migration creates; production passes e.g.
    # {"class": "NetworkTopologyStrategy", "dc1": 3}.
    replication: dict[str, str | int] = Field(default_factory=lambda: _single_node_replication())
    local_dc: str | None = None  # the data center to route to (token-aware, DC-aware)
    # Authentication, when the cluster requires it (both or neither).
    username: str | None = None
    password: SecretStr | None = None
    # TLS to the nodes (docs/security.md, "Transport"), for every session of the code.
    ssl: bool = False
    ssl_ca_file: str | None = None  # the nodes' CA (PEM); default: the system's
    ssl_certfile: str | None = None  # a client certificate (PEM), when the nodes require one
    ssl_keyfile: str | None = None  # its key (PEM)
    # Whether a node's address must match its certificate (as an IP or DNS SAN).
    ssl_check_hostname: bool = True
    request_timeout_s: float = 10.0  # per request, before the driver gives up
    # Writes in flight at once from one process (execute_concurrent's window).
    concurrency: int = 64
    # Rows per UNLOGGED batch of writes that share their replicas (CDC and backfill); 1 sends
    # one request per row. Batches stay under batch_max_bytes of mutation data as the server
    # counts it (Cassandra warns above 5 KiB per batch, fails above 50 KiB; ScyllaDB warns
    # above 128 KiB); a row larger than that is sent alone, as a plain statement. With small
    # rows the bytes bind first: each request costs the client far more than each row in it,
    # so batches are filled to the bytes (docs/decisions.md, "Batches as full as the server
    # allows"). CQRS_SCYLLA_BATCH_ROWS, its former name, is still read.
    replica_batch_rows: int = Field(
        default=100,
        ge=1,
        le=500,
        validation_alias=AliasChoices("CQRS_SCYLLA_REPLICA_BATCH_ROWS", "CQRS_SCYLLA_BATCH_ROWS"),
    )
    batch_max_bytes: int = Field(default=5000, ge=100, le=40_000)  # see replica_batch_rows
    # Consistency levels (names of cassandra.ConsistencyLevel). QUORUM in the local DC for
    # both: a write acknowledged by a majority of the replicas is seen by any later
    # majority read, so a user reads their own dual-written message whichever replica
    # answers (at replication factor 3, ONE could read a replica the write has not reached).
    write_consistency: str = "LOCAL_QUORUM"
    read_consistency: str = "LOCAL_QUORUM"

    @field_validator("write_consistency", "read_consistency")
    @classmethod
    def _consistency_name(cls, value: str, info: ValidationInfo) -> str:
        name = value.strip().upper()
        # SERIAL levels are for lightweight transactions only; ANY accepts a write no
        # replica holds yet (a hint) and cannot serve a read.
        invalid = {"SERIAL", "LOCAL_SERIAL"} | (
            {"ANY"} if info.field_name == "read_consistency" else set()
        )
        if name not in ConsistencyLevel.name_to_value or name in invalid:
            allowed = sorted(set(ConsistencyLevel.name_to_value) - invalid)
            raise ValueError(f"{value!r} is not a consistency level for this; one of {allowed}")
        return name

    @model_validator(mode="after")
    def _credentials_and_tls(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both CQRS_SCYLLA_USERNAME and CQRS_SCYLLA_PASSWORD, or neither")
        tls_files = (self.ssl_ca_file, self.ssl_certfile, self.ssl_keyfile)
        if not self.ssl and any(f is not None for f in tls_files):
            raise ValueError("TLS files are set but CQRS_SCYLLA_SSL is not true")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("CQRS_SCYLLA_SSL_KEYFILE needs CQRS_SCYLLA_SSL_CERTFILE")
        return self

    @property
    def write_consistency_level(self) -> int:
        return int(ConsistencyLevel.name_to_value[self.write_consistency])

    @property
    def read_consistency_level(self) -> int:
        return int(ConsistencyLevel.name_to_value[self.read_consistency])


def _local_stack_jars() -> str:
    # `make up` resolves cassandra-all and its dependencies here; elsewhere, point
    # CQRS_SSTABLE_CLASSPATH at the same set (infra/maven/cassandra/pom.xml resolves them).
    return str(Path(__file__).resolve().parent.parent / ".stack" / "jars" / "cassandra") + "/*"


class SSTableSettings(BaseSettings):
    """The backfill's "sstable" load method (Apache Cassandra targets; see
    tasks/adapters/sstable.py)."""

    model_config = SettingsConfigDict(env_prefix="CQRS_SSTABLE_")

    # The Java 17+ that runs the SSTable writer (default: $JAVA_HOME/bin/java, else java),
    # and the cassandra-all jars it needs (default: the local stack's).
    java: str = Field(
        default_factory=lambda: (
            str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
            if os.environ.get("JAVA_HOME")
            else "java"
        )
    )
    classpath: str = Field(default_factory=_local_stack_jars)  # see java
    storage_port: int = 7000  # the cluster's internode port, which streaming uses
    heap: str = "512m"  # the JVM's heap, fixed: its memory does not grow with the snapshot
    # Rows each SSTable writer buffers before it writes an SSTable in the background.
    buffer_mib: int = Field(default=32, ge=1, le=1024)
    cache_dir: str = "~/.cache/cqrs-sync"  # the JVM half, compiled once per version
    # A chunk's stream that has not finished after this long is abandoned (and retried).
    stream_timeout_s: float = Field(default=3600.0, gt=0)
    work_dir: str | None = None  # where chunks' SSTables wait to be streamed (default: TMPDIR)


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRS_KAFKA_")

    bootstrap_servers: str = "127.0.0.1:9092"  # Kafka's brokers
    topic_prefix: str = "cqrs"  # Debezium's topic.prefix: topics are <prefix>.public.<table>
    consumer_group: str = "cqrs-sync-cdc"  # the CDC consumers' group: scale out by members
    dead_letter_topic: str = "cqrs.dlq"  # changes that cannot be decoded or written
    # Partitions of each change topic and of the dead-letter topic: at most this many CDC
    # members of one group get work. flows.setup creates the topics with it and grows
    # existing ones to it (never shrinks them; docs/operations.md, "Scaling out CDC").
    topic_partitions: int = Field(default=3, ge=1, le=10_000)
    topic_replication_factor: int = Field(default=1, ge=1, le=16)  # for topics it creates
    # How long the group waits for a member that stopped without leaving it (a crash, kill -9)
    # before its partitions move to the others: librdkafka's session.timeout.ms, its default.
    session_timeout_ms: int = Field(default=45_000, ge=6_000, le=300_000)
    # The CDC consumer's librdkafka fetch.wait.max.ms: how long the broker holds a fetch that
    # finds nothing new. Each empty fetch costs the broker and the consumer CPU: at rest, 10 ms
    # costs Kafka about 0.08 of a core and the consumer 0.014, 100 ms 0.03 and 0.004; but p99
    # at 200 events/s rose from 106-129 ms to 154-166 ms (docs/operations.md, "Idle cost and
    # latency").
    fetch_wait_max_ms: int = Field(default=10, ge=1, le=5_000)
    connect_url: str = "http://127.0.0.1:8083"  # Kafka Connect's REST API
    # How the Debezium connector's config names the replication role's password: a
    # reference Kafka Connect resolves with a config provider of its worker (env or file),
    # so the password itself is never in the connector config its REST API returns. The
    # worker needs that provider and the value (docs/operations.md, "Secrets").
    debezium_password_ref: str = "${env:CQRS_PG_DEBEZIUM_PASSWORD}"
    # Debezium's poll.interval.ms: how long its task sleeps while no change is queued. It
    # trades idle CPU for latency (docs/operations.md, "Idle cost and latency": 5 ms keeps
    # p50 at 18 ms at 200 events/s and costs Connect 0.19 of a core at rest; 50 ms, 63 ms
    # and 0.03).
    debezium_poll_interval_ms: int = Field(default=5, ge=1, le=60_000)
    connector_name: str = "cqrs-postgres"  # the Debezium connector's name there
    # Transport and authentication of every client this code builds (librdkafka's names;
    # docs/security.md, "Transport"); SASL_SSL in production. Kafka Connect's own
    # connections are its worker's configuration.
    security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    sasl_mechanism: KafkaSaslMechanism = "SCRAM-SHA-512"  # for the SASL_* protocols
    sasl_username: str | None = None  # required by the SASL_* protocols
    sasl_password: SecretStr | None = None  # required by the SASL_* protocols
    ssl_ca_location: str | None = None  # the brokers' CA (PEM); default: the system's
    # A client certificate and key (PEM), when the brokers authenticate clients by TLS.
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    # Check the broker's host name against its certificate (ssl.endpoint.identification).
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _sasl_credentials(self) -> Self:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs CQRS_KAFKA_SASL_USERNAME "
                f"and CQRS_KAFKA_SASL_PASSWORD"
            )
        return self

    def topic(self, table: str) -> str:
        return f"{self.topic_prefix}.public.{table}"


class AuditSettings(BaseSettings):
    """The audit and reconcile paths (flows/audit.py, flows/reconcile.py): how the comparison
    is bucketed, where reports go, and the thresholds past which an audit fails."""

    model_config = SettingsConfigDict(env_prefix="CQRS_AUDIT_")

    # Rows per checksum bucket on average: smaller buckets make the drill-down of a mismatch
    # cheaper and the bucket lists longer (docs/decisions.md, "The audit buckets by token").
    rows_per_bucket: int = Field(default=16, ge=1, le=1_000_000)
    max_bucket_bits: int = Field(default=18, ge=1, le=24)  # at most 2^18 buckets per model
    # Read models diffed at once (each with its own Postgres connection).
    parallel_read_models: int = Field(default=2, ge=1, le=16)
    # Token ranges scanned at once per read model, and rows per page of each.
    scan_concurrency: int = Field(default=4, ge=1, le=256)
    fetch_size: int = Field(default=2000, ge=100, le=100_000)
    # A difference whose source changed this recently is re-checked once before it counts
    # as drift; None derives it from the consumer's lag (3x the oldest unconsumed
    # change's age, at least min_freshness_window_s).
    freshness_window_s: float | None = Field(default=None, ge=0)
    min_freshness_window_s: float = Field(default=2.0, ge=0)
    max_freshness_window_s: float = Field(default=120.0, ge=0)
    # Rows of each read model validated by its expectation suite, sampled by partition.
    quality_sample_partitions: int = Field(default=200, ge=0, le=100_000)
    quality_sample_rows: int = Field(default=20_000, ge=0, le=1_000_000)
    report_dir: str = ".stack/data/audits"  # one folder per audit run: report, Data Docs
    # Thresholds: an audit over any of them fails (a Failed state and a Prefect event).
    max_differences: int = Field(default=0, ge=0)
    # Also the CDC run's limit: over it, it raises cqrs.cdc.slot-lag once (tasks/cdc/slot_watch).
    max_slot_lag_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    max_slot_lag_s: float = Field(default=300.0, ge=0)
    max_consumer_lag: int = Field(default=100_000, ge=0)  # messages, all partitions
    max_consumer_lag_s: float = Field(default=300.0, ge=0)
    max_dead_letters: int = Field(default=0, ge=0)
    # Reconcile: keys repaired per run at most (the rest waits for the next run).
    reconcile_max_keys: int = Field(default=10_000, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRS_")

    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    scylla: ScyllaSettings = Field(default_factory=ScyllaSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    sstable: SSTableSettings = Field(default_factory=SSTableSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    prefect_api_url: str = "http://127.0.0.1:4200/api"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
