"""The payload of the SSTable writer's ROWS messages: projected Arrow columns in CQL's binary
format (tasks/adapters/cql_binary.py), column after column (lengths, then the values' bytes), no
Python object per cell. The JVM half (``jvm/SSTableBulkWriter.java``) documents the
message layout in its header."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pyarrow as pa

from tasks.adapters.cql_binary import cql_values

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


def rows_payload(arrays: Sequence[pa.Array]) -> bytes:
    """The ROWS payload: column after column, lengths then bytes (see the Java header)."""
    parts: list[bytes] = []
    for array in arrays:
        lengths, data = cql_values(array)
        parts.append(lengths.tobytes())
        parts.append(data)
    return b"".join(parts)
