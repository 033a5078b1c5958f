"""The projection: one source change in, read-model mutations out. Pure: no I/O.

CDC, backfill, dual-write and audit all go through this module, so one source row version
always becomes the same cells with the same write timestamp (docs/architecture.md, "The one rule"):

- an Upsert/Delete carries ``timestamp_us`` = the source row's version (``updated_at`` in µs),
  or, for a delete, that version + 1 µs (``tombstone_version``); Scylla's last-write-wins
  then makes replays, duplicates, reordering and backfill/CDC overlap converge, and
  tombstones beat late events;
- values are canonical (tasks/core/codec.py), so what we write equals what we read.

Which source column fills which read-model column is the catalog's (tasks/core/catalog.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from functools import lru_cache
from typing import Any, Final, Literal

from tasks.core import catalog
from tasks.core.catalog import READ_MODELS, SOURCE_TABLES, VALUE_COLUMNS, Feed
from tasks.core.codec import TIMESTAMPTZ, Cell, cell_of
from tasks.core.errors import DecodeError, InvalidInput
from tasks.core.timestamps import micros_of

PLACEHOLDER_TEXT: Final = "__debezium_unavailable_value"


class _Unavailable(Enum):
    TOKEN = PLACEHOLDER_TEXT

    def __repr__(self) -> str:
        return "UNAVAILABLE"


# Debezium's TOAST placeholder once normalized: an object no real column value can equal.
UNAVAILABLE: Final = _Unavailable.TOKEN


@dataclass(frozen=True, slots=True)
class Change:
    table: str
    op: Literal["c", "u", "d", "r"]
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    version_us: int
    # True when ``change_of`` built it: its images are normalized by the rule ``project``
    # applies and ``version_us`` is what ``project`` would compute, so ``project`` takes them
    # as they are instead of normalizing every row twice (CDC decodes, then projects).
    normalized: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Upsert:
    read_model: str
    key: tuple[tuple[str, Any], ...]
    values: tuple[tuple[str, Any], ...]
    timestamp_us: int


@dataclass(frozen=True, slots=True)
class Delete:
    read_model: str
    key: tuple[tuple[str, Any], ...]
    timestamp_us: int


Mutation = Upsert | Delete
Key = tuple[tuple[str, Any], ...]

# --------------------------------------------------------------------------------------------
# Normalization: Debezium JSON values or native driver values -> one canonical Python form.


def _is_null(v: Any) -> bool:
    # pandas gives NaT / NaN for SQL NULL; they are the only values unequal to themselves.
    return v is None or (isinstance(v, float | datetime) and v != v)


def _is_placeholder_text(v: Any) -> bool:
    return isinstance(v, str) and v == PLACEHOLDER_TEXT


# Per table, what ``normalize_row`` needs of each column, looked up once: (name, decode,
# nullable, null_is_a_value). The catalog stays the one description; this is its index.
_ColumnPlan = tuple[tuple[str, Any, bool, bool], ...]
_PLANS: Final[dict[str, _ColumnPlan]] = {
    t.name: tuple((c.name, c.codec.decode, c.nullable, c.codec.null_is_a_value) for c in t.columns)
    for t in catalog.SOURCES.values()
}
_MISSING: Final = object()


def normalize_row(
    table: str,
    raw: Mapping[str, Any],
    *,
    partial: bool = False,
    toast_placeholders: bool = True,
) -> dict[str, Any]:
    """Coerce one row image into canonical values; unknown columns are dropped.

    ``partial`` accepts an incomplete image (a before-image): absent or NULL required columns
    are left out instead of raising. With ``toast_placeholders`` the Debezium placeholder text
    becomes :data:`UNAVAILABLE`; Postgres rows read directly pass False (the text is content).
    """
    plan = _PLANS.get(table) if isinstance(table, str) else None
    if plan is None:
        raise DecodeError(f"unknown source table {table!r}")  # as catalog.source says it
    if not isinstance(raw, Mapping):
        raise DecodeError(f"{table}: row image must be an object, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    get = raw.get
    for col, decode, nullable, null_is_a_value in plan:
        v = get(col, _MISSING)
        if v is _MISSING and col not in raw:  # `in` too: a Mapping may map a key to _MISSING
            if partial:
                continue
            raise DecodeError(f"{table}.{col}: required column missing")
        # Debezium's values are mostly text (uuids, timestamps, text, jsonb): the one check
        # such a value needs before its codec is whether it is the TOAST placeholder.
        if type(v) is str:
            if toast_placeholders and v == PLACEHOLDER_TEXT:
                out[col] = UNAVAILABLE
                continue
        elif v is UNAVAILABLE or (toast_placeholders and _is_placeholder_text(v)):
            out[col] = UNAVAILABLE
            continue
        elif _is_null(v):
            if not null_is_a_value:
                if nullable:
                    out[col] = None
                elif not partial:
                    raise DecodeError(f"{table}.{col}: NULL in a NOT NULL column")
                continue
            v = None
        try:
            out[col] = decode(v)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            # The value's type, never the value: this text reaches logs and the dead-letter
            # headers, and a value is row content (the dead-lettered message holds it).
            raise DecodeError(f"{table}.{col}: {exc} (a {type(v).__name__})") from None
    return out


def version_of(row: Mapping[str, Any]) -> int:
    """A row's version: ``updated_at`` in microseconds since the epoch."""
    v = row.get("updated_at") if isinstance(row, Mapping) else None
    if type(v) is datetime and v.tzinfo is UTC:  # a normalized row's: already canonical
        return micros_of(v)
    if _is_null(v) or v is UNAVAILABLE or _is_placeholder_text(v):
        raise DecodeError(f"row has no usable updated_at (got {type(v).__name__})")
    try:
        return micros_of(TIMESTAMPTZ.decode(v))
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"updated_at: {exc} (a {type(v).__name__})") from None


