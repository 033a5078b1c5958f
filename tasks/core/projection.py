"""The projection: one source change in, read-model mutations out. Pure: no I/O.

CDC, backfill, dual-write and audit all go through this module, so one source row version
always becomes the same cells with the same write timestamp (docs/architecture.md, "The one rule"):

- an Upsert/Delete carries ``timestamp_us`` = the source row's version (``updated_at`` in µs),
  or, for a delete, that version + 1 µs (``tombstone_version``); Scylla's last-write-wins
  then makes replays, duplicates, reordering and backfill/CDC overlap converge, and
  tombstones beat late events;
- values are canonical: UUIDs, UTC datetimes truncated to the millisecond that a CQL
  ``timestamp`` keeps, payload as canonical JSON text; so what we write equals what we read.
"""

from __future__ import annotations

import json
import operator
import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final, Literal

from tasks.core.errors import DecodeError, InvalidInput

SOURCE_TABLES: Final = ("sessions", "human_turns", "agent_turns", "steps")
READ_MODELS: Final = (
    "recent_conversations",
    "conversation_timeline",
    "sessions_by_id",
    "steps_by_turn",
)

# Primary key and other columns of each read model, in schemas/scylla order.
KEY_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "recent_conversations": ("user_id", "created_at", "session_id"),
    "conversation_timeline": ("session_id", "created_at", "created_at_micros", "turn_id"),
    "sessions_by_id": ("session_id",),
    "steps_by_turn": ("agent_turn_id", "created_at", "created_at_micros", "step_id"),
}
VALUE_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "recent_conversations": ("title", "last_message", "last_message_at", "turn_count"),
    "conversation_timeline": ("role", "content", "model"),
    "sessions_by_id": (
        "user_id",
        "title",
        "created_at",
        "last_message",
        "last_message_at",
        "turn_count",
    ),
    "steps_by_turn": ("session_id", "kind", "payload"),
}

# Write-model columns and their types (schemas/postgres/0001). Others are ignored, so a column
# added to Postgres later does not break decoding.
COLUMNS: Final[Mapping[str, Mapping[str, str]]] = {
    "sessions": {
        "id": "uuid",
        "user_id": "uuid",
        "title": "text",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
        "last_message": "text",
        "last_message_at": "timestamptz",
        "turn_count": "int",
    },
    "human_turns": {
        "id": "uuid",
        "session_id": "uuid",
        "content": "text",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "agent_turns": {
        "id": "uuid",
        "session_id": "uuid",
        "content": "text",
        "model": "text",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "steps": {
        "id": "uuid",
        "agent_turn_id": "uuid",
        "session_id": "uuid",
        "kind": "text",
        "payload": "jsonb",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
}
_NULLABLE: Final = frozenset({("sessions", "last_message_at")})

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


@dataclass(frozen=True, slots=True)
class _Spec:
    """How one source table feeds one read model: (read-model column, source column) pairs."""

    read_model: str
    key: tuple[tuple[str, str], ...]
    values: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, str], ...] = ()


_SESSION_VALUES = (
    ("title", "title"),
    ("last_message", "last_message"),
    ("last_message_at", "last_message_at"),
    ("turn_count", "turn_count"),
)
_TURN_KEY = (
    ("session_id", "session_id"),
    ("created_at", "created_at"),
    ("created_at_micros", "created_at"),
    ("turn_id", "id"),
)
_SPECS: Final[Mapping[str, tuple[_Spec, ...]]] = {
    "sessions": (
        _Spec(
            "recent_conversations",
            (("user_id", "user_id"), ("created_at", "created_at"), ("session_id", "id")),
            _SESSION_VALUES,
        ),
        _Spec(
            "sessions_by_id",
            (("session_id", "id"),),
            (
                ("user_id", "user_id"),
                ("title", "title"),
                ("created_at", "created_at"),
                *_SESSION_VALUES[1:],
            ),
        ),
    ),
    # Human turns have no model: writing None would put a tombstone cell in the row.
    "human_turns": (
        _Spec("conversation_timeline", _TURN_KEY, (("content", "content"),), (("role", "human"),)),
    ),
    "agent_turns": (
        _Spec(
            "conversation_timeline",
            _TURN_KEY,
            (("content", "content"), ("model", "model")),
            (("role", "agent"),),
        ),
    ),
    "steps": (
        _Spec(
            "steps_by_turn",
            (
                ("agent_turn_id", "agent_turn_id"),
                ("created_at", "created_at"),
                ("created_at_micros", "created_at"),
                ("step_id", "id"),
            ),
            (("session_id", "session_id"), ("kind", "kind"), ("payload", "payload")),
        ),
    ),
}

# --------------------------------------------------------------------------------------------
# Normalization: Debezium JSON values or native driver values -> one canonical Python form.


class _CanonicalJson(str):
    """JSON text already in canonical form: normalizing it again skips a parse and a dump."""

    __slots__ = ()


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)
_ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d\d(?::?\d\d)?)\Z"
)


