"""Rows of read-model partitions read from Scylla into a pandas DataFrame, for validation
(tasks/audit/quality.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.audit.suites import check_read_model
from tasks.core.catalog import KEY_COLUMNS
from tasks.core.cql import check_keyspace
from tasks.core.errors import ConfigurationError, InvalidInput, classify
from tasks.core.write_policy import as_uuid

if TYPE_CHECKING:
    from cassandra.cluster import Session


def _row_dict(row: Any, columns: list[str]) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    return dict(zip(columns, row, strict=False))


def read_model_frame(
    session: Session,
    read_model: str,
    partition_keys: Iterable[Any],
    limit: int = 10_000,
    *,
    keyspace: str | None = None,
    concurrency: int = 16,
) -> pd.DataFrame:
    """Rows of the given partitions of a read model, at most ``limit`` in all (partitions in
    the order given, rows in clustering order), with every column of the table (whatever the
    schema holds now) and timestamps as tz-aware UTC."""
    from tasks.adapters.scylla import execute_windowed

    check_read_model(read_model)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
    ks = keyspace or session.keyspace
    if not ks:
        raise InvalidInput("no keyspace: pass keyspace= or a session bound to one")
    check_keyspace(ks)
    keys = list(dict.fromkeys(as_uuid(k, "partition key") for k in partition_keys))
    try:
        table = session.cluster.metadata.keyspaces[ks].tables[read_model]
    except KeyError:
        raise ConfigurationError(
            f"{ks}.{read_model} does not exist (migrations applied?)"
        ) from None
    columns = list(table.columns)
    # The partition key as the live schema has it (every read model has one uuid column).
    if len(table.partition_key) != 1 or table.partition_key[0].name != KEY_COLUMNS[read_model][0]:
        raise ConfigurationError(
            f"{ks}.{read_model}: partition key "
            f"{[c.name for c in table.partition_key]} is not "
            f"({KEY_COLUMNS[read_model][0]})"
        )
    pk = table.partition_key[0].name
    rows: list[dict[str, Any]] = []
    if keys:
        try:
            stmt = session.prepare(f"SELECT * FROM {ks}.{read_model} WHERE {pk} = ? LIMIT ?")
            for rs in execute_windowed(session, ((stmt, (k, limit)) for k in keys), concurrency):
                for row in rs:
                    rows.append(_row_dict(row, columns))
                    if len(rows) >= limit:
                        break
                if len(rows) >= limit:
                    break
        except Exception as exc:
            raise classify(exc, f"reading {len(keys)} partitions of {read_model}") from exc
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for name, col in table.columns.items():
        if col.cql_type == "timestamp":
            frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame
