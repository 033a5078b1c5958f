"""Arrow columns in CQL's binary format (the protocol's value encoding), computed with numpy
from the Arrow buffers: uuid = its 16 bytes, bigint = 8 and int = 4 bytes big-endian
(timestamps are bigint ms), text = UTF-8.

Two consumers: the SSTable writer's ROWS messages take a column's values back to back
(``cql_values``); the ``cql`` load method takes each row's values as the ``bytes`` a bound
statement carries (``cql_cells``), so the driver's per-value ``serialize`` is skipped
(docs/decisions.md, "The cql load binds columns, not values")."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

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
