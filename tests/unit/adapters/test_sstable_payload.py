"""The sstable load method's rows: ``project_arrow_columns`` serialized by ``rows_payload``
decodes (here, with plain struct/int.from_bytes, not numpy) to exactly the parameters
``project_arrow`` binds, so both load methods write the same cells with the same versions."""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.adapters.cql_binary import cql_values
from tasks.adapters.sstable_payload import rows_payload
from tasks.core.catalog import READ_MODELS
from tasks.core.columnar import project_arrow, project_arrow_columns
from tasks.core.errors import DecodeError
from tests.unit.core.test_projection_arrow import KS, _batch, table_rows

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def decode(payload: bytes, types: list[pa.DataType], rows: int) -> list[tuple[Any, ...]]:
    """The ROWS payload back into Python values, column after column."""
    columns: list[list[Any]] = []
    pos = 0
    for typ in types:
        lengths = list(struct.unpack_from(f">{rows}i", payload, pos))
        pos += 4 * rows
        values: list[Any] = []
        for n in lengths:
            if n < 0:
                values.append(None)
                continue
            raw = payload[pos : pos + n]
            pos += n
            if pa.types.is_fixed_size_binary(typ):
                values.append(uuid.UUID(bytes=raw))
            elif pa.types.is_integer(typ):
                values.append(int.from_bytes(raw, "big", signed=True))
            else:
                values.append(raw.decode("utf-8"))
        columns.append(values)
    assert pos == len(payload), "payload longer than its lengths say"
    return list(zip(*columns, strict=True))


def as_cql(v: Any) -> Any:
    """A bound parameter as the CQL wire carries it: timestamps as ms since the epoch."""
    if isinstance(v, datetime):
        return (v - _EPOCH) // timedelta(milliseconds=1)
    return v


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    table_rows(),
    st.sets(st.sampled_from(READ_MODELS), min_size=1),
    st.integers(0, 3),
)
def test_sstable_rows_are_the_cql_parameters(
    table_rows: tuple[str, list[dict[str, Any]]], models: set[str], skip: int
) -> None:
    table, rows = table_rows
    # A slice too: Arrow arrays that do not start at their buffers' beginning.
    batch = _batch(table, rows).slice(min(skip, len(rows) - 1))
    want = {u.read_model: u for u in project_arrow(table, batch, KS, models)}
    got = {u.read_model: u for u in project_arrow_columns(table, batch, KS, models)}
    assert set(got) == set(want)
    for rm, up in got.items():
        assert up.cql == want[rm].cql
        decoded = decode(rows_payload(up.arrays), [a.type for a in up.arrays], batch.num_rows)
        assert decoded == [tuple(as_cql(v) for v in p) for p in want[rm].params]


def test_nulls_and_empty_strings_stay_apart() -> None:
    lengths, data = cql_values(pa.array(["", None, "ab"], pa.string()))
    assert lengths.tolist() == [0, -1, 2] and data == b"ab"
    lengths, data = cql_values(pa.array([7, None], pa.int64()))
    assert lengths.tolist() == [8, -1] and data == (7).to_bytes(8, "big")
    with pytest.raises(Exception, match="no CQL encoding"):
        cql_values(pa.array([1.5]))


def test_typed_columns_refuse_what_the_row_path_refuses() -> None:
    now = datetime.now(UTC)
    row = {
        "id": uuid.uuid4(),
        "session_id": uuid.uuid4(),
        "content": "x",
        "created_at": now,
        "updated_at": now,
    }
    batch = _batch("human_turns", [row])
    with pytest.raises(DecodeError, match=r"human_turns.content: NULL"):
        project_arrow_columns(
            "human_turns", batch.set_column(2, "content", pa.array([None], pa.string())), KS
        )
    with pytest.raises(DecodeError, match=r"created_at: expected timestamp\[us\] with a time"):
        project_arrow_columns(
            "human_turns",
            batch.set_column(
                3, "created_at", pa.array([now.replace(tzinfo=None)], pa.timestamp("us"))
            ),
            KS,
        )
    session = {
        "id": uuid.uuid4(),
        "user_id": uuid.uuid4(),
        "title": "t",
        "created_at": now,
        "updated_at": now,
        "last_message": "",
        "last_message_at": None,
        "turn_count": 1,
    }
    big = _batch("sessions", [session])
    i = big.schema.get_field_index("turn_count")
    with pytest.raises(DecodeError, match=r"turn_count: out of range"):
        project_arrow_columns(
            "sessions", big.set_column(i, "turn_count", pa.array([2**31], pa.int64())), KS
        )


def test_split_cuts_rows_into_zero_copy_pieces_under_the_byte_cap() -> None:
    from tasks.adapters.sstable_payload import split_rows

    texts = pa.array([f"row {i} " + "x" * (i % 50) for i in range(1000)])
    ints = pa.array(range(1000), pa.int64())
    pieces = split_rows([texts, ints], max_bytes=4096)
    assert len(pieces) > 1
    assert all(sum(a.nbytes for a in p) <= 2 * 4096 for p in pieces)
    assert pa.concat_arrays([p[0] for p in pieces]).equals(texts)
    assert pa.concat_arrays([p[1] for p in pieces]).equals(ints)
    assert split_rows([ints], max_bytes=1 << 20) == [[ints]]


def test_cassandra_jars_reads_every_classpath_entry(tmp_path: Any) -> None:
    import os

    from tasks.adapters.sstable_setup import cassandra_jars

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cassandra-all-5.0.8.jar").touch()
    (tmp_path / "guava.jar").touch()
    cp = os.pathsep.join([f"{tmp_path}/a/*", str(tmp_path / "guava.jar"), f"{tmp_path}/b/*"])
    assert [p.name for p in cassandra_jars(cp)] == ["cassandra-all-5.0.8.jar"]
    assert cassandra_jars(f"{tmp_path}/a/*") == []