def _to_uuid(v: Any) -> uuid.UUID:
    if isinstance(v, uuid.UUID):
        return v
    if isinstance(v, str):
        return uuid.UUID(v)
    if isinstance(v, bytes | bytearray) and len(v) == 16:  # pyarrow fixed_size_binary(16)
        return uuid.UUID(bytes=bytes(v))
    raise TypeError(f"expected a uuid, got {type(v).__name__}")


def _to_datetime(v: Any) -> datetime:
    if isinstance(v, datetime):
        if v.utcoffset() is None:
            # A naive value is ambiguous (local? UTC?): refuse rather than guess.
            raise ValueError("naive datetime; timestamps must be timezone-aware")
        u = v.astimezone(UTC)
        # Rebuild subclasses (pandas.Timestamp) as a plain datetime, dropping nanoseconds.
        return (
            u
            if type(u) is datetime
            else datetime(
                u.year, u.month, u.day, u.hour, u.minute, u.second, u.microsecond, tzinfo=UTC
            )
        )
    if isinstance(v, str):
        m = _ISO.match(v)
        if m is None:
            raise ValueError("not an ISO-8601 timestamp with a UTC offset")
        y, mo, d, h, mi, s, frac, tz = m.groups()
        micros = int((frac or "").ljust(9, "0")[:6])  # Postgres keeps µs; drop finer digits
        offset = timedelta(0)
        if tz != "Z":
            digits = tz[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
            offset = -offset if tz[0] == "-" else offset
        local = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), micros, tzinfo=UTC)
        return local - offset
    raise TypeError(f"expected a timestamp, got {type(v).__name__}")


def _to_text(v: Any) -> str:
    if isinstance(v, str):
        return v if type(v) is str else str(v)
    raise TypeError(f"expected text, got {type(v).__name__}")


def _to_int(v: Any) -> int:
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    i = operator.index(v)  # also numpy integers
    if not -(2**31) <= i < 2**31:
        raise ValueError("out of range for a CQL int")
    return i


def _to_json(v: Any) -> _CanonicalJson:
    if isinstance(v, _CanonicalJson):
        return v
    if isinstance(v, str | bytes | bytearray):
        # JSON text: Debezium sends jsonb as text, and so does `payload::text`. A psycopg jsonb
        # value that is a bare JSON string would be ambiguous here: read jsonb as text then.
        obj = json.loads(v)
    elif v is None or isinstance(v, dict | list | int | float):
        obj = v  # decoded JSON (psycopg's jsonb loader); None is JSON null (column NOT NULL)
    else:
        raise TypeError(f"expected JSON, got {type(v).__name__}")
    return _CanonicalJson(canonical_json(obj))


