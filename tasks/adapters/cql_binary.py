"""Values in CQL's binary format (the protocol's value encoding): uuid = its 16 bytes, bigint
= 8 and int = 4 bytes big-endian (timestamps are bigint ms since the epoch), text = UTF-8.

Arrow columns, computed with numpy from the Arrow buffers, for two consumers: the SSTable
writer's ROWS messages take a column's values back to back (``cql_values``); the ``cql`` load
method takes each row's values as the ``bytes`` a bound statement carries (``cql_cells``), so
the driver's per-value ``serialize`` is skipped (docs/decisions.md, "The cql load binds
columns, not values"). And rows of Python values (CDC, dual-write): ``bind_row`` gives the
bound statement ``PreparedStatement.bind`` would, at a fraction of its cost
(docs/decisions.md, "Rows are bound without the driver's bind")."""

from __future__ import annotations

import struct
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import pyarrow as pa
from cassandra import cqltypes
from cassandra.query import BoundStatement, PreparedStatement

from tasks.core.errors import TerminalError


def cql_values(array: pa.Array) -> tuple[np.ndarray, bytes]:
    """(lengths as big-endian int32, -1 for NULL; the values' bytes back to back) of one
    Arrow array in CQL's binary format."""
    n = len(array)
    valid = (
        np.ones(n, dtype=bool)
        if array.null_count == 0
        else array.is_valid().to_numpy(zero_copy_only=False)
    )
    typ = array.type
    if pa.types.is_fixed_size_binary(typ):
        width = typ.byte_width
        raw = np.frombuffer(array.buffers()[1], dtype=np.uint8)
        cells = raw[array.offset * width : (array.offset + n) * width].reshape(n, width)
        data = cells[valid].tobytes()
        lengths = np.where(valid, width, -1)
    elif pa.types.is_int64(typ) or pa.types.is_int32(typ):
        be = ">i8" if pa.types.is_int64(typ) else ">i4"
        values = array.fill_null(0).to_numpy().astype(be)
        data = values[valid].tobytes()
        lengths = np.where(valid, values.itemsize, -1)
    elif pa.types.is_string(typ):
        if array.null_count:
            array = array.fill_null("")  # a NULL's slot then holds no bytes
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[
            array.offset : array.offset + n + 1
        ]
        start, end = int(offsets[0]), int(offsets[-1])
        data = (
            bytes(memoryview(array.buffers()[2])[start:end])
            if array.buffers()[2] is not None
            else b""
        )
        lengths = np.where(valid, np.diff(offsets), -1)
    else:
        raise TerminalError(f"no CQL encoding for Arrow type {typ}")
    return lengths.astype(">i4"), data


def cql_cells(array: pa.Array) -> list[bytes | None]:
    """Each value of ``array`` as the bytes ``PreparedStatement.bind`` would give it (None for
    NULL): what a ``BoundStatement``'s ``values`` hold."""
    lengths, data = cql_values(array)
    sizes = np.maximum(lengths.astype(np.int64), 0)
    ends = np.cumsum(sizes)
    out: list[Any] = [
        data[start:end] for start, end in zip((ends - sizes).tolist(), ends.tolist(), strict=True)
    ]
    if array.null_count:
        for i in np.flatnonzero(lengths < 0).tolist():
            out[i] = None
    return out


# --- rows of Python values ------------------------------------------------------------------

Encoder = Callable[[Any], bytes]

_INT32: Final = struct.Struct(">i").pack
_INT64: Final = struct.Struct(">q").pack
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_MS: Final = timedelta(milliseconds=1)


def timestamp_ms(v: datetime) -> int:
    """What the driver's ``DateType.serialize`` stores for a datetime in UTC or a naive one
    (read as UTC): the time tuple's seconds * 1000 + microsecond // 1000, i.e. milliseconds
    since the epoch, floored; here in C-level datetime arithmetic. (Other time zones go to
    the driver: its conversion to UTC can overflow at the calendar's ends, and so refuse.)"""
    return (v - (_EPOCH_NAIVE if v.tzinfo is None else _EPOCH)) // _MS


def _utc_or_naive(v: Any) -> bool:
    return type(v) is datetime and (v.tzinfo is UTC or v.tzinfo is None)


def encoder(cql_type: type[cqltypes._CassandraType], protocol_version: int) -> Encoder:
    """One value of ``cql_type`` as ``PreparedStatement.bind`` encodes it. The types the read
    models use take a direct path for the exact Python type the projection gives them; any
    other value (a subclass, a str for a uuid...) goes through the driver's own
    ``serialize``, so it is encoded, or refused with the same exception, as ``bind`` would."""
    serialize = cql_type.serialize

    def driver(v: Any) -> bytes:
        return bytes(serialize(v, protocol_version))

    if cql_type is cqltypes.UUIDType:
        return lambda v: v.bytes if type(v) is uuid.UUID else driver(v)
    if cql_type is cqltypes.DateType:
        return lambda v: _INT64(timestamp_ms(v)) if _utc_or_naive(v) else driver(v)
    if cql_type is cqltypes.UTF8Type:
        return lambda v: v.encode("utf-8") if type(v) is str else driver(v)
    if cql_type is cqltypes.Int32Type:
        return lambda v: _INT32(v) if type(v) is int else driver(v)
    if cql_type is cqltypes.LongType:
        return lambda v: _INT64(v) if type(v) is int else driver(v)
    return driver


_ENCODERS: Final[weakref.WeakKeyDictionary[PreparedStatement, tuple[Encoder, ...]]] = (
    weakref.WeakKeyDictionary()
)


def bind_row(prepared: PreparedStatement, params: Sequence[Any]) -> BoundStatement:
    """``prepared.bind(params)``: the same values, bytes for bytes; a value ``bind`` refuses
    is refused by ``bind`` itself, with its exception. The driver's ``bind`` checks and
    converts each value in a general way that cost 3.7x these encoders for a dual-written
    turn's three statements."""
    encoders = _ENCODERS.get(prepared)
    if encoders is None:
        encoders = tuple(
            encoder(c.type, prepared.protocol_version) for c in prepared.column_metadata
        )
        _ENCODERS[prepared] = encoders
    if len(params) != len(encoders):
        return prepared.bind(params)  # the driver's own checks and messages
    try:
        values = [None if v is None else enc(v) for enc, v in zip(encoders, params, strict=True)]
    except Exception:
        # A value the driver refuses too: let it raise its own exception and message (it
        # makes a TypeError of a struct.error, naming the column).
        return prepared.bind(params)
    bound = BoundStatement(prepared)
    bound.values = values
    bound.raw_values = params
    return bound
