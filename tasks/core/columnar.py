"""The projection of a whole Arrow record batch of current rows at once (the backfill's load
stage): the same upserts as ``project_row`` then ``to_cql`` row by row, converted column by
column with the same codecs (tasks/core/codec.py), without the per-row work.

- ``project_arrow``: the bind parameters as Python tuples, for the CQL driver;
- ``project_arrow_columns``: one Arrow array per bind marker in CQL terms, for Cassandra's
  SSTable writer (the "sstable" load method), without a Python object per cell.

Rows are snapshot reads: TOAST placeholders cannot occur, so that text is kept as content, as
``project_row`` keeps it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.core import catalog
from tasks.core.codec import VERSION, Cell
from tasks.core.cql import check_keyspace, insert_text
from tasks.core.errors import DecodeError
from tasks.core.projection import cells

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True, slots=True)
class ColumnarUpserts:
    """The upserts of many source rows into one read model: the statement text ``to_cql``
    gives each of them, and their bind parameters in the same order (key, values, version)."""

    read_model: str
    cql: str
    params: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class ArrowUpserts:
    """``project_arrow``'s upserts as one Arrow array per bind marker of ``cql``, in CQL terms:
    uuid → fixed_size_binary(16), timestamp → int64 ms since the epoch, int → int32, text →
    string; the last array is the row's version (int64 µs), the ``USING TIMESTAMP``. Row i of
    the arrays is parameter tuple i of ``project_arrow`` (tests/unit prove it)."""

    read_model: str
    cql: str
    arrays: list[Any]


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow (and Parquet) schema of a source table's snapshot: its columns, in table
    order, typed by their codecs; each field's metadata names its catalog type."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(c.name, c.codec.arrow_type(), metadata={"pg_type": c.codec.name})
            for c in catalog.source(table).columns
        ]
    )


class _Columns:
    """The source columns of one batch, each decoded once by its codec, and converted into
    cells on demand (a column may fill several read-model columns)."""

    def __init__(self, table: str, batch: pa.RecordBatch) -> None:
        self.table = table
        self.batch = batch
        self._decoded: dict[str, Any] = {}
        self._converted: dict[tuple[str, Cell, bool], Any] = {}

    def decoded(self, col: str) -> Any:
        if col not in self._decoded:
            column = catalog.SOURCES[self.table].column(col)
            codec, array = column.codec, self.batch.column(col)
            if array.null_count and not column.nullable and not codec.null_is_a_value:
                raise DecodeError(f"{self.table}.{col}: NULL in a NOT NULL column")
            try:
                self._decoded[col] = codec.arrow_decode(codec.arrow_check(array))
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                raise DecodeError(f"{self.table}.{col}: {exc}") from None
        return self._decoded[col]

    def cells(self, col: str, conv: Cell) -> list[Any]:
        if (k := (col, conv, False)) not in self._converted:
            self._converted[k] = conv.arrow_cells(self.decoded(col))
        return self._converted[k]  # type: ignore[no-any-return]

    def cql(self, col: str, conv: Cell) -> pa.Array:
        if (k := (col, conv, True)) not in self._converted:
            self._converted[k] = conv.arrow_cql(self.decoded(col))
        return self._converted[k]


def _prepare(
    table: str, batch: pa.RecordBatch, keyspace: str, read_models: Collection[str] | None
) -> tuple[tuple[catalog.Feed, ...], _Columns]:
    """What a record batch of ``table`` feeds, once the keyspace and its columns are valid;
    every source column decoded (and so checked) even if no feed reads it."""
    check_keyspace(keyspace)
    feeds = catalog.feeds_of(table, read_models)
    names = set(batch.schema.names)
    if missing := [c for c in catalog.COLUMNS[table] if c not in names]:
        raise DecodeError(f"{table}: required column(s) missing: {missing}")
    columns = _Columns(table, batch)
    for col in catalog.COLUMNS[table]:
        columns.decoded(col)
    return feeds, columns


def _statement(keyspace: str, feed: catalog.Feed) -> str:
    # Same order as project_row and to_cql: key, constants, values, then the version.
    cols = tuple(dst for dst, _ in (*feed.key, *feed.constants, *feed.values))
    return insert_text(keyspace, feed.read_model, cols)


def project_arrow(
    table: str, batch: pa.RecordBatch, keyspace: str, read_models: Collection[str] | None = None
) -> list[ColumnarUpserts]:
    """``project_row`` then ``to_cql`` for every row of a pyarrow RecordBatch of current rows:
    the same statements and the same parameters (tests/unit check it row for row)."""
    feeds, columns = _prepare(table, batch, keyspace, read_models)
    out: list[ColumnarUpserts] = []
    for feed in feeds:
        key, values = cells(table, feed)
        params = [columns.cells(src, conv) for _, src, conv in key]
        params += [[const] * batch.num_rows for _, const in feed.constants]
        params += [columns.cells(src, conv) for _, src, conv in values]
        params.append(columns.cells("updated_at", VERSION))
        out.append(
            ColumnarUpserts(
                feed.read_model, _statement(keyspace, feed), list(zip(*params, strict=True))
            )
        )
    return out


def project_arrow_columns(
    table: str, batch: pa.RecordBatch, keyspace: str, read_models: Collection[str] | None = None
) -> list[ArrowUpserts]:
    """``project_arrow`` with Arrow arrays in CQL terms instead of Python tuples."""
    import pyarrow as pa

    feeds, columns = _prepare(table, batch, keyspace, read_models)
    out: list[ArrowUpserts] = []
    for feed in feeds:
        key, values = cells(table, feed)
        arrays = [columns.cql(src, conv) for _, src, conv in key]
        arrays += [pa.array([const] * batch.num_rows, pa.string()) for _, const in feed.constants]
        arrays += [columns.cql(src, conv) for _, src, conv in values]
        arrays.append(columns.cql("updated_at", VERSION))
        out.append(ArrowUpserts(feed.read_model, _statement(keyspace, feed), arrays))
    return out