def canonical_json(obj: Any) -> str:
    """The one text form of a JSON value, whichever path decoded it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_CONVERT: Final = {
    "uuid": _to_uuid,
    "timestamptz": _to_datetime,
    "text": _to_text,
    "int": _to_int,
    "jsonb": _to_json,
}


def _columns(table: str) -> Mapping[str, str]:
    try:
        return COLUMNS[table]
    except (KeyError, TypeError):
        raise DecodeError(f"unknown source table {table!r}") from None


def _is_null(v: Any) -> bool:
    # pandas gives NaT / NaN for SQL NULL; they are the only values unequal to themselves.
    return v is None or (isinstance(v, float | datetime) and v != v)


def _is_placeholder_text(v: Any) -> bool:
    return isinstance(v, str) and v == PLACEHOLDER_TEXT


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
    columns = _columns(table)
    if not isinstance(raw, Mapping):
        raise DecodeError(f"{table}: row image must be an object, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for col, typ in columns.items():
        if col not in raw:
            if partial:
                continue
            raise DecodeError(f"{table}.{col}: required column missing")
        v = raw[col]
        if v is UNAVAILABLE or (toast_placeholders and _is_placeholder_text(v)):
            out[col] = UNAVAILABLE
            continue
        if _is_null(v) and typ != "jsonb":
            if (table, col) in _NULLABLE:
                out[col] = None
            elif not partial:
                raise DecodeError(f"{table}.{col}: NULL in a NOT NULL column")
            continue
        try:
            out[col] = _CONVERT[typ](None if _is_null(v) else v)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise DecodeError(f"{table}.{col}: {exc} (value {v!r:.80})") from None
    return out


def _micros(dt: datetime) -> int:
    return (dt - _EPOCH) // _ONE_US


def version_of(row: Mapping[str, Any]) -> int:
    """A row's version: ``updated_at`` in microseconds since the epoch."""
    v = row.get("updated_at") if isinstance(row, Mapping) else None
    if _is_null(v) or v is UNAVAILABLE or _is_placeholder_text(v):
        raise DecodeError(f"row has no usable updated_at (got {v!r:.80})")
    try:
        return _micros(_to_datetime(v))
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"updated_at: {exc} (value {v!r:.80})") from None


def tombstone_version(before: Mapping[str, Any]) -> int:
    """The write timestamp of a delete: the deleted row's version + 1 µs.

    The smallest stamp that shadows every version the row ever had, and not the delete's
    commit time: a row re-inserted with the same key (in the deleting transaction, or in one
    that waited on it) is stamped before that commit, and a commit-time tombstone would hide
    it for good. The write model guarantees a re-insert a version above this one (migration
    0007); docs/decisions.md, "Versions over a key's whole life"."""
    if not isinstance(before, Mapping) or not isinstance(before.get("updated_at"), datetime):
        raise DecodeError("delete's before image lacks updated_at (REPLICA IDENTITY FULL?)")
    return _micros(before["updated_at"]) + 1


def change_from_row(table: str, row: Mapping[str, Any]) -> Change:
    """A current Postgres row as a snapshot-read change (op ``r``)."""
    after = normalize_row(table, row, toast_placeholders=False)
    return Change(table, "r", None, after, version_of(after))


# --------------------------------------------------------------------------------------------
# Projection


