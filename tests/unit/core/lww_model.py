"""A model of Cassandra/Scylla cell-level last-write-wins, for the mutations the writer sends.

- ``INSERT ... USING TIMESTAMP t`` writes a row marker at t and one cell (value, t) per
  column it names; a None value is a cell tombstone (what binding null does).
- ``DELETE ... USING TIMESTAMP T`` with the full primary key (row) or the partition key
  (partition) shadows every marker and cell of the rows it covers with timestamp <= T: on a tie
  the delete wins.
- Two cells with the same timestamp: a tombstone wins, else the greater value compared as
  serialized bytes (Cells.reconcile).
- A row is visible when it has a live marker or a live cell; missing cells read back as null.

Merging is commutative, associative and idempotent, as in the real store (before compaction
purges tombstones past gc_grace_seconds), so the order of ``apply`` calls does not matter.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks.core.catalog import KEY_COLUMNS, VALUE_COLUMNS
from tasks.core.projection import Delete, Key, Mutation, Upsert

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def serialized(value: Any) -> bytes:
    """The bytes Cassandra stores for a value of the read models' column types."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, bool):
        raise TypeError("no boolean columns in the read models")
    if isinstance(value, int):
        return struct.pack(">i", value)
    if isinstance(value, datetime):
        return struct.pack(">q", (value - _EPOCH) // timedelta(milliseconds=1))
    raise TypeError(f"unexpected cell value {value!r}")


Cell = tuple[Any, int]  # (value or None for a tombstone, timestamp)


def reconcile(a: Cell, b: Cell) -> Cell:
    if a[1] != b[1]:
        return a if a[1] > b[1] else b
    if a[0] is None or b[0] is None:
        return a if a[0] is None else b
    return a if serialized(a[0]) >= serialized(b[0]) else b


@dataclass
class _Row:
    marker_ts: int | None = None
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class LwwStore:
    rows: dict[tuple[str, Key], _Row] = field(default_factory=dict)
    # (read model, key prefix) -> highest deletion timestamp
    deletions: dict[tuple[str, Key], int] = field(default_factory=dict)

    def apply(self, m: Mutation) -> None:
        if isinstance(m, Upsert):
            row = self.rows.setdefault((m.read_model, m.key), _Row())
            row.marker_ts = max(row.marker_ts or m.timestamp_us, m.timestamp_us)
            for col, value in m.values:
                new = (value, m.timestamp_us)
                old = row.cells.get(col)
                row.cells[col] = new if old is None else reconcile(old, new)
        elif isinstance(m, Delete):
            if len(m.key) not in (1, len(KEY_COLUMNS[m.read_model])):
                raise ValueError("only row and partition deletes are modelled")
            at = (m.read_model, m.key)
            self.deletions[at] = max(self.deletions.get(at, m.timestamp_us), m.timestamp_us)
        else:  # pragma: no cover
            raise TypeError(m)

    def apply_all(self, mutations: Iterable[Mutation]) -> None:
        for m in mutations:
            self.apply(m)

    def _deleted_at(self, read_model: str, key: Key) -> int | None:
        stamps = [self.deletions.get((read_model, prefix)) for prefix in (key[:1], key)]
        return max((ts for ts in stamps if ts is not None), default=None)

    def visible(self, read_model: str) -> dict[Key, dict[str, Any]]:
        """What ``SELECT *`` would return: key -> every value column (None when null)."""
        out: dict[Key, dict[str, Any]] = {}
        for (rm, key), row in self.rows.items():
            if rm != read_model:
                continue
            deleted = self._deleted_at(rm, key)

            def live(ts: int | None, deleted: int | None = deleted) -> bool:
                return ts is not None and (deleted is None or ts > deleted)

            cells = {c: v for c, (v, ts) in row.cells.items() if v is not None and live(ts)}
            if live(row.marker_ts) or cells:
                out[key] = dict.fromkeys(VALUE_COLUMNS[rm]) | cells
        return out
