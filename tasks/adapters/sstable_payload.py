"""The payload of the SSTable writer's ROWS messages: projected Arrow columns in CQL's binary
format, column after column (lengths, then the values' bytes), produced from Arrow buffers with
numpy, no Python object per cell. The JVM half (``jvm/SSTableBulkWriter.java``) documents the
message layout in its header."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import pyarrow as pa

from tasks.core.errors import TerminalError

MAX_PAYLOAD_BYTES: Final = 16 * 2**20  # bytes per ROWS message: the JVM holds one at a time


def split_rows(arrays: Sequence[pa.Array], max_bytes: int) -> list[list[pa.Array]]:
    """The arrays cut into row ranges of at most about ``max_bytes`` (zero-copy slices)."""
    n = len(arrays[0]) if arrays else 0
    nbytes = sum(a.nbytes for a in arrays)
    pieces = max(1, -(-nbytes // max_bytes))
    if pieces == 1 or n <= 1:
        return [list(arrays)]
    step = -(-n // pieces)
    return [[a.slice(i, step) for a in arrays] for i in range(0, n, step)]


def cql_values(array: pa.Array) -> tuple[np.ndarray, bytes]:
    """(lengths as big-endian int32, -1 for NULL; the values' bytes back to back) of one
    Arrow array in CQL's binary format: uuid = its 16 bytes, bigint = 8 and int = 4 bytes
    big-endian (timestamps are bigint ms), text = UTF-8."""
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


def rows_payload(arrays: Sequence[pa.Array]) -> bytes:
    """The ROWS payload: column after column, lengths then bytes (see the Java header)."""
    parts: list[bytes] = []
    for array in arrays:
        lengths, data = cql_values(array)
        parts.append(lengths.tobytes())
        parts.append(data)
    return b"".join(parts)
