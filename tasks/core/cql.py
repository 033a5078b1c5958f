"""CQL statement text for the read models, rendered from the catalog, and the one rule for the
identifiers that go into it unquoted."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Final

from tasks.core.catalog import KEY_COLUMNS, READ_MODELS, VALUE_COLUMNS
from tasks.core.errors import InvalidInput
from tasks.core.projection import Mutation, Upsert

# An unquoted CQL identifier as both Scylla and Cassandra accept a keyspace name: a letter,
# then letters, digits or _, 48 characters at most.
_IDENTIFIER: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}\Z")
IDENTIFIER_RULE: Final = "a letter, then letters, digits or _ (at most 48)"


def is_cql_identifier(name: object) -> bool:
    """Whether ``name`` may be written unquoted into a statement (a keyspace, a table)."""
    return isinstance(name, str) and _IDENTIFIER.match(name) is not None


def check_keyspace(keyspace: str) -> str:
    """``keyspace`` if it is a valid name, InvalidInput otherwise."""
    if not is_cql_identifier(keyspace):
        raise InvalidInput(f"invalid keyspace name {keyspace!r}")
    return keyspace


def insert_text(keyspace: str, read_model: str, columns: tuple[str, ...]) -> str:
    """``INSERT`` of these columns with the row's version as ``USING TIMESTAMP``, the last
    bind marker."""
    marks = ", ".join("?" * len(columns))
    return (
        f"INSERT INTO {keyspace}.{read_model} ({', '.join(columns)}) VALUES ({marks})"
        " USING TIMESTAMP ?"
    )


def delete_text(keyspace: str, read_model: str) -> str:
    """``DELETE`` of one row by its whole primary key; the version is the first marker."""
    where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS[read_model])
    return f"DELETE FROM {keyspace}.{read_model} USING TIMESTAMP ? WHERE {where}"


def to_cql(m: Mutation, keyspace: str) -> tuple[str, tuple[Any, ...]]:
    """Statement text and bind parameters. The text depends only on the read model and the
    column names, so the writer can cache prepared statements by it."""
    key_cols = tuple(c for c, _ in m.key)
    if isinstance(m, Upsert):
        value_cols = tuple(c for c, _ in m.values)
        return (
            _upsert_text(keyspace, m.read_model, key_cols, value_cols),
            (*(v for _, v in m.key), *(v for _, v in m.values), m.timestamp_us),
        )
    return _delete_text(keyspace, m.read_model, key_cols), (
        m.timestamp_us,
        *(v for _, v in m.key),
    )


# A dual-write or CDC batch renders the same few statement shapes over and over: checking the
# names and rendering the text once per shape took a third of the time of binding a turn's
# three mutations (docs/decisions.md, "The dual-write step"). Invalid names raise, and an
# exception is never cached, so every bad mutation is still refused.
@lru_cache(maxsize=1024)
def _upsert_text(
    keyspace: str, read_model: str, key_cols: tuple[str, ...], value_cols: tuple[str, ...]
) -> str:
    _check_shape(keyspace, read_model, key_cols)
    if unknown := set(value_cols).difference(VALUE_COLUMNS[read_model]):
        raise InvalidInput(f"{read_model}: unknown columns {sorted(unknown)}")
    return insert_text(keyspace, read_model, key_cols + value_cols)


@lru_cache(maxsize=256)
def _delete_text(keyspace: str, read_model: str, key_cols: tuple[str, ...]) -> str:
    _check_shape(keyspace, read_model, key_cols)
    return delete_text(keyspace, read_model)


def _check_shape(keyspace: str, read_model: str, key_cols: tuple[str, ...]) -> None:
    check_keyspace(keyspace)
    if read_model not in READ_MODELS:
        raise InvalidInput(f"unknown read model {read_model!r}")
    if key_cols != KEY_COLUMNS[read_model]:
        raise InvalidInput(f"{read_model}: key columns {key_cols} are not the primary key")
