"""``cql_cells`` gives, for every row of every read model, exactly the bytes the driver's
``PreparedStatement.bind`` gives the columnar projection's parameters: the cql load may skip
the driver's serializers only because of this. And the writer sends such rows as it sends
bound ones (same grouping into replica-set batches)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pytest
from cassandra import cqltypes
from hypothesis import given, settings
from hypothesis import strategies as st

from support.offline_scylla import OfflineSession
from tasks.adapters.cql_binary import bind_row, cql_cells
from tasks.adapters.scylla import ScyllaWriter
from tasks.core.catalog import READ_MODELS, TABLES
from tasks.core.columnar import project_arrow, project_arrow_columns
from tasks.core.cql import insert_text
from tasks.core.projection import Change, Mutation, normalize_row, project, project_row
from tasks.settings import get_settings
from tests.unit.core.test_projection_arrow import _batch, table_rows

KS = "ks"


def _writer(**kw: Any) -> ScyllaWriter:
    return ScyllaWriter(OfflineSession(KS), get_settings().scylla, keyspace=KS, **kw)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    table_rows(),
    st.sets(st.sampled_from(READ_MODELS), min_size=1),
)
def test_cells_are_the_bytes_the_driver_binds(
    table_rows: tuple[str, list[dict[str, Any]]], models: set[str]
) -> None:
    table, rows = table_rows
    batch = _batch(table, rows)
    writer = _writer()
    want = {u.read_model: u for u in project_arrow(table, batch, KS, models)}
    for up in project_arrow_columns(table, batch, KS, models):
        prepared = writer.prepare(up.cql)
        got = list(zip(*map(cql_cells, up.arrays), strict=True))
        assert [list(r) for r in got] == [
            prepared.bind(p).values for p in want[up.read_model].params
        ]


def test_nulls_empty_text_and_slices() -> None:
    text = pa.array(["a", None, "", "héllo"], pa.string())
    assert cql_cells(text) == [b"a", None, b"", "héllo".encode()]
    assert cql_cells(text.slice(1, 3)) == [None, b"", "héllo".encode()]
    ints = pa.array([1, None, -2], pa.int32())
    assert cql_cells(ints) == [b"\x00\x00\x00\x01", None, b"\xff\xff\xff\xfe"]
    longs = pa.array([None, 2**40], pa.int64()).slice(1)
    assert cql_cells(longs) == [(2**40).to_bytes(8, "big")]
    uuids = pa.array([b"\x01" * 16, None], pa.binary(16))
    assert cql_cells(uuids) == [b"\x01" * 16, None]


@pytest.mark.parametrize("batch_rows", [1, 3, 20])
def test_values_group_like_bound_statements(batch_rows: int) -> None:
    now = 1_796_000_000_000_000
    rows = [
        {
            "id": uuid.UUID(int=i + 1),
            "session_id": uuid.UUID(int=i % 3 + 1),
            "content": "x" * i,
            "created_at": datetime.fromtimestamp((now + i) / 1e6, UTC),
            "updated_at": datetime.fromtimestamp((now + 2 * i) / 1e6, UTC),
        }
        for i in range(10)
    ]
    batch = _batch("human_turns", rows)
    writer = _writer(replica_batch_rows=batch_rows)
    params = {u.read_model: u.params for u in project_arrow("human_turns", batch, KS)}
    for up in project_arrow_columns("human_turns", batch, KS):
        prepared = writer.prepare(up.cql)
        fast = writer.requests_of_values(
            prepared, list(zip(*map(cql_cells, up.arrays), strict=True))
        )
        slow = writer.requests([(prepared, p) for p in params[up.read_model]])
        assert [type(r) for r in fast] == [type(r) for r in slow]
        assert [_values(r) for r in fast] == [_values(r) for r in slow]


def _values(request: Any) -> Any:
    if hasattr(request, "_statements_and_parameters"):
        return [list(v) for _, _, v in request._statements_and_parameters]
    return list(request.values)


# --- rows of Python values: bind_row ----------------------------------------------------------

_OFFSETS = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
)
_DATETIMES = st.one_of(
    st.datetimes(),  # naive: the driver reads it as UTC
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(timezones=_OFFSETS),  # to the driver's path
)
# Per CQL type: values bind accepts, and values it refuses (which bind_row must refuse alike).
_VALUES: dict[type[cqltypes._CassandraType], st.SearchStrategy[Any]] = {
    cqltypes.UUIDType: st.one_of(st.uuids(), st.text(max_size=3), st.integers()),
    cqltypes.DateType: st.one_of(_DATETIMES, st.integers(-(2**62), 2**62), st.text(max_size=3)),
    cqltypes.UTF8Type: st.one_of(st.text(), st.integers(), st.binary(max_size=5)),
    cqltypes.Int32Type: st.one_of(st.integers(-(2**33), 2**33), st.booleans(), st.text(max_size=2)),
    cqltypes.LongType: st.one_of(st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=2)),
}


def _outcome(f: Callable[[], Any]) -> Any:
    try:
        return f()
    except Exception as exc:
        return type(exc)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(st.data())
def test_bind_row_encodes_and_refuses_every_value_as_bind_does(data: st.DataObject) -> None:
    model = data.draw(st.sampled_from(READ_MODELS))
    names = [c.name for c in (*TABLES[model].key, *TABLES[model].values)]
    prepared = OfflineSession(KS).prepare(insert_text(KS, model, tuple(names)))
    params = [data.draw(st.one_of(st.none(), _VALUES[c.type])) for c in prepared.column_metadata]
    want = _outcome(lambda: prepared.bind(params).values)
    got = _outcome(lambda: bind_row(prepared, params).values)
    assert got == want, (params, got, want)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(table_rows())
def test_bind_row_binds_the_projection_as_bind_does(
    table_rows: tuple[str, list[dict[str, Any]]],
) -> None:
    table, rows = table_rows
    writer = _writer()
    for row in rows:
        mutations: list[Mutation] = [*project_row(table, row)]
        mutations += project(Change(table, "d", normalize_row(table, row), None, 7))
        for prepared, params in writer.bound(mutations):
            bound = bind_row(prepared, params)
            assert bound.values == prepared.bind(params).values
            assert bound.routing_key == prepared.bind(params).routing_key


def test_bind_row_edges() -> None:
    prepared = OfflineSession(KS).prepare(
        f"INSERT INTO {KS}.conversation_timeline (session_id, created_at, created_at_micros, "
        "turn_id, role, content, model) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    )
    sid = uuid.uuid4()
    for created in (
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # floors to -1 ms
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ):
        params = (sid, created, 999, sid, "human", "héllo \U0001f600", None, 2**62)
        assert bind_row(prepared, params).values == prepared.bind(params).values
    # A lone surrogate is refused by both, alike.
    bad = (sid, datetime.now(UTC), 0, sid, "human", "x\ud800", None, 1)
    with pytest.raises(UnicodeEncodeError):
        bind_row(prepared, bad)
    with pytest.raises(UnicodeEncodeError):
        prepared.bind(bad)
