"""How ScyllaWriter groups rows into UNLOGGED batches (replica_batches: pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.adapters.replica_batches import replica_batches

_member = st.tuples(
    st.sampled_from([(1, 2), (2, 3), (3, 1)]),
    st.binary(min_size=1, max_size=2),
    st.integers(1, 300),
)


@pytest.mark.slow
@given(st.lists(_member, max_size=60), st.integers(1, 25), st.integers(1, 2000))
def test_every_row_once_one_replica_set_per_batch_within_limits(
    members: list[tuple[tuple[int, ...], bytes, int]], max_rows: int, max_bytes: int
) -> None:
    items = [(replicas, key, size, n) for n, (replicas, key, size) in enumerate(members)]
    batches = replica_batches(items, max_rows, max_bytes)
    assert sorted(n for b in batches for n in b) == list(range(len(items)))
    by_n = {n: (replicas, key, size) for replicas, key, size, n in items}
    for batch in batches:
        assert batch and len(batch) <= max_rows
        assert len({by_n[n][0] for n in batch}) == 1  # never two replica sets
        # Over the byte budget only when one item alone is.
        assert len(batch) == 1 or sum(by_n[n][2] for n in batch) <= max_bytes


def test_a_partitions_rows_stay_in_order_and_side_by_side() -> None:
    items = [
        ((1,), b"b", 10, "b1"),
        ((1,), b"a", 10, "a1"),
        ((1,), b"b", 10, "b2"),
        ((1,), b"a", 10, "a2"),
        ((2,), b"c", 10, "c1"),
    ]
    assert replica_batches(items, 3, 1000) == [["a1", "a2", "b1"], ["b2"], ["c1"]]
    assert replica_batches(items, 1, 1000) == [["a1"], ["a2"], ["b1"], ["b2"], ["c1"]]
