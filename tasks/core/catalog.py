"""The catalog of the read models, declared once: the source tables of the write model
(schemas/postgres), the read-model tables (schemas/scylla), and which source column fills
which read-model column. The projection (tasks/core/projection.py), the CQL statements
(tasks/core/cql.py) and the columnar paths (tasks/core/columnar.py) are derived from it, and
tests/integration/test_catalog.py checks it against the system catalogs of the real stack, so
a migration that changes a table without changing this file fails CI.

Each source column carries its codec (tasks/core/codec.py), each read-model column its CQL
type; the pair picks the conversion of a cell (``codec.cell_of``): a ``timestamptz`` into a
``timestamp`` is truncated to the millisecond, into an ``int`` it gives the microseconds below
it (docs/architecture.md, "The one rule").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from tasks.core.codec import INT, JSONB, TEXT, TIMESTAMPTZ, UUID, Codec, cell_of
from tasks.core.errors import DecodeError, InvalidInput


@dataclass(frozen=True, slots=True)
class SourceColumn:
    name: str
    codec: Codec
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class SourceTable:
    """A write-model table. Every one has ``id`` as its primary key and ``updated_at`` as the
    row's version (schemas/postgres/0002)."""

    name: str
    columns: tuple[SourceColumn, ...]
    primary_key: tuple[str, ...] = ("id",)

    def column(self, name: str) -> SourceColumn:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")


@dataclass(frozen=True, slots=True)
class ReadColumn:
    name: str
    cql_type: str
    descending: bool = False  # clustering order; only clustering columns have one


@dataclass(frozen=True, slots=True)
class ReadModel:
    """A read-model table: its partition key, clustering key (in order) and other columns."""

    name: str
    partition_key: tuple[ReadColumn, ...]
    clustering_key: tuple[ReadColumn, ...]
    values: tuple[ReadColumn, ...]

    @property
    def key(self) -> tuple[ReadColumn, ...]:
        return self.partition_key + self.clustering_key

    def column(self, name: str) -> ReadColumn:
        for c in (*self.key, *self.values):
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")


@dataclass(frozen=True, slots=True)
class Feed:
    """How one source table feeds one read model: (read-model column, source column) pairs
    for the whole primary key and for some value columns, and text constants."""

    read_model: str
    key: tuple[tuple[str, str], ...]
    values: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, str], ...] = ()


def _col(name: str, codec: Codec, *, nullable: bool = False) -> SourceColumn:
    return SourceColumn(name, codec, nullable)


# --------------------------------------------------------------------------------------------
# The write model (schemas/postgres/0001), columns in table order.

_TIMES = (_col("created_at", TIMESTAMPTZ), _col("updated_at", TIMESTAMPTZ))
SOURCES: Final[Mapping[str, SourceTable]] = {
    t.name: t
    for t in (
        SourceTable(
            "sessions",
            (
                _col("id", UUID),
                _col("user_id", UUID),
                _col("title", TEXT),
                *_TIMES,
                _col("last_message", TEXT),
                _col("last_message_at", TIMESTAMPTZ, nullable=True),
                _col("turn_count", INT),
            ),
        ),
        SourceTable(
            "human_turns",
            (_col("id", UUID), _col("session_id", UUID), _col("content", TEXT), *_TIMES),
        ),
        SourceTable(
            "agent_turns",
            (
                _col("id", UUID),
                _col("session_id", UUID),
                _col("content", TEXT),
                _col("model", TEXT),
                *_TIMES,
            ),
        ),
        SourceTable(
            "steps",
            (
                _col("id", UUID),
                _col("agent_turn_id", UUID),
                _col("session_id", UUID),
                _col("kind", TEXT),
                _col("payload", JSONB),
                *_TIMES,
            ),
        ),
    )
}

# --------------------------------------------------------------------------------------------
# The read models (schemas/scylla/0001), key columns in key order.


def _rc(name: str, cql_type: str, *, descending: bool = False) -> ReadColumn:
    return ReadColumn(name, cql_type, descending)


_HEADER = (
    _rc("title", "text"),
    _rc("last_message", "text"),
    _rc("last_message_at", "timestamp"),
    _rc("turn_count", "int"),
)
_IN_TIME_ORDER = (_rc("created_at", "timestamp"), _rc("created_at_micros", "int"))
TABLES: Final[Mapping[str, ReadModel]] = {
    m.name: m
    for m in (
        ReadModel(
            "recent_conversations",
            (_rc("user_id", "uuid"),),
            (_rc("created_at", "timestamp", descending=True), _rc("session_id", "uuid")),
            _HEADER,
        ),
        ReadModel(
            "conversation_timeline",
            (_rc("session_id", "uuid"),),
            (*_IN_TIME_ORDER, _rc("turn_id", "uuid")),
            (_rc("role", "text"), _rc("content", "text"), _rc("model", "text")),
        ),
        ReadModel(
            "sessions_by_id",
            (_rc("session_id", "uuid"),),
            (),
            (_rc("user_id", "uuid"), _HEADER[0], _rc("created_at", "timestamp"), *_HEADER[1:]),
        ),
        ReadModel(
            "steps_by_turn",
            (_rc("agent_turn_id", "uuid"),),
            (*_IN_TIME_ORDER, _rc("step_id", "uuid")),
            (_rc("session_id", "uuid"), _rc("kind", "text"), _rc("payload", "text")),
        ),
    )
}

