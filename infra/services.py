"""The services of the local stack: how each starts, stops and proves itself healthy
(PostgreSQL's functions are in infra/postgres.py).

Start order: what nothing ``needs`` first, all at once, then the rest (infra/stack.py).
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra import tls
from infra.postgres import pg_healthy, pg_start, pg_stop
from infra.processes import (
    CASSANDRA_JMX_PORT,
    CASSANDRA_PORT,
    CASSANDRA_STORAGE_PORT,
    CONF,
    CONNECT_PORT,
    DATA,
    HOST,
    INFRA,
    JARS,
    KAFKA_CONTROLLER_PORT,
    KAFKA_PORT,
    LOGS,
    PG_PORT,
    PREFECT_PORT,
    STACK,
    StackError,
    java17,
    port_open,
    resolve_jars,
    run,
    say,
    spawn,
)


@dataclass
class Service:
    name: str
    ports: list[int]
    endpoint: str
    start: Callable[[], None]
    healthy: Callable[[], bool]
    startup_timeout: float = 180.0
    stop: Callable[[int], None] | None = None
    needs: list[str] = field(default_factory=list)


# -- Kafka


def _log4j2(name: str) -> Path:
    path = CONF / f"log4j2-{name}.properties"
    path.write_text((INFRA / "conf" / "log4j2.properties").read_text())
    return path


def kafka_cluster_id() -> str:
    """A random Kafka cluster id that never starts with "-".

    The id is 16 random bytes in URL-safe base64, so one in 64 would start with "-", which
    kafka-storage's argument parser takes for an option (a CI run failed that way). Kafka's
    own Uuid.randomUuid() avoids such ids too; passing it as --cluster-id=... is a second guard.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def kafka_start() -> None:
    java = java17()
    cp = str(resolve_jars("kafka", JARS / "kafka")) + "/*"
    logdir = DATA / "kafka"
    props = CONF / "kafka.properties"
    props.write_text(
        (INFRA / "conf" / "kafka.properties").read_text().replace("@LOGDIR@", str(logdir))
    )
    if not (logdir / "meta.properties").exists():
        cluster_id = kafka_cluster_id()
        say(f"formatting Kafka storage (cluster id {cluster_id})")
        run(
            [
                java,
                "-cp",
                cp,
                f"-Dlog4j2.configurationFile={_log4j2('kafka-tools')}",
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                "-c",
                str(props),
            ]
        )
    spawn(
        "kafka",
        [
            java,
            "-Xms512m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={_log4j2('kafka')}",
            f"-Dcqrs.stack={STACK}",
            "-cp",
            cp,
            "kafka.Kafka",
            str(props),
        ],
    )


def kafka_healthy() -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        # log_level 0: "connection refused" while the broker starts is the expected answer,
        # not something to print every 50 ms.
        md = AdminClient({"bootstrap.servers": f"{HOST}:{KAFKA_PORT}", "log_level": 0}).list_topics(
            timeout=3
        )
    except Exception:
        return False
    return bool(md.brokers)


# -- Kafka Connect with Debezium


def connect_start() -> None:
    java = java17()
    cp = str(resolve_jars("connect", JARS / "connect")) + "/*"
    plugins = JARS / "plugins"
    resolve_jars("debezium", plugins / "debezium-connector-postgres")
    props = CONF / "connect.properties"
    props.write_text(
        (INFRA / "conf" / "connect.properties").read_text().replace("@PLUGINS@", str(plugins))
    )
    spawn(
        "connect",
        [
            java,
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={_log4j2('connect')}",
            f"-Dcqrs.stack={STACK}",
            "-cp",
            cp,
            "org.apache.kafka.connect.cli.ConnectDistributed",
            str(props),
        ],
        # The connector's database.password is ${env:CQRS_PG_DEBEZIUM_PASSWORD}
        # (connect.properties' config provider): the worker holds the value.
        env={"CQRS_PG_DEBEZIUM_PASSWORD": _debezium_password()},
    )


def _debezium_password() -> str:
    from tasks.settings import PostgresSettings

    return PostgresSettings().debezium_password.get_secret_value()


