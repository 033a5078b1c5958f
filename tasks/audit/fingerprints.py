"""What the audit compares, row by row: each read-model row reduced to the text of its columns
and its version, and a 64-bit fingerprint of those (docs/decisions.md, "The audit buckets by
token, computed in Postgres").

The expected side is computed by Postgres, in the views of schemas/postgres/0010 over the
write model; this module computes the same fingerprint from the cells scanned in Scylla. Both
must render a column identically:

- uuid: canonical text (CQL ``CAST(c AS text)``, ``uuid::text``);
- timestamp: milliseconds since the epoch (``toUnixTimestamp(c)``, ``cqrs_epoch_ms``);
- int: decimal; text: as is; NULL: ``~``; every other column ``<length>:<text>``;
- the version: the write time of the read model's version column in Scylla, the source
  row's ``updated_at`` in µs in Postgres (docs/architecture.md, "The one rule").

The column lists come from the catalog (the tables' shape), not from the projection: the
audit shares no code with what it checks.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, Final

from tasks.core import catalog
from tasks.core.catalog import READ_MODELS
from tasks.core.cql import check_keyspace
from tasks.core.errors import InvalidInput
from tasks.core.timestamps import EPOCH

# A column every upsert of the read model writes (never NULL, never left out as an unchanged
# TOAST value): its WRITETIME is the version of the row's last write.
VERSION_COLUMN: Final = {
    "recent_conversations": "turn_count",
    "conversation_timeline": "role",
    "sessions_by_id": "turn_count",
    "steps_by_turn": "kind",
}

TOKEN_MIN: Final = -(2**63)
TOKEN_MAX: Final = 2**63 - 1


def _selector(name: str, cql_type: str) -> str:
    if cql_type == "uuid":
        return f"CAST({name} AS text)"
    if cql_type == "timestamp":
        return f"toUnixTimestamp({name})"
    return name


@dataclass(frozen=True, slots=True)
class Shape:
    """How one read model is scanned and compared."""

    read_model: str
    partition_column: str
    columns: tuple[str, ...]  # key columns, then values: the order of the fingerprint
    key_width: int  # the first key_width columns are the primary key
    value_columns: tuple[str, ...]
    version_column: str
    source_id_column: str  # the key column the source row's id fills

    @property
    def view(self) -> str:
        """The Postgres view of the expected rows (schemas/postgres/0010)."""
        return f"audit_{self.read_model}"

    def select_cql(self, keyspace: str, *, writetimes: bool = False) -> str:
        """token, the columns as text/ints, the version column's write time (and with
        ``writetimes`` the write time of every value column)."""
        check_keyspace(keyspace)
        table = catalog.TABLES[self.read_model]
        types = {c.name: c.cql_type for c in (*table.key, *table.values)}
        parts = [f"token({self.partition_column})"]
        parts += [_selector(c, types[c]) for c in self.columns]
        parts.append(f"WRITETIME({self.version_column})")
        if writetimes:
            parts += [f"WRITETIME({c})" for c in self.value_columns]
        return f"SELECT {', '.join(parts)} FROM {keyspace}.{self.read_model}"

    def scan_cql(self, keyspace: str, *, writetimes: bool = False) -> str:
        """:meth:`select_cql` over one token range (two bind markers: first, last)."""
        p = self.partition_column
        return (
            f"{self.select_cql(keyspace, writetimes=writetimes)} "
            f"WHERE token({p}) >= ? AND token({p}) <= ?"
        )

    def point_cql(self, keyspace: str) -> str:
        """:meth:`select_cql` (all write times) of one row, by its whole primary key."""
        where = " AND ".join(f"{c} = ?" for c in self.columns[: self.key_width])
        return f"{self.select_cql(keyspace, writetimes=True)} WHERE {where}"


@cache
def shape(read_model: str) -> Shape:
    if read_model not in READ_MODELS:
        raise InvalidInput(f"unknown read model {read_model!r}; known: {list(READ_MODELS)}")
    table = catalog.TABLES[read_model]
    key = tuple(c.name for c in table.key)
    values = tuple(c.name for c in table.values)
    source_id = next(
        rm_col
        for feeds in catalog.FEEDS.values()
        for feed in feeds
        if feed.read_model == read_model
        for rm_col, src_col in feed.key
        if src_col == "id"
    )
    return Shape(
        read_model=read_model,
        partition_column=table.partition_key[0].name,
        columns=key + values,
        key_width=len(key),
        value_columns=values,
        version_column=VERSION_COLUMN[read_model],
        source_id_column=source_id,
    )


def render(value: Any) -> str | None:
    """A scanned cell as the text Postgres renders for it (None stays None)."""
    if value is None or value.__class__ is str:
        return value  # type: ignore[no-any-return]
    return str(value)


def fingerprint(fields: Sequence[str | None], version: int | None) -> int:
    """The signed 64-bit fingerprint of a row: ``cqrs_fp_hash`` of schemas/postgres/0010."""
    parts = ["~" if f is None else f"{len(f)}:{f}" for f in fields]
    parts.append("~" if version is None else f"{len(v := str(version))}:{v}")
    digest = hashlib.md5("".join(parts).encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_SIGNED_64: Final = struct.Struct(">q").unpack_from  # the digest's first 8 bytes, signed


def fingerprint_scanned(
    row: Sequence[Any],
    width: int,
    *,
    _md5: Any = hashlib.md5,
    _unpack: Any = _SIGNED_64,
) -> int:
    """The fingerprint of a scanned row (token, ``width`` columns, version write time):
    about 3.5 µs a row, the audit's hottest loop. The version (an int, or None) is rendered
    by the same branch as the columns."""
    parts: list[str] = []
    add = parts.append
    for v in row[1 : width + 2]:
        if v is None:
            add("~")
        elif v.__class__ is str:
            add(f"{len(v)}:{v}")
        else:
            text = str(v)
            add(f"{len(text)}:{text}")
    digest = _md5("".join(parts).encode(), usedforsecurity=False).digest()
    return _unpack(digest)[0]  # type: ignore[no-any-return]


def typed_key(read_model: str, key: Mapping[str, str | None]) -> tuple[tuple[str, Any], ...]:
    """A key as compared (its columns' text) back to the values the CQL columns bind."""
    out: list[tuple[str, Any]] = []
    for col in catalog.TABLES[read_model].key:
        text = key[col.name]
        value: Any = text
        if text is not None and col.cql_type == "uuid":
            value = uuid.UUID(text)
        elif text is not None and col.cql_type == "timestamp":
            value = EPOCH + timedelta(milliseconds=int(text))
        elif text is not None and col.cql_type == "int":
            value = int(text)
        out.append((col.name, value))
    return tuple(out)
