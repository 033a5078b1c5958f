"""Chunk files: one chunk of one source table, read from Postgres inside the shared snapshot
and written as a Parquet file (zstd), typed by the catalog's ``arrow_schema``. Rows stream through a
server-side cursor in record batches: no chunk is ever held in memory whole."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Final

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import Format

from tasks.adapters import postgres
from tasks.backfill.manifest import ChunkFile
from tasks.backfill.plan import ChunkPlan, SnapshotFilter, where
from tasks.core.catalog import COLUMNS
from tasks.core.columnar import arrow_schema
from tasks.core.errors import TerminalError
from tasks.settings import PostgresSettings

_PG_EPOCH_US: Final = 946_684_800 * 1_000_000  # 2000-01-01T00:00Z, Postgres' binary epoch


class _UuidBytesLoader(Loader):
    """uuid as its 16 raw bytes: what Arrow stores; skips building uuid.UUID objects."""

    format = Format.BINARY

    def load(self, data: Any) -> bytes:
        return bytes(data)


class _TimestamptzMicrosLoader(Loader):
    """timestamptz as µs since the Unix epoch: Arrow's timestamp[us] storage, exact."""

    format = Format.BINARY

    def load(self, data: Any) -> int:
        return int.from_bytes(data, "big", signed=True) + _PG_EPOCH_US


def _select(table: str, clause: sql.Composable) -> sql.Composed:
    cols = [
        sql.SQL("{}::text AS {}").format(sql.Identifier(c), sql.Identifier(c))
        if typ == "jsonb"
        else sql.Identifier(c)
        for c, typ in COLUMNS[table].items()
    ]
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(cols), sql.Identifier(table), clause
    )


def _to_batch(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for values, f in zip(zip(*rows, strict=True), schema, strict=True):
        if isinstance(f.type, pa.ExtensionType):
            arrays.append(
                pa.ExtensionArray.from_storage(f.type, pa.array(values, f.type.storage_type))
            )
        else:
            arrays.append(pa.array(values, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def join_snapshot(snapshot_name: str, settings: PostgresSettings) -> psycopg.Connection:
    """A reader connection inside the exported snapshot ``snapshot_name``, with the loaders
    that give Arrow's storage types directly; a context manager like any connection."""
    conn = postgres.connect("reader", settings)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.adapters.register_loader("uuid", _UuidBytesLoader)
    conn.adapters.register_loader("timestamptz", _TimestamptzMicrosLoader)
    # First statement of the transaction (psycopg sends BEGIN ... before it).
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
    return conn


def read_chunk(
    conn: psycopg.Connection,
    chunk: ChunkPlan,
    filt: SnapshotFilter,
    directory: Path,
    fetch_rows: int,
) -> ChunkFile:
    """Stream one chunk through a server-side cursor, ``fetch_rows`` rows per fetch and
    record batch, into its Parquet file under ``directory``."""
    started = time.monotonic()
    schema = arrow_schema(chunk.table)
    clause, params = where(chunk.table, filt, chunk.key_range)
    rel = Path(chunk.table) / f"{chunk.index:05d}.parquet"
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    rows = 0
    with (
        conn.cursor(name=f"bf_{chunk.table}_{chunk.index}", binary=True) as cur,
        pq.ParquetWriter(tmp, schema, compression="zstd") as out,
    ):
        cur.itersize = fetch_rows
        cur.execute(_select(chunk.table, clause), params)
        while batch := cur.fetchmany(fetch_rows):
            out.write_batch(_to_batch(batch, schema))
            rows += len(batch)
    if rows != chunk.rows:
        # Planned and read in the same snapshot: a difference means the snapshot is not what
        # we think it is; loading it would be wrong in ways nothing downstream would notice.
        raise TerminalError(
            f"{chunk.id}: read {rows} rows, planned {chunk.rows} in the same snapshot"
        )
    os.replace(tmp, path)
    kr = chunk.key_range
    return ChunkFile(
        chunk.id,
        chunk.table,
        chunk.index,
        str(kr.lo) if kr.lo else None,
        str(kr.hi) if kr.hi else None,
        rows,
        str(rel),
        path.stat().st_size,
        round(time.monotonic() - started, 3),
    )
