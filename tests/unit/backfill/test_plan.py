"""Chunk planning and the snapshot's filters (pure)."""

from __future__ import annotations

import itertools
import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.backfill.plan import FEEDS, KeyRange, SnapshotFilter, plan_table, tables_for, where
from tasks.core.catalog import READ_MODELS, SOURCE_TABLES


def _boundaries(keys: list[uuid.UUID], chunk_size: int) -> list[uuid.UUID]:
    """What the planning query returns: every chunk_size-th key in key order."""
    return sorted(keys)[::chunk_size]


@pytest.mark.slow
@given(st.lists(st.uuids(), unique=True, max_size=300), st.integers(1, 50))
def test_chunks_partition_the_keys(keys: list[uuid.UUID], chunk_size: int) -> None:
    plan = plan_table("human_turns", _boundaries(keys, chunk_size), len(keys), chunk_size)
    assert sum(c.rows for c in plan) == len(keys)
    assert [c.index for c in plan] == list(range(len(plan)))
    for key in keys:  # each key in exactly one chunk
        assert sum(c.key_range.contains(key) for c in plan) == 1
    for c in plan:  # and each chunk holds the rows it was planned with, at most chunk_size
        assert sum(c.key_range.contains(k) for k in keys) == c.rows <= chunk_size
    if plan:  # open at both ends: a row is never outside every chunk
        assert plan[0].key_range.lo is None and plan[-1].key_range.hi is None
        for a, b in itertools.pairwise(plan):
            assert a.key_range.hi == b.key_range.lo


def test_skewed_keys_still_give_even_chunks() -> None:
    # Time-ordered keys crowd one corner of the uuid space; bounds from the data don't care.
    keys = [uuid.UUID(int=(1 << 100) + i) for i in range(1000)]
    plan = plan_table("steps", _boundaries(keys, 100), 1000, 100)
    assert [c.rows for c in plan] == [100] * 10
    assert [sum(c.key_range.contains(k) for k in keys) for c in plan] == [100] * 10


def test_plan_rejects_inconsistent_input() -> None:
    a, b = sorted([uuid.uuid4(), uuid.uuid4()])
    assert plan_table("sessions", [], 0, 10) == []
    with pytest.raises(ValueError, match="expected 2"):
        plan_table("sessions", [a], 15, 10)
    with pytest.raises(ValueError, match="ascending"):
        plan_table("sessions", [b, a], 15, 10)
    with pytest.raises(ValueError, match="chunk_size"):
        plan_table("sessions", [a], 1, 0)


def test_key_range_agrees_with_postgres_uuid_order() -> None:
    # Postgres compares uuids as 16 bytes, big-endian: the order of UUID.int and of bytes.
    keys = [uuid.uuid4() for _ in range(200)]
    assert sorted(keys) == sorted(keys, key=lambda u: u.bytes)
    lo, hi = sorted(random.sample(keys, 2))
    r = KeyRange(lo, hi)
    assert r.contains(lo) and not r.contains(hi)


def test_tables_follow_the_projection() -> None:
    assert FEEDS["sessions"] == {"recent_conversations", "sessions_by_id"}
    assert FEEDS["human_turns"] == FEEDS["agent_turns"] == {"conversation_timeline"}
    assert FEEDS["steps"] == {"steps_by_turn"}
    assert tables_for(["conversation_timeline"]) == ("human_turns", "agent_turns")
    assert tables_for(READ_MODELS) == SOURCE_TABLES


def test_filters_become_sql_conditions() -> None:
    u = uuid.uuid4()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    lo = uuid.uuid4()
    _, params = where("sessions", SnapshotFilter((u,), t0, None), KeyRange(lo, None))
    assert params == [[u], t0, lo]
    clause, params = where("steps", SnapshotFilter((u,)))
    assert "session_id IN (SELECT id FROM sessions" in repr(clause) and params == [[u]]
    _, params = where("steps", SnapshotFilter())
    assert params == []


def test_equal_filters_have_equal_manifest_json() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    t = datetime(2026, 1, 1, tzinfo=UTC)
    plus2 = t.astimezone(timezone(timedelta(hours=2)))
    assert SnapshotFilter((a, b), t).to_json() == SnapshotFilter((b, a), plus2).to_json()
    assert SnapshotFilter((a,)).to_json() != SnapshotFilter((b,)).to_json()


def test_filter_round_trips_through_the_manifest() -> None:
    f = SnapshotFilter((uuid.uuid4(),), datetime(2026, 1, 1, tzinfo=UTC), None)
    back = SnapshotFilter.from_json(json.loads(json.dumps(f.to_json())))
    assert back == f and back.to_json() == f.to_json()