def connect_healthy() -> bool:
    import httpx

    try:
        plugins = httpx.get(f"http://{HOST}:{CONNECT_PORT}/connector-plugins", timeout=3).json()
    except Exception:
        return False
    return any(p.get("class", "").endswith("PostgresConnector") for p in plugins)


# -- Cassandra


def cassandra_start() -> None:
    java = java17()
    jars = resolve_jars("cassandra", JARS / "cassandra")
    jamm = next(jars.glob("jamm-*.jar"), None)
    if jamm is None:
        raise StackError(f"the jamm agent jar is missing from {jars}")
    home = DATA / "cassandra"
    for d in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "tmp"):
        (home / d).mkdir(parents=True, exist_ok=True)
    yaml = CONF / "cassandra.yaml"
    # Clients may use TLS with the stack's certificate (docs/security.md, "Transport").
    keystore = tls.ensure_cassandra_keystore()
    yaml.write_text(
        (INFRA / "conf" / "cassandra.yaml")
        .read_text()
        .replace("@HOME@", str(home))
        .replace("@TLS_KEYSTORE@", str(keystore))
    )
    logback = CONF / "cassandra-logback.xml"
    logback.write_text((INFRA / "conf" / "cassandra-logback.xml").read_text())
    jvm_flags = [
        line.strip()
        for line in (INFRA / "conf" / "cassandra-jvm17.options").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    spawn(
        "cassandra",
        [
            java,
            "-Xms1g",
            "-Xmx1g",
            "-Xss512k",
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            f"-javaagent:{jamm}",
            *jvm_flags,
            f"-Dcassandra.config=file://{yaml}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.storagedir={home}",
            f"-Dcassandra.logdir={LOGS}",
            f"-Dlogback.configurationFile={logback}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=100",
            f"-Dcassandra.jmx.local.port={CASSANDRA_JMX_PORT}",
            f"-Djava.io.tmpdir={home / 'tmp'}",
            "-cp",
            f"{jars}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ],
    )


def cassandra_healthy() -> bool:
    if not port_open(CASSANDRA_PORT):
        return False
    from cassandra.cluster import Cluster

    cluster = Cluster([HOST], port=CASSANDRA_PORT, connect_timeout=3)
    try:
        session = cluster.connect()
        return session.execute("SELECT release_version FROM system.local").one() is not None
    except Exception:
        return False
    finally:
        cluster.shutdown()


# -- Prefect server


def prefect_env() -> dict[str, str]:
    return {
        "PREFECT_HOME": str(DATA / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(PREFECT_PORT),
        "PREFECT_API_URL": f"http://{HOST}:{PREFECT_PORT}/api",
    }


def prefect_start() -> None:
    (DATA / "prefect").mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    spawn(
        "prefect",
        [str(prefect), "server", "start", "--host", HOST, "--port", str(PREFECT_PORT)],
        env=prefect_env(),
    )


def prefect_healthy() -> bool:
    import httpx

    try:
        return httpx.get(f"http://{HOST}:{PREFECT_PORT}/api/health", timeout=3).status_code == 200
    except Exception:
        return False


SERVICES = [
    Service(
        "postgres",
        [PG_PORT],
        f"postgresql://{HOST}:{PG_PORT}/cqrs",
        pg_start,
        pg_healthy,
        60,
        stop=pg_stop,
    ),
    Service(
        "kafka",
        [KAFKA_PORT, KAFKA_CONTROLLER_PORT],
        f"{HOST}:{KAFKA_PORT}",
        kafka_start,
        kafka_healthy,
        120,
    ),
    Service(
        "cassandra",
        [CASSANDRA_PORT, CASSANDRA_STORAGE_PORT, CASSANDRA_JMX_PORT],
        f"{HOST}:{CASSANDRA_PORT} (CQL)",
        cassandra_start,
        cassandra_healthy,
        240,
    ),
    Service(
        "prefect",
        [PREFECT_PORT],
        f"http://{HOST}:{PREFECT_PORT}",
        prefect_start,
        prefect_healthy,
        120,
    ),
    Service(
        "connect",
        [CONNECT_PORT],
        f"http://{HOST}:{CONNECT_PORT}",
        connect_start,
        connect_healthy,
        180,
        needs=["kafka"],
    ),
]