def tombstone_version(before: Mapping[str, Any]) -> int:
    """The write timestamp of a delete: the deleted row's version + 1 µs.

    The smallest stamp that shadows every version the row ever had, and not the delete's
    commit time: a row re-inserted with the same key (in the deleting transaction, or in one
    that waited on it) is stamped before that commit, and a commit-time tombstone would hide
    it for good. The write model guarantees a re-insert a version above this one (migration
    0007); docs/decisions.md, "Versions over a key's whole life"."""
    if not isinstance(before, Mapping) or not isinstance(before.get("updated_at"), datetime):
        raise DecodeError("delete's before image lacks updated_at (REPLICA IDENTITY FULL?)")
    return micros_of(before["updated_at"]) + 1


def change_from_row(table: str, row: Mapping[str, Any]) -> Change:
    """A current Postgres row as a snapshot-read change (op ``r``)."""
    return change_of(table, "r", None, row)


def change_of(
    table: str,
    op: Literal["c", "u", "d", "r"],
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> Change:
    """A change from raw row images, normalized once, as ``project`` would normalize them:
    ``project`` then takes them as they are (``Change.normalized``). The one rule of which
    image may hold TOAST placeholders lives here."""
    if op == "d":
        if before is None:
            raise DecodeError(f"{table}: delete without a before image (REPLICA IDENTITY FULL?)")
        gone = normalize_row(table, before, partial=True, toast_placeholders=False)
        return Change(table, "d", gone, None, tombstone_version(gone), normalized=True)
    if op not in ("c", "r", "u"):
        raise DecodeError(f"{table}: unknown op {op!r}")
    if after is None:
        raise DecodeError(f"{table}: op {op!r} without an after image")
    # Only an update's after image can hold placeholders (unchanged TOASTed columns).
    new = normalize_row(table, after, toast_placeholders=op == "u")
    old = None
    if op == "u" and before is not None:
        old = normalize_row(table, before, partial=True, toast_placeholders=False)
    return Change(table, op, old, new, version_of(new), normalized=True)


# --------------------------------------------------------------------------------------------
# Projection

_Cells = tuple[tuple[str, str, Cell], ...]


@lru_cache(maxsize=64)
def cells(table: str, feed: Feed) -> tuple[_Cells, _Cells]:
    """(key, values) of a feed as (read-model column, source column, conversion), the
    conversion picked by the catalog's types (``codec.cell_of``)."""
    src, model = catalog.SOURCES[table], catalog.TABLES[feed.read_model]

    def convert(pairs: tuple[tuple[str, str], ...]) -> _Cells:
        return tuple(
            (d, s, cell_of(src.column(s).codec, model.column(d).cql_type)) for d, s in pairs
        )

    return convert(feed.key), convert(feed.values)


# A feed as the row path runs it: (feed, key cells, value cells), each cell (read-model
# column, source column, the conversion's bound ``cell`` method). Built once per (table, read
# models): hashing a Feed (nested tuples) on every call cost more than the projection itself.
_Plan = tuple[tuple[Feed, tuple[tuple[str, str, Any], ...], tuple[tuple[str, str, Any], ...]], ...]
_FEED_PLANS: dict[tuple[str, Any], _Plan] = {}


_PLANS_OF: list[object] = [None]  # the catalog.FEEDS the plans were built from


def _feed_plan(table: str, read_models: Collection[str] | None) -> _Plan:
    if catalog.FEEDS is not _PLANS_OF[0]:  # replaced (tests break the mapping on purpose)
        _FEED_PLANS.clear()
        _PLANS_OF[0] = catalog.FEEDS
    try:
        return _FEED_PLANS[table, read_models]
    except (KeyError, TypeError):  # not built yet, or read_models unhashable (a list)
        pass
    plan = tuple(
        (feed, *(tuple((d, s, conv.cell) for d, s, conv in part) for part in cells(table, feed)))
        for feed in catalog.feeds_of(table, read_models)
    )
    if isinstance(read_models, tuple | frozenset | str | None) and len(_FEED_PLANS) < 256:
        _FEED_PLANS[table, read_models] = plan  # type: ignore[assignment]
    return plan  # type: ignore[return-value]


def _key(
    table: str, key_cells: tuple[tuple[str, str, Any], ...], row: Mapping[str, Any], image: str
) -> Key | None:
    """The read-model key of a row image, or None when a key column is absent."""
    key = []
    for dst, src, cell in key_cells:
        v = row.get(src)
        if v is None:
            return None
        if v is UNAVAILABLE:
            raise DecodeError(f"{table}.{src}: TOAST placeholder in {image} key column")
        key.append((dst, cell(v)))
    return tuple(key)


_ABSENT: Final = object()


def _upsert(
    plan: tuple[Feed, tuple[tuple[str, str, Any], ...], tuple[tuple[str, str, Any], ...]],
    table: str,
    after: Mapping[str, Any],
    before: Mapping[str, Any] | None,
    version: int,
) -> Upsert:
    feed, key_cells, value_cells = plan
    key = _key(table, key_cells, after, "after")
    if key is None:  # normalize_row guarantees key columns; this guards direct misuse
        raise DecodeError(f"{table}: after image lacks a key column of {feed.read_model}")
    values: list[tuple[str, Any]] = list(feed.constants)
    for dst, src, cell in value_cells:
        v = after[src]
        if v is UNAVAILABLE:
            # Unchanged TOASTed value: REPLICA IDENTITY FULL puts it in before. Without it,
            # write nothing: the cell already holds this value from an earlier version.
            v = before.get(src, _ABSENT) if before is not None else _ABSENT
            if v is _ABSENT or v is UNAVAILABLE:
                continue
        values.append((dst, None if v is None else cell(v)))
    return Upsert(feed.read_model, key, tuple(values), version)


def project(change: Change, read_models: Collection[str] | None = None) -> list[Mutation]:
    """The mutations that apply one source change to the read models."""
    table, op = change.table, change.op
    plans = _feed_plan(table, read_models)
    if op in ("c", "r", "u"):
        if change.after is None:
            raise DecodeError(f"{table}: op {op!r} without an after image")
        if change.normalized:  # by ``change_of``, with the rule below
            after, before, version = change.after, change.before, change.version_us
        else:
            # Only an update's after image can hold placeholders (unchanged TOASTed columns).
            after = normalize_row(table, change.after, toast_placeholders=op == "u")
            before = None
            if op == "u" and change.before is not None:
                before = normalize_row(table, change.before, partial=True, toast_placeholders=False)
            version = version_of(after)
        out: list[Mutation] = []
        for plan in plans:
            up = _upsert(plan, table, after, before, version)
            # A key change moves the read-model row: delete the old one at this version.
            # (Without a before image the old key is unknown; REPLICA IDENTITY FULL gives it.)
            old = _key(table, plan[1], before, "before") if before is not None else None
            if old is not None and old != up.key:
                out.append(Delete(up.read_model, old, version))
            out.append(up)
        return out
    if op == "d":
        if change.before is None:
            raise DecodeError(f"{table}: delete without a before image (REPLICA IDENTITY FULL?)")
        if change.normalized:
            before, ts = change.before, change.version_us
        else:
            before = normalize_row(table, change.before, partial=True, toast_placeholders=False)
            ts = tombstone_version(before)
        deletes: list[Mutation] = []
        for feed, key_cells, _ in plans:
            key = _key(table, key_cells, before, "before")
            if key is None:
                missing = [s for _, s in feed.key if before.get(s) is None]
                raise DecodeError(f"{table}: delete's before image lacks {missing}")
            deletes.append(Delete(feed.read_model, key, ts))
        return deletes
    raise DecodeError(f"{table}: unknown op {op!r}")


def project_row(
    table: str, row: Mapping[str, Any], read_models: Collection[str] | None = None
) -> list[Upsert]:
    """A current Postgres row (snapshot, dual-write, audit) as read-model upserts."""
    plans = _feed_plan(table, read_models)
    after = normalize_row(table, row, toast_placeholders=False)
    version = version_of(after)
    return [_upsert(plan, table, after, None, version) for plan in plans]


def compact(mutations: Iterable[Mutation]) -> list[Mutation]:
    """Drop the mutations of a batch that the others make invisible, so the store gets fewer
    writes and the end state is the same under last-write-wins:

    - an upsert whose cells and row marker a newer upsert of the same key writes again (same
      columns or more, a later timestamp), or an identical copy of another;
    - an upsert at or below a delete of its key (the tombstone wins ties);
    - all but the newest delete of a key.

    Under load the CDC batches grow, so a hot session's many header updates collapse into
    one write: the consumer does less work exactly when it is behind."""
    newest_delete: dict[tuple[str, Key], int] = {}
    upserts: dict[tuple[str, Key], list[Upsert]] = {}
    for m in mutations:
        k = (m.read_model, m.key)
        if isinstance(m, Delete):
            newest_delete[k] = max(newest_delete.get(k, m.timestamp_us), m.timestamp_us)
        else:
            upserts.setdefault(k, []).append(m)
    out: list[Mutation] = [Delete(rm, key, ts) for (rm, key), ts in newest_delete.items()]
    for k, ups in upserts.items():
        floor = newest_delete.get(k)
        if len(ups) == 1:  # most keys in a batch: nothing to compare it with
            if floor is None or ups[0].timestamp_us > floor:
                out.append(ups[0])
            continue
        alive = [u for u in ups if floor is None or u.timestamp_us > floor]
        # Newest first; keep an upsert unless one already kept covers it.
        alive.sort(key=lambda u: u.timestamp_us, reverse=True)
        kept: list[Upsert] = []
        for u in alive:
            cols = {c for c, _ in u.values}
            if any(
                u == w or (w.timestamp_us > u.timestamp_us and cols <= {c for c, _ in w.values})
                for w in kept
            ):
                continue
            kept.append(u)
        out.extend(kept)
    return out


def expected_rows(
    rows_by_table: Mapping[str, Iterable[Mapping[str, Any]]], read_model: str
) -> dict[Key, dict[str, Any]]:
    """What ``read_model`` should hold given the current Postgres rows: key -> every value
    column, None where Cassandra would read back null."""
    if read_model not in READ_MODELS:
        raise InvalidInput(f"unknown read model {read_model!r}")
    out: dict[Key, dict[str, Any]] = {}
    for table, rows in rows_by_table.items():
        if table not in SOURCE_TABLES:
            raise InvalidInput(f"unknown source table {table!r}")
        plans = _feed_plan(table, (read_model,))
        for raw in rows:
            row = normalize_row(table, raw, toast_placeholders=False)
            if any(v is UNAVAILABLE for v in row.values()):
                raise DecodeError(f"{table}: a current row cannot hold the TOAST placeholder")
            for plan in plans:
                up = _upsert(plan, table, row, None, version_of(row))
                if up.key in out:
                    raise InvalidInput(f"{read_model}: two source rows share key {up.key}")
                out[up.key] = dict.fromkeys(VALUE_COLUMNS[read_model]) | dict(up.values)
    return out
