"""The catalog (tasks/core/catalog.py) equals the schemas as the migrations applied them to
the real stack: each source table's columns, types, nullability and primary key in Postgres'
system catalogs, and each read-model table's columns, types, key kinds, key order and
clustering order in Cassandra's ``system_schema``. A migration that changes a table without
the catalog fails here."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from cassandra.cluster import Session

from tasks.core import catalog

pytestmark = pytest.mark.stack


def _postgres_table(conn: psycopg.Connection[Any], table: str) -> dict[str, Any]:
    """Columns (name, type, nullable) in table order and the primary key, as Postgres has them."""
    columns = conn.execute(
        "SELECT column_name, udt_name, is_nullable = 'YES' FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    key = conn.execute(
        "SELECT a.attname FROM pg_index i"
        " JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY k.n",
        (table,),
    ).fetchall()
    return {"columns": [tuple(c) for c in columns], "primary_key": [k for (k,) in key]}


def _catalog_source(table: str) -> dict[str, Any]:
    src = catalog.SOURCES[table]
    return {
        "columns": [(c.name, c.codec.pg_type, c.nullable) for c in src.columns],
        "primary_key": list(src.primary_key),
    }


def _cassandra_table(cql: Session, keyspace: str, table: str) -> dict[str, Any]:
    rows = list(
        cql.execute(
            "SELECT column_name, kind, position, type, clustering_order FROM system_schema.columns"
            " WHERE keyspace_name = %s AND table_name = %s",
            (keyspace, table),
        )
    )

    def key(kind: str) -> list[tuple[str, str, str]]:
        return [
            (r.column_name, r.type, r.clustering_order)
            for r in sorted(rows, key=lambda r: r.position)
            if r.kind == kind
        ]

    return {
        "partition_key": [(name, typ) for name, typ, _ in key("partition_key")],
        "clustering_key": key("clustering"),
        "values": {r.column_name: r.type for r in rows if r.kind == "regular"},
        "other": sorted(r.column_name for r in rows if r.kind not in _KINDS),
    }


_KINDS = ("partition_key", "clustering", "regular")


def _catalog_read_model(name: str) -> dict[str, Any]:
    model = catalog.TABLES[name]
    return {
        "partition_key": [(c.name, c.cql_type) for c in model.partition_key],
        "clustering_key": [
            (c.name, c.cql_type, "desc" if c.descending else "asc") for c in model.clustering_key
        ],
        "values": {c.name: c.cql_type for c in model.values},
        "other": [],
    }


def _differences(table: str, stored: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    """One line per part that differs, naming the table and, for lists, the first position
    where they part."""
    out = []
    for part, want in declared.items():
        got = stored[part]
        if got == want:
            continue
        if isinstance(want, list):
            i = next(
                (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
                min(len(got), len(want)),
            )
            g = got[i] if i < len(got) else "(nothing)"
            w = want[i] if i < len(want) else "(nothing)"
            out.append(f"{table} {part} at position {i}: the schema has {g}, the catalog {w}")
        else:
            for col in sorted(set(got) | set(want)):
                if got.get(col) != want.get(col):
                    out.append(
                        f"{table} {part} {col}: the schema has {got.get(col)},"
                        f" the catalog {want.get(col)}"
                    )
    return out


@pytest.mark.parametrize("table", catalog.SOURCE_TABLES)
def test_source_table_equals_postgres(table: str, pg_app: psycopg.Connection[Any]) -> None:
    problems = _differences(table, _postgres_table(pg_app, table), _catalog_source(table))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("read_model", catalog.READ_MODELS)
def test_read_model_equals_cassandra(read_model: str, cql: Session) -> None:
    assert cql.keyspace, "the cql fixture is bound to the keyspace the migrations create"
    stored = _cassandra_table(cql, cql.keyspace, read_model)
    problems = _differences(read_model, stored, _catalog_read_model(read_model))
    assert not problems, "\n".join(problems)


def test_every_table_is_in_the_catalog(pg_app: psycopg.Connection[Any], cql: Session) -> None:
    """The write model's published tables and the keyspace's tables are the catalog's (plus
    the bookkeeping tables named here), so a table added by a migration is noticed too."""
    published = {
        t
        for (t,) in pg_app.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = 'cqrs_sync'"
        )
    }
    assert published - {"cqrs_heartbeat"} == set(catalog.SOURCE_TABLES)
    tables = {
        r.table_name
        for r in cql.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
            (cql.keyspace,),
        )
    }
    assert set(catalog.READ_MODELS) <= tables
    bookkeeping = tables - set(catalog.READ_MODELS)
    assert all(t.endswith(("_migrations", "_checkpoints")) for t in bookkeeping), bookkeeping
