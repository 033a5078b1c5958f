"""The batch-size estimates: the pre-bind one (dual-write's check) never under the bound one
(CDC and backfill), and neither fails on a value that binding will reject."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from tasks.adapters.replica_batches import approx_bytes, bound_bytes
from tests.unit.core.test_errors import FakeSession, _turn, _writer


@given(st.text(max_size=3000), st.text(max_size=50), st.booleans())
def test_the_estimate_before_binding_bounds_the_one_after(
    content: str, model: str, empty: bool
) -> None:
    content = content.encode("utf-8", "replace").decode("utf-8", "replace")  # encodable
    model = model.encode("utf-8", "replace").decode("utf-8", "replace")
    writer = _writer(FakeSession())
    m = _turn("" if empty else content)
    m = type(m)(
        m.read_model,
        m.key,
        (("role", "user"), ("content", m.values[1][1]), ("model", model)),
        m.timestamp_us,
    )
    [(prepared, params)] = writer.bound([m])
    bound = prepared.bind(params)
    assert approx_bytes(params) >= bound_bytes(bound.values)
    # Every value's own bytes are counted.
    assert bound_bytes(bound.values) >= sum(len(v) for v in bound.values if v is not None)


def test_sizing_does_not_fail_on_what_binding_rejects() -> None:
    params = (uuid.uuid4(), datetime.now(UTC), 0, uuid.uuid4(), "user", "x\ud800y", "", 1)
    assert approx_bytes(params) > 0
