"""Kafka Connect REST adapter and the Debezium PostgreSQL connector's configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from tasks.core.catalog import SOURCE_TABLES
from tasks.core.errors import ConfigurationError, ServiceUnavailable, TransientError
from tasks.settings import PostgresSettings, Settings


def connector_config(settings: Settings) -> dict[str, str]:
    """The Debezium connector's settings. Everything that matters is explicit here rather
    than left to defaults that differ between Debezium versions."""
    return {**_base_config(settings), **debezium_ssl_config(settings.postgres)}


def debezium_ssl_config(settings: PostgresSettings) -> dict[str, str]:
    """The connector's TLS to Postgres, from the same settings as every libpq client
    (docs/security.md, "Transport"): sslmode always, explicit rather than left to the
    JDBC driver's default; the files when set, as paths on the Connect workers. No key
    passphrase: the connector's config is shown by Kafka Connect's REST API."""
    pg = settings
    files = {
        "database.sslrootcert": pg.sslrootcert,
        "database.sslcert": pg.sslcert,
        "database.sslkey": pg.sslkey,
    }
    return {"database.sslmode": pg.sslmode, **{k: v for k, v in files.items() if v is not None}}


def _base_config(settings: Settings) -> dict[str, str]:
    pg, kafka = settings.postgres, settings.kafka
    return {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": pg.host,
        "database.port": str(pg.port),
        "database.user": pg.debezium_user,
        # A reference (${env:...}), resolved by the Connect worker's config provider: the
        # password is not part of the config Kafka Connect stores and shows.
        "database.password": kafka.debezium_password_ref,
        "database.dbname": pg.database,
        "topic.prefix": kafka.topic_prefix,
        "table.include.list": ",".join(f"public.{t}" for t in SOURCE_TABLES),
        "slot.name": pg.slot_name,
        "publication.name": pg.publication_name,
        # The publication is created by a migration (FOR TABLE needs ownership).
        "publication.autocreate.mode": "disabled",
        # Streaming only: the first load is the backfill flow's job, taken after the slot
        # exists so nothing falls between the two (docs/architecture.md, "The gap rule").
        "snapshot.mode": "no_data",
        # Truncates are published (Debezium skips them by default) so that the consumer
        # refuses them loudly instead of never hearing of them (docs/operations.md).
        "skipped.operations": "none",
        # Heartbeats keep the slot advancing when the captured tables are idle
        # (docs/pitfalls.md #1).
        "heartbeat.interval.ms": "5000",
        "heartbeat.action.query": "UPDATE cqrs_heartbeat SET beat_at = now() WHERE id = 1",
        # poll.interval.ms bounds end-to-end latency (Debezium's default is 500 ms) and sets
        # the idle cost (docs/operations.md, "Idle cost and latency").
        "poll.interval.ms": str(kafka.debezium_poll_interval_ms),
        "max.batch.size": "4096",
        "max.queue.size": "16384",
        "tombstones.on.delete": "true",
        "decimal.handling.mode": "string",
        "time.precision.mode": "adaptive_time_microseconds",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter.schemas.enable": "false",
        "producer.override.linger.ms": "5",
    }


@dataclass(frozen=True)
class ConnectorState:
    name: str
    connector_state: str
    task_states: list[str]
    trace: str | None = None

    @property
    def running(self) -> bool:
        return (
            self.connector_state == "RUNNING"
            and bool(self.task_states)
            and all(t == "RUNNING" for t in self.task_states)
        )


class KafkaConnectClient:
    """Kafka Connect's REST API at ``url`` (the settings' ``CQRS_KAFKA_CONNECT_URL``)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ServiceUnavailable("Kafka Connect", f"{self.url}: {exc}") from exc
        if resp.status_code >= 500 or resp.status_code == 409:  # 409: rebalance in progress
            raise TransientError(f"Kafka Connect {method} {path}: {resp.status_code} {resp.text}")
        return resp

    def put_config(self, name: str, config: dict[str, str]) -> None:
        """Create or update the connector (idempotent)."""
        resp = self._request("PUT", f"/connectors/{name}/config", json=config)
        if resp.status_code >= 400:
            raise ConfigurationError(
                f"Kafka Connect rejected connector {name!r}: "
                f"{resp.status_code} {resp.json().get('message', resp.text)}"
            )

    def validate(self, config: dict[str, str]) -> list[str]:
        """Errors Kafka Connect finds in a config, before it is applied."""
        cls = config["connector.class"].rsplit(".", 1)[-1]
        resp = self._request("PUT", f"/connector-plugins/{cls}/config/validate", json=config)
        errors: list[str] = []
        for item in resp.json().get("configs", []):
            value = item.get("value") or {}
            errors.extend(f"{value.get('name')}: {err}" for err in value.get("errors") or [])
        return errors

    def status(self, name: str) -> ConnectorState | None:
        resp = self._request("GET", f"/connectors/{name}/status")
        if resp.status_code == 404:
            return None
        body = resp.json()
        tasks = body.get("tasks", [])
        trace = body["connector"].get("trace") or next(
            (t.get("trace") for t in tasks if t.get("trace")), None
        )
        return ConnectorState(name, body["connector"]["state"], [t["state"] for t in tasks], trace)

    def source_lsn(self, name: str) -> int | None:
        """The last LSN Debezium recorded as processed (its Kafka Connect source offset)."""
        resp = self._request("GET", f"/connectors/{name}/offsets")
        if resp.status_code == 404:
            return None
        for item in resp.json().get("offsets", []):
            lsn = item.get("offset", {}).get("lsn")
            if isinstance(lsn, int):
                return lsn
        return None

    def source_offset(self, name: str) -> dict[str, Any] | None:
        """Debezium's last recorded source offset: ``lsn`` (what it confirms to the slot),
        ``txId``, and ``ts_usec`` (that transaction's commit time, µs); None if none."""
        resp = self._request("GET", f"/connectors/{name}/offsets")
        if resp.status_code == 404:
            return None
        for item in resp.json().get("offsets", []):
            offset = item.get("offset")
            if isinstance(offset, dict) and isinstance(offset.get("lsn"), int):
                return offset
        return None

    def restart(self, name: str) -> None:
        self._request(
            "POST",
            f"/connectors/{name}/restart",
            params={"includeTasks": "true", "onlyFailed": "false"},
        )

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/connectors/{name}")

    def wait_running(self, name: str, timeout: float = 60.0) -> ConnectorState:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.status(name)
            if state and state.running:
                return state
            if state and "FAILED" in [state.connector_state, *state.task_states]:
                raise ConfigurationError(
                    f"connector {name} failed: {(state.trace or '').splitlines()[:3]}"
                )
            time.sleep(0.5)
        raise TransientError(f"connector {name} not running after {timeout:.0f}s: {state}")


def register_connector(settings: Settings, timeout: float = 60.0) -> ConnectorState:
    """Register (or update) the Debezium connector and wait until it and its task run."""
    s = settings
    client = KafkaConnectClient(s.kafka.connect_url)
    config = connector_config(s)
    errors = client.validate({**config, "name": s.kafka.connector_name})
    if errors:
        raise ConfigurationError("Debezium connector config is invalid: " + "; ".join(errors))
    client.put_config(s.kafka.connector_name, config)
    return client.wait_running(s.kafka.connector_name, timeout)