def _cell(v: Any) -> Any:
    if isinstance(v, datetime):  # CQL timestamp = ms: write exactly what we will read back
        return v.replace(microsecond=v.microsecond // 1000 * 1000)
    if isinstance(v, _CanonicalJson):
        return str(v)
    return v


def read_models_of(table: str) -> tuple[str, ...]:
    """The read models a source table feeds."""
    if table not in _SPECS:
        raise DecodeError(f"unknown source table {table!r}")
    return tuple(s.read_model for s in _SPECS[table])


def _specs(table: str, read_models: Collection[str] | None) -> tuple[_Spec, ...]:
    if table not in _SPECS:
        raise DecodeError(f"unknown source table {table!r}")
    if read_models is None:
        return _SPECS[table]
    wanted = {read_models} if isinstance(read_models, str) else set(read_models)
    if unknown := wanted.difference(READ_MODELS):
        raise InvalidInput(f"unknown read model(s): {sorted(unknown)}")
    return tuple(s for s in _SPECS[table] if s.read_model in wanted)


# Read-model columns holding the microseconds past the millisecond of their source timestamp:
# CQL timestamps stop at ms, and rows written within one ms must still keep their order.
_MICROS_COLUMNS: Final = frozenset({"created_at_micros"})


def _key(spec: _Spec, table: str, row: Mapping[str, Any], image: str) -> Key | None:
    """The read-model key of a row image, or None when a key column is absent."""
    key = []
    for dst, src in spec.key:
        v = row.get(src)
        if v is None:
            return None
        if v is UNAVAILABLE:
            raise DecodeError(f"{table}.{src}: TOAST placeholder in {image} key column")
        key.append((dst, v.microsecond % 1000 if dst in _MICROS_COLUMNS else _cell(v)))
    return tuple(key)


_ABSENT: Final = object()


def _upsert(
    spec: _Spec,
    table: str,
    after: Mapping[str, Any],
    before: Mapping[str, Any] | None,
    version: int,
) -> Upsert:
    key = _key(spec, table, after, "after")
    if key is None:  # normalize_row guarantees key columns; this guards direct misuse
        raise DecodeError(f"{table}: after image lacks a key column of {spec.read_model}")
    values = list(spec.constants)
    for dst, src in spec.values:
        v = after[src]
        if v is UNAVAILABLE:
            # Unchanged TOASTed value: REPLICA IDENTITY FULL puts it in before. Without it,
            # write nothing: the cell already holds this value from an earlier version.
            v = before.get(src, _ABSENT) if before is not None else _ABSENT
            if v is _ABSENT or v is UNAVAILABLE:
                continue
        values.append((dst, _cell(v)))
    return Upsert(spec.read_model, key, tuple(values), version)


def project(change: Change, read_models: Collection[str] | None = None) -> list[Mutation]:
    """The mutations that apply one source change to the read models."""
    table, op = change.table, change.op
    specs = _specs(table, read_models)
    if op in ("c", "r", "u"):
        if change.after is None:
            raise DecodeError(f"{table}: op {op!r} without an after image")
        # Only an update's after image can hold placeholders (unchanged TOASTed columns).
        after = normalize_row(table, change.after, toast_placeholders=op == "u")
        before = None
        if op == "u" and change.before is not None:
            before = normalize_row(table, change.before, partial=True, toast_placeholders=False)
        version = version_of(after)
        out: list[Mutation] = []
        for spec in specs:
            up = _upsert(spec, table, after, before, version)
            # A key change moves the read-model row: delete the old one at this version.
            # (Without a before image the old key is unknown; REPLICA IDENTITY FULL gives it.)
            old = _key(spec, table, before, "before") if before is not None else None
            if old is not None and old != up.key:
                out.append(Delete(spec.read_model, old, version))
            out.append(up)
        return out
    if op == "d":
        if change.before is None:
            raise DecodeError(f"{table}: delete without a before image (REPLICA IDENTITY FULL?)")
        before = normalize_row(table, change.before, partial=True, toast_placeholders=False)
        ts = tombstone_version(before)
        deletes: list[Mutation] = []
        for spec in specs:
            key = _key(spec, table, before, "before")
            if key is None:
                missing = [s for _, s in spec.key if before.get(s) is None]
                raise DecodeError(f"{table}: delete's before image lacks {missing}")
            deletes.append(Delete(spec.read_model, key, ts))
        return deletes
    raise DecodeError(f"{table}: unknown op {op!r}")


def project_row(
    table: str, row: Mapping[str, Any], read_models: Collection[str] | None = None
) -> list[Upsert]:
    """A current Postgres row (snapshot, dual-write, audit) as read-model upserts."""
    specs = _specs(table, read_models)
    after = normalize_row(table, row, toast_placeholders=False)
    version = version_of(after)
    return [_upsert(spec, table, after, None, version) for spec in specs]


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
        specs = _specs(table, (read_model,))
        for raw in rows:
            row = normalize_row(table, raw, toast_placeholders=False)
            if any(v is UNAVAILABLE for v in row.values()):
                raise DecodeError(f"{table}: a current row cannot hold the TOAST placeholder")
            for spec in specs:
                up = _upsert(spec, table, row, None, version_of(row))
                if up.key in out:
                    raise InvalidInput(f"{read_model}: two source rows share key {up.key}")
                out[up.key] = dict.fromkeys(VALUE_COLUMNS[read_model]) | dict(up.values)
    return out


# --------------------------------------------------------------------------------------------
# CQL


_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}\Z")


