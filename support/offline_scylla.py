"""A Scylla session that prepares statements without a server, for driving the real
ScyllaWriter (its grouping, the driver's binding and serializers) in unit tests and CPU
benchmarks. The bind markers are typed from the catalog's read-model columns, as Cassandra
types them (checked against the real schema by tests/integration/test_catalog.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from unittest import mock

from cassandra import cqltypes
from cassandra.metadata import ColumnMetadata, KeyspaceMetadata, TableMetadata
from cassandra.query import PreparedStatement

from tasks.core.catalog import TABLES

CQL_TYPES: Final[dict[str, type[cqltypes._CassandraType]]] = {
    "uuid": cqltypes.UUIDType,
    "timestamp": cqltypes.DateType,
    "int": cqltypes.Int32Type,
    "text": cqltypes.UTF8Type,
    "bigint": cqltypes.LongType,
}


@dataclass
class Column:
    keyspace_name: str
    table_name: str
    name: str
    type: type[cqltypes._CassandraType]


def offline_prepared(cql: str, keyspace: str) -> PreparedStatement:
    """What Cassandra returns when preparing the writer's INSERT or DELETE."""
    table = cql.split(f"{keyspace}.", 1)[1].split(" ", 1)[0]
    model = TABLES[table]

    def col(name: str) -> Column:
        if name == "[timestamp]":
            return Column(keyspace, table, name, cqltypes.LongType)
        return Column(keyspace, table, name, CQL_TYPES[model.column(name).cql_type])

    if cql.startswith("INSERT"):
        names = cql.split("(", 1)[1].split(")", 1)[0].split(", ")
        columns = [col(n) for n in [*names, "[timestamp]"]]
    else:
        where = cql.split(" WHERE ", 1)[1].split(" AND ")
        columns = [col("[timestamp]"), *(col(w.split(" = ")[0]) for w in where)]
    pk = [i for i, c in enumerate(columns) if c.name in {k.name for k in model.partition_key}]
    return PreparedStatement(columns, b"id", pk, cql, keyspace, 4, None, None)


def offline_keyspace(keyspace: str) -> KeyspaceMetadata:
    """The read models' schema metadata as the driver holds it (only the keys: what the
    writer's batch sizing reads)."""
    ks = KeyspaceMetadata(keyspace, True, "SimpleStrategy", {"replication_factor": "1"})
    for name, model in TABLES.items():
        table = TableMetadata(keyspace, name)
        for role, columns in (
            ("partition_key", model.partition_key),
            ("clustering_key", model.clustering_key),
        ):
            getattr(table, role).extend(
                ColumnMetadata(table, c.name, CQL_TYPES[c.cql_type].typename) for c in columns
            )
        ks.tables[name] = table
    return ks


class OfflineSession:
    """Prepares offline; one host, so the writer batches without a replica lookup."""

    def __init__(self, keyspace: str) -> None:
        self.keyspace = keyspace
        self.cluster = mock.Mock()
        self.cluster.metadata.all_hosts.return_value = [object()]
        # A real dict: the writer reads it per statement until it finds the table.
        self.cluster.metadata.keyspaces = {keyspace: offline_keyspace(keyspace)}

    def prepare(self, cql: str) -> PreparedStatement:
        return offline_prepared(cql, self.keyspace)