# --------------------------------------------------------------------------------------------
# Which source column fills which read-model column.

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
FEEDS: Final[Mapping[str, tuple[Feed, ...]]] = {
    "sessions": (
        Feed(
            "recent_conversations",
            (("user_id", "user_id"), ("created_at", "created_at"), ("session_id", "id")),
            _SESSION_VALUES,
        ),
        Feed(
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
        Feed("conversation_timeline", _TURN_KEY, (("content", "content"),), (("role", "human"),)),
    ),
    "agent_turns": (
        Feed(
            "conversation_timeline",
            _TURN_KEY,
            (("content", "content"), ("model", "model")),
            (("role", "agent"),),
        ),
    ),
    "steps": (
        Feed(
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
# Derived names, for the call sites that need only these.

SOURCE_TABLES: Final = tuple(SOURCES)
READ_MODELS: Final = tuple(TABLES)
KEY_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    m.name: tuple(c.name for c in m.key) for m in TABLES.values()
}
VALUE_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    m.name: tuple(c.name for c in m.values) for m in TABLES.values()
}
# Source columns and their codec names. Other columns of a row are ignored, so a column added
# to Postgres does not break decoding before the catalog learns it (its test fails first).
COLUMNS: Final[Mapping[str, Mapping[str, str]]] = {
    t.name: {c.name: c.codec.name for c in t.columns} for t in SOURCES.values()
}


def source(table: str) -> SourceTable:
    try:
        return SOURCES[table]
    except (KeyError, TypeError):
        raise DecodeError(f"unknown source table {table!r}") from None


def feeds_of(table: str, read_models: Collection[str] | None = None) -> tuple[Feed, ...]:
    """The feeds of a source table, all or those into ``read_models``."""
    feeds = FEEDS.get(table) if isinstance(table, str) else None
    if feeds is None:
        raise DecodeError(f"unknown source table {table!r}")
    if read_models is None:
        return feeds
    wanted = {read_models} if isinstance(read_models, str) else set(read_models)
    if unknown := wanted.difference(READ_MODELS):
        raise InvalidInput(f"unknown read model(s): {sorted(unknown)}")
    return tuple(f for f in feeds if f.read_model in wanted)


def read_models_named(v: object) -> tuple[str, ...]:
    """A parameter naming read models, checked (the flows' and the consumer's one rule):
    None means all; a string one; a list at least one, each known. ValueError names what is
    wrong. The result is in catalog order, without repeats, so equal sets compare equal."""
    if v is None:
        return READ_MODELS
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, Collection):
        raise ValueError(f"must be a list of read model names, got {type(v).__name__}")
    names = list(v)
    if not names:
        raise ValueError("must name at least one read model (omit it, or None, for all)")
    if bad := [n for n in names if not isinstance(n, str)]:
        raise ValueError(f"read model names must be strings, got {bad!r}")
    if unknown := [n for n in names if n not in READ_MODELS]:
        raise ValueError(f"unknown read model(s) {unknown}; known: {list(READ_MODELS)}")
    return tuple(m for m in READ_MODELS if m in names)


def read_models_of(table: str) -> tuple[str, ...]:
    """The read models a source table feeds."""
    return tuple(f.read_model for f in feeds_of(table))


def _check() -> None:
    """The catalog agrees with itself: each feed gives its read model's whole key in order,
    value columns it has, from source columns that exist, by a conversion that exists."""
    for table, feeds in FEEDS.items():
        src = SOURCES[table]
        if not {"id", "updated_at"} <= {c.name for c in src.columns}:
            raise ValueError(f"{table}: a source table needs id and updated_at")
        for f in feeds:
            model = TABLES[f.read_model]
            if tuple(d for d, _ in f.key) != KEY_COLUMNS[f.read_model]:
                raise ValueError(f"{table} → {f.read_model}: the key is not the primary key")
            for dst, s in (*f.key, *f.values):
                cell_of(src.column(s).codec, model.column(dst).cql_type)
            for dst, _ in f.constants:
                if model.column(dst).cql_type != "text":
                    raise ValueError(f"{table} → {f.read_model}.{dst}: constants are text")
            if {d for d, _ in (*f.values, *f.constants)} - set(VALUE_COLUMNS[model.name]):
                raise ValueError(f"{table} → {f.read_model}: a value column it does not have")


_check()