def to_cql(m: Mutation, keyspace: str) -> tuple[str, tuple[Any, ...]]:
    """Statement text and bind parameters. The text depends only on the read model and the
    column names, so the writer can cache prepared statements by it."""
    if not _IDENT.match(keyspace):
        raise InvalidInput(f"invalid keyspace name {keyspace!r}")
    if m.read_model not in READ_MODELS:
        raise InvalidInput(f"unknown read model {m.read_model!r}")
    key_cols = tuple(c for c, _ in m.key)
    if key_cols != KEY_COLUMNS[m.read_model]:
        raise InvalidInput(f"{m.read_model}: key columns {key_cols} are not the primary key")
    table = f"{keyspace}.{m.read_model}"
    if isinstance(m, Upsert):
        cols = key_cols + tuple(c for c, _ in m.values)
        if unknown := set(cols[len(key_cols) :]).difference(VALUE_COLUMNS[m.read_model]):
            raise InvalidInput(f"{m.read_model}: unknown columns {sorted(unknown)}")
        return (
            _insert_text(table, cols),
            (*(v for _, v in m.key), *(v for _, v in m.values), m.timestamp_us),
        )
    where = " AND ".join(f"{c} = ?" for c in key_cols)
    return (
        f"DELETE FROM {table} USING TIMESTAMP ? WHERE {where}",
        (m.timestamp_us, *(v for _, v in m.key)),
    )


def _insert_text(table: str, cols: tuple[str, ...]) -> str:
    marks = ", ".join("?" * len(cols))
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks}) USING TIMESTAMP ?"


# --------------------------------------------------------------------------------------------
# Columnar: a whole Arrow record batch of current rows at once (the backfill's load stage)


@dataclass(frozen=True, slots=True)
class ColumnarUpserts:
    """The upserts of many source rows into one read model: the statement text ``to_cql``
    gives each of them, and their bind parameters in the same order (key, values, version)."""

    read_model: str
    cql: str
    params: list[tuple[Any, ...]]


_ONE_MS: Final = timedelta(milliseconds=1)


_UNKNOWN_SAFETY: Final = uuid.SafeUUID.unknown  # an enum member lookup costs a property call


def _uuid_from_bytes(b: bytes) -> uuid.UUID:
    """``uuid.UUID(bytes=b)`` without its argument checks (a third of the cost for a million
    rows; the bytes are 16 by the Arrow type): the object UUID's own __init__ builds."""
    u = object.__new__(uuid.UUID)
    object.__setattr__(u, "int", int.from_bytes(b, "big"))
    object.__setattr__(u, "is_safe", _UNKNOWN_SAFETY)
    return u


def _checked_arrow_column(table: str, col: str, typ: str, array: Any) -> Any:
    """The column's array (a uuid column's 16-byte storage) once its type and its NULLs fit
    the write model; a DecodeError naming the column otherwise."""
    import pyarrow as pa

    if array.null_count and (table, col) not in _NULLABLE and typ != "jsonb":
        raise DecodeError(f"{table}.{col}: NULL in a NOT NULL column")
    if typ == "uuid":
        storage = array.storage if isinstance(array.type, pa.BaseExtensionType) else array
        if storage.type != pa.binary(16):
            raise DecodeError(f"{table}.{col}: expected 16-byte uuids, got {array.type}")
        return storage
    # Any zone: an Arrow timestamp with a zone stores UTC instants. Naive ones are refused as
    # the row path refuses naive datetimes.
    if typ == "timestamptz" and not (
        pa.types.is_timestamp(array.type) and array.type.unit == "us" and array.type.tz
    ):
        raise DecodeError(
            f"{table}.{col}: expected timestamp[us] with a time zone, got {array.type}"
        )
    return array


