"""The columnar projection (backfill load stage) gives exactly what the row-wise one gives:
same statement text, same parameters, row for row, on arbitrary rows of every table."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.core.catalog import READ_MODELS, SOURCE_TABLES
from tasks.core.columnar import arrow_schema, project_arrow, project_arrow_columns
from tasks.core.cql import to_cql
from tasks.core.errors import DecodeError, InvalidInput
from tasks.core.projection import PLACEHOLDER_TEXT, project_row

KS = "ks"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_moments = st.datetimes(
    min_value=datetime(1960, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_texts = st.one_of(st.text(max_size=40), st.just(PLACEHOLDER_TEXT), st.just(""))
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)


def _row(table: str) -> st.SearchStrategy[dict[str, Any]]:
    common = {"id": st.uuids(), "created_at": _moments, "updated_at": _moments}
    per_table: dict[str, dict[str, Any]] = {
        "sessions": {
            "user_id": st.uuids(),
            "title": _texts,
            "last_message": _texts,
            "last_message_at": st.none() | _moments,
            "turn_count": st.integers(0, 2**31 - 1),
        },
        "human_turns": {"session_id": st.uuids(), "content": _texts},
        "agent_turns": {"session_id": st.uuids(), "content": _texts, "model": _texts},
        # Postgres gives jsonb as text in its own spacing: any JSON text form must do.
        "steps": {
            "agent_turn_id": st.uuids(),
            "session_id": st.uuids(),
            "kind": _texts,
            "payload": _json.map(lambda o: json.dumps(o, indent=1)),
        },
    }
    return st.fixed_dictionaries({**common, **per_table[table]})


def _batch(table: str, rows: list[dict[str, Any]]) -> pa.RecordBatch:
    schema = arrow_schema(table)
    cols = []
    for field in schema:
        vals = [r[field.name] for r in rows]
        if field.name in ("id", "user_id", "session_id", "agent_turn_id"):
            vals = [v.bytes for v in vals]
        cols.append(
            pa.array(
                vals,
                type=field.type.storage_type
                if isinstance(field.type, pa.BaseExtensionType)
                else field.type,
            )
        )
        if isinstance(field.type, pa.BaseExtensionType):
            cols[-1] = pa.ExtensionArray.from_storage(field.type, cols[-1])
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def table_rows() -> st.SearchStrategy[tuple[str, list[dict[str, Any]]]]:
    """A source table and 1-12 arbitrary rows of it (the columnar tests' input)."""
    return st.sampled_from(SOURCE_TABLES).flatmap(
        lambda t: st.tuples(st.just(t), st.lists(_row(t), min_size=1, max_size=12))
    )


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    table_rows(),
    st.sets(st.sampled_from(READ_MODELS), min_size=1),
)
def test_columnar_equals_row_by_row(
    table_rows: tuple[str, list[dict[str, Any]]], models: set[str]
) -> None:
    table, rows = table_rows
    got = {u.read_model: u for u in project_arrow(table, _batch(table, rows), KS, models)}
    want: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}
    for row in rows:
        for m in project_row(table, row, models):
            want.setdefault(m.read_model, []).append(to_cql(m, KS))
    assert set(got) == set(want)
    for rm, statements in want.items():
        assert {text for text, _ in statements} == {got[rm].cql}
        assert got[rm].params == [params for _, params in statements]


def test_columnar_refuses_what_row_by_row_refuses() -> None:
    now = datetime.now(UTC)
    row = {
        "id": uuid.uuid4(),
        "session_id": uuid.uuid4(),
        "content": "x",
        "created_at": now,
        "updated_at": now,
    }
    batch = _batch("human_turns", [row])
    with pytest.raises(InvalidInput, match="keyspace"):
        project_arrow("human_turns", batch, "bad-ks")
    with pytest.raises(DecodeError, match="unknown source table"):
        project_arrow("nope", batch, KS)
    with pytest.raises(DecodeError, match=r"human_turns.content: NULL"):
        project_arrow(
            "human_turns", batch.set_column(2, "content", pa.array([None], pa.string())), KS
        )
    with pytest.raises(DecodeError, match=r"missing: \['updated_at'\]"):
        project_arrow("human_turns", batch.drop_columns(["updated_at"]), KS)
    naive = batch.set_column(
        3, "created_at", pa.array([now.replace(tzinfo=None)], pa.timestamp("us"))
    )
    with pytest.raises(DecodeError, match=r"created_at: expected timestamp\[us\] with a time"):
        project_arrow("human_turns", naive, KS)
    # Another zone's name for the same instants is fine: Arrow stores UTC.
    etc = batch.set_column(3, "created_at", batch.column(3).cast(pa.timestamp("us", "Etc/UTC")))
    assert (
        project_arrow("human_turns", etc, KS)[0].params
        == project_arrow("human_turns", batch, KS)[0].params
    )
    # Bad values are DecodeErrors naming table and column, as in the row path.
    step = {**row, "agent_turn_id": uuid.uuid4(), "kind": "tool", "payload": "{not json"}
    with pytest.raises(DecodeError, match=r"steps.payload"):
        project_arrow("steps", _batch("steps", [step]), KS)
    assert project_arrow("human_turns", batch.slice(0, 0), KS)[0].params == []


def _as_cql(v: Any) -> Any:
    """A bound parameter as the CQL wire carries it: uuids as 16 bytes, timestamps as ms."""
    if isinstance(v, uuid.UUID):
        return v.bytes
    if isinstance(v, datetime):
        return (v - EPOCH) // timedelta(milliseconds=1)
    return v


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    table_rows(),
    st.sets(st.sampled_from(READ_MODELS), min_size=1),
)
def test_cql_typed_columns_equal_the_columnar_parameters(
    table_rows: tuple[str, list[dict[str, Any]]], models: set[str]
) -> None:
    table, rows = table_rows
    batch = _batch(table, rows)
    want = {u.read_model: u for u in project_arrow(table, batch, KS, models)}
    got = {u.read_model: u for u in project_arrow_columns(table, batch, KS, models)}
    assert set(got) == set(want)
    for rm, up in got.items():
        assert up.cql == want[rm].cql
        columns = [a.to_pylist() for a in up.arrays]
        assert list(zip(*columns, strict=True)) == [
            tuple(_as_cql(v) for v in p) for p in want[rm].params
        ]
