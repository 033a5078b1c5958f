"""Every client the product code opens (tasks/, flows/, support/, bench/) is built from the
adapters' configs, so the transport and authentication settings reach all of them
(docs/security.md, "Transport"): a Kafka client from kafka.*_config, a Cassandra/Scylla
Cluster from scylla.cluster_kwargs, a Postgres connection from the settings' conninfo.
infra/ is left out: its health checks talk to the local stack's fixed endpoints."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "flows", "support", "bench")
KAFKA_CLIENTS = {"Consumer", "Producer", "AdminClient"}
KAFKA_CONFIGS = {"consumer_config", "producer_config", "admin_config", "client_config"}
PG_CLIENTS = {"connect", "ConnectionPool", "AsyncConnectionPool"}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _calls() -> Iterator[tuple[str, ast.Call]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), where)):
                if isinstance(node, ast.Call):
                    yield where, node


def _first_arg_calls(call: ast.Call, names: set[str]) -> bool:
    return (
        bool(call.args)
        and isinstance(call.args[0], ast.Call)
        and (_name(call.args[0].func) in names)
    )


def test_kafka_clients_are_built_from_the_adapters_configs() -> None:
    found, wrong = 0, []
    for where, call in _calls():
        if _name(call.func) in KAFKA_CLIENTS:
            found += 1
            if not _first_arg_calls(call, KAFKA_CONFIGS):
                wrong.append(f"{where}:{call.lineno}")
    assert found >= 5
    assert not wrong, f"Kafka clients built without kafka.*_config: {wrong}"


def test_no_kafka_config_is_written_by_hand() -> None:
    literal = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if '"bootstrap.servers"' in path.read_text()
    ]
    assert literal == ["tasks/adapters/kafka.py"]


def test_clusters_are_built_from_cluster_kwargs() -> None:
    found, wrong = 0, []
    for where, call in _calls():
        if _name(call.func) == "Cluster":
            found += 1
            spread = [k.value for k in call.keywords if k.arg is None]
            if call.args or not any(
                isinstance(v, ast.Call) and _name(v.func) == "cluster_kwargs" for v in spread
            ):
                wrong.append(f"{where}:{call.lineno}")
    assert found >= 1
    assert not wrong, f"Cluster built without scylla.cluster_kwargs: {wrong}"


def test_postgres_connections_use_the_settings_conninfo() -> None:
    found, wrong = 0, []
    for where, call in _calls():
        func = call.func
        is_pg = (
            isinstance(func, ast.Attribute)
            and func.attr == "connect"
            and _name(func.value) in {"psycopg", "Connection", "AsyncConnection"}
        ) or (_name(func) in PG_CLIENTS - {"connect"})
        if is_pg:
            found += 1
            if not _first_arg_calls(call, {"conninfo"}):
                wrong.append(f"{where}:{call.lineno}")
    assert found >= 2
    assert not wrong, f"Postgres connections without PostgresSettings.conninfo: {wrong}"