def _arrow_column(table: str, col: str, typ: str, array: Any) -> tuple[list[Any], list[Any]]:
    """(canonical values, µs since the epoch for timestamps) of one Arrow column, converted
    column-wise as normalize_row would per cell: UUIDs from their 16 bytes, timestamps
    truncated to the CQL millisecond, JSON canonical. NULL only where the write model
    allows it."""
    import pyarrow as pa  # here, not at the top: CDC and dual-write never load pyarrow

    array = _checked_arrow_column(table, col, typ, array)
    if typ == "uuid":
        return [None if b is None else _uuid_from_bytes(b) for b in array.to_pylist()], []
    if typ == "timestamptz":
        micros = array.cast(pa.int64()).to_pylist()
        try:
            return (
                [None if us is None else _EPOCH + (us // 1000) * _ONE_MS for us in micros],
                micros,
            )
        except OverflowError as exc:  # beyond year 9999, as the row path reports it
            raise DecodeError(f"{table}.{col}: {exc}") from None
    values = array.to_pylist()
    try:
        if typ == "int":
            return [None if v is None else _to_int(v) for v in values], []
        if typ == "jsonb":  # as text, the way _cell writes canonical JSON; NULL is JSON null
            return [str(_to_json("null" if v is None else v)) for v in values], []
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"{table}.{col}: {exc}") from None
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        raise DecodeError(f"{table}.{col}: expected text, got {array.type}")
    return values, []


def _batch_specs(
    table: str, batch: Any, keyspace: str, read_models: Collection[str] | None
) -> tuple[_Spec, ...]:
    """What a record batch of ``table`` feeds, once the keyspace and its columns are valid."""
    if not _IDENT.match(keyspace):
        raise InvalidInput(f"invalid keyspace name {keyspace!r}")
    specs = _specs(table, read_models)
    names = set(batch.schema.names)
    if missing := [c for c in COLUMNS[table] if c not in names]:
        raise DecodeError(f"{table}: required column(s) missing: {missing}")
    return specs


def project_arrow(
    table: str, batch: Any, keyspace: str, read_models: Collection[str] | None = None
) -> list[ColumnarUpserts]:
    """``project_row`` then ``to_cql`` for every row of a pyarrow RecordBatch of current rows,
    column by column: the same statements and the same parameters (tests/unit check it row
    for row), at a fraction of the per-row cost. Rows are snapshot reads: TOAST placeholders
    cannot occur, so that text is kept as content, as project_row keeps it."""
    specs = _batch_specs(table, batch, keyspace, read_models)
    values: dict[str, list[Any]] = {}
    micros: dict[str, list[Any]] = {}
    for col, typ in COLUMNS[table].items():
        values[col], micros[col] = _arrow_column(table, col, typ, batch.column(col))
    out: list[ColumnarUpserts] = []
    for spec in specs:
        # Same order as _upsert and to_cql: key, constants, values, then the version.
        cols = [dst for dst, _ in (*spec.key, *spec.constants, *spec.values)]
        columns = [
            [us % 1000 for us in micros[src]] if dst in _MICROS_COLUMNS else values[src]
            for dst, src in spec.key
        ]
        columns += [[const] * batch.num_rows for _, const in spec.constants]
        columns += [values[src] for _, src in spec.values]
        columns.append(micros["updated_at"])
        out.append(
            ColumnarUpserts(
                spec.read_model,
                _insert_text(f"{keyspace}.{spec.read_model}", tuple(cols)),
                list(zip(*columns, strict=True)),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Columnar, typed: the same upserts as Arrow arrays in CQL terms (the "sstable" load method
# hands them to Cassandra's SSTable writer without a Python object per cell)


@dataclass(frozen=True, slots=True)
class ArrowUpserts:
    """``project_arrow``'s upserts as one Arrow array per bind marker of ``cql``, in CQL terms:
    uuid → fixed_size_binary(16), timestamp → int64 ms since the epoch, int → int32, text →
    string; the last array is the row's version (int64 µs), the ``USING TIMESTAMP``. Row i of
    the arrays is parameter tuple i of ``project_arrow`` (tests/unit prove it)."""

    read_model: str
    cql: str
    arrays: list[Any]


# The range a datetime holds (the row path fails beyond it; Arrow would not).
_MIN_US: Final = -62_135_596_800_000_000  # 0001-01-01
_MAX_US: Final = 253_402_300_799_999_999  # 9999-12-31 23:59:59.999999


def _arrow_cql_column(table: str, col: str, typ: str, array: Any) -> tuple[Any, Any]:
    """(values in CQL terms, µs since the epoch as int64 numpy for timestamps, else None) of
    one Arrow column, checked as ``_arrow_column`` checks it (``_checked_arrow_column``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    array = _checked_arrow_column(table, col, typ, array)
    if typ == "uuid":
        return array, None
    if typ == "timestamptz":
        micros = array.cast(pa.int64())
        us = micros.fill_null(0).to_numpy()
        if len(us) and (us.min() < _MIN_US or us.max() > _MAX_US):
            raise DecodeError(f"{table}.{col}: a timestamp beyond the years 1 to 9999")
        mask = micros.is_null().to_numpy(zero_copy_only=False) if micros.null_count else None
        return pa.array(np.floor_divide(us, 1000), pa.int64(), mask=mask), us
    if typ == "int":
        if not pa.types.is_integer(array.type):
            raise DecodeError(f"{table}.{col}: expected an integer, got {array.type}")
        try:
            return array.cast(pa.int32()), None  # safe cast: out of range raises
        except pa.ArrowInvalid as exc:
            raise DecodeError(f"{table}.{col}: out of range for a CQL int ({exc})") from None
    if typ == "jsonb":
        values = array.to_pylist()
        try:
            return pa.array(
                [str(_to_json("null" if v is None else v)) for v in values], pa.string()
            ), None
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise DecodeError(f"{table}.{col}: {exc}") from None
    if pa.types.is_large_string(array.type):
        return pc.cast(array, pa.string()), None
    if not pa.types.is_string(array.type):
        raise DecodeError(f"{table}.{col}: expected text, got {array.type}")
    return array, None


def project_arrow_columns(
    table: str, batch: Any, keyspace: str, read_models: Collection[str] | None = None
) -> list[ArrowUpserts]:
    """``project_arrow`` with Arrow arrays in CQL terms instead of Python tuples."""
    import numpy as np
    import pyarrow as pa

    specs = _batch_specs(table, batch, keyspace, read_models)
    values: dict[str, Any] = {}
    micros: dict[str, Any] = {}
    for col, typ in COLUMNS[table].items():
        values[col], micros[col] = _arrow_cql_column(table, col, typ, batch.column(col))
    n = batch.num_rows
    out: list[ArrowUpserts] = []
    for spec in specs:
        cols = [dst for dst, _ in (*spec.key, *spec.constants, *spec.values)]
        arrays = [
            pa.array(np.mod(micros[src], 1000), pa.int32())
            if dst in _MICROS_COLUMNS
            else values[src]
            for dst, src in spec.key
        ]
        arrays += [pa.array([const] * n, pa.string()) for _, const in spec.constants]
        arrays += [values[src] for _, src in spec.values]
        arrays.append(pa.array(micros["updated_at"], pa.int64()))
        out.append(
            ArrowUpserts(
                spec.read_model, _insert_text(f"{keyspace}.{spec.read_model}", tuple(cols)), arrays
            )
        )
    return out
