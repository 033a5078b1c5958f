"""What a snapshot reads (pure): the rows a filter selects, the source tables the chosen read
models are projected from, and the primary-key ranges (chunks) each table is read in.

Chunks are primary-key (uuid) ranges whose bounds come from the data itself (every
``chunk_size``-th key in key order), so chunks are even whatever the key distribution (random
v4 or time-ordered v7 keys).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from psycopg import sql

from tasks.core.catalog import COLUMNS, SOURCE_TABLES
from tasks.core.projection import project_row


def _synthetic_row(table: str) -> dict[str, Any]:
    samples = {
        "uuid": uuid.UUID(int=1),
        "timestamptz": datetime(2000, 1, 1, tzinfo=UTC),
        "text": "x",
        "int": 0,
        "jsonb": "{}",
    }
    return {col: samples[typ] for col, typ in COLUMNS[table].items()}


# Which read models each source table feeds, asked of the projection itself (one source of
# truth) by projecting a synthetic row.
FEEDS: Final[Mapping[str, frozenset[str]]] = {
    t: frozenset(u.read_model for u in project_row(t, _synthetic_row(t))) for t in SOURCE_TABLES
}


def tables_for(read_models: Collection[str]) -> tuple[str, ...]:
    """The source tables the given read models are projected from, in SOURCE_TABLES order."""
    wanted = set(read_models)
    return tuple(t for t in SOURCE_TABLES if FEEDS[t] & wanted)


@dataclass(frozen=True)
class SnapshotFilter:
    """Rows to read. ``user_ids``: sessions of these users, and turns/steps whose session
    belongs to them. ``created_from``/``created_to``: each row's own ``created_at`` in
    [from, to) - a read model row is projected from one source row, so each table is
    filtered on its own rows."""

    user_ids: tuple[uuid.UUID, ...] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """Canonical (sorted ids, UTC times): equal filters give equal JSON, which is how a
        resume finds the snapshot of an interrupted run."""

        def when(t: datetime | None) -> str | None:
            return t.astimezone(UTC).isoformat() if t else None

        ids = None if self.user_ids is None else sorted(str(u) for u in set(self.user_ids))
        return {
            "user_ids": ids,
            "created_from": when(self.created_from),
            "created_to": when(self.created_to),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SnapshotFilter:
        ids = d.get("user_ids")
        return cls(
            None if ids is None else tuple(uuid.UUID(u) for u in ids),
            datetime.fromisoformat(d["created_from"]) if d.get("created_from") else None,
            datetime.fromisoformat(d["created_to"]) if d.get("created_to") else None,
        )


@dataclass(frozen=True)
class KeyRange:
    """Primary keys in [lo, hi); None is unbounded. Postgres orders uuid bytewise, which is
    the order of ``uuid.UUID.int``, so Python and SQL agree on membership."""

    lo: uuid.UUID | None = None
    hi: uuid.UUID | None = None

    def contains(self, key: uuid.UUID) -> bool:
        return (self.lo is None or key >= self.lo) and (self.hi is None or key < self.hi)


@dataclass(frozen=True)
class ChunkPlan:
    table: str
    index: int
    key_range: KeyRange
    rows: int

    @property
    def id(self) -> str:
        return f"{self.table}-{self.index:05d}"


def plan_table(
    table: str, boundaries: Sequence[uuid.UUID], total_rows: int, chunk_size: int
) -> list[ChunkPlan]:
    """Chunks of one table from its boundary keys (the 1st, (chunk_size+1)th, ... key in key
    order). The first range is open below and the last open above, so together they cover
    the whole key space with no gap and no overlap."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be > 0")
    if total_rows == 0:
        return []
    if list(boundaries) != sorted(set(boundaries)):
        raise ValueError("boundaries must be distinct and ascending")
    expected = -(-total_rows // chunk_size)
    if len(boundaries) != expected:
        raise ValueError(
            f"{table}: {len(boundaries)} boundaries for {total_rows} rows in "
            f"chunks of {chunk_size} (expected {expected})"
        )
    bounds: list[uuid.UUID | None] = [None, *boundaries[1:], None]
    return [
        ChunkPlan(
            table,
            i,
            KeyRange(bounds[i], bounds[i + 1]),
            min(chunk_size, total_rows - i * chunk_size),
        )
        for i in range(expected)
    ]


def where(
    table: str, filt: SnapshotFilter, key_range: KeyRange | None = None
) -> tuple[sql.Composable, list[Any]]:
    """The SQL condition (and its parameters) selecting a table's rows of ``filt`` within
    ``key_range``."""
    conds: list[sql.Composable] = []
    params: list[Any] = []
    if filt.user_ids is not None:
        if table == "sessions":
            conds.append(sql.SQL("user_id = ANY(%s)"))
        else:
            conds.append(sql.SQL("session_id IN (SELECT id FROM sessions WHERE user_id = ANY(%s))"))
        params.append(list(filt.user_ids))
    if filt.created_from is not None:
        conds.append(sql.SQL("created_at >= %s"))
        params.append(filt.created_from)
    if filt.created_to is not None:
        conds.append(sql.SQL("created_at < %s"))
        params.append(filt.created_to)
    if key_range is not None and key_range.lo is not None:
        conds.append(sql.SQL("id >= %s"))
        params.append(key_range.lo)
    if key_range is not None and key_range.hi is not None:
        conds.append(sql.SQL("id < %s"))
        params.append(key_range.hi)
    clause = sql.SQL(" AND ").join(conds) if conds else sql.SQL("TRUE")
    return clause, params
