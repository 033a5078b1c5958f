"""``cql_cells`` gives, for every row of every read model, exactly the bytes the driver's
``PreparedStatement.bind`` gives the columnar projection's parameters: the cql load may skip
the driver's serializers only because of this. And the writer sends such rows as it sends
bound ones (same grouping into replica-set batches)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.offline_scylla import OfflineSession
from tasks.adapters.cql_binary import cql_cells
from tasks.adapters.scylla import ScyllaWriter
from tasks.core.catalog import READ_MODELS
from tasks.core.columnar import project_arrow, project_arrow_columns
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
