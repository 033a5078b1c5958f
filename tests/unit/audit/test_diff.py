"""tasks.audit.diff without a stack: how the rows read from both sides are classified
(missing, extra, stale and which columns), which differences are read again after the
freshness window and which of those count as settled, and that a difference names keys only,
never the contents of a row."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasks.audit.diff import (
    BucketSums,
    Difference,
    Key,
    ModelAudit,
    compare,
    differing_keys,
    needs_recheck,
    settled,
)
from tasks.audit.fingerprints import shape
from tasks.audit.scan import Buckets

SH = shape("sessions_by_id")
SECRET = "s3cr3t: the launch code is 0000"
U1 = "10000000-0000-4000-8000-000000000001"
U2 = "20000000-0000-4000-8000-000000000002"
U3 = "30000000-0000-4000-8000-000000000003"
USER = "0f0e0d0c-0b0a-4908-8706-050403020100"
V = 1_700_000_000_123_456  # a source version (µs)

Expected = dict[Key, tuple[int, tuple[str | None, ...], int]]
Actual = dict[Key, tuple[int, tuple[str | None, ...], int | None, int | None]]


def row(session_id: str, **changes: str | None) -> tuple[str | None, ...]:
    """A sessions_by_id row as compared text, in the shape's column order."""
    cells: dict[str, str | None] = {
        "session_id": session_id,
        "user_id": USER,
        "title": "a title",
        "created_at": "1700000000000",
        "last_message": "hello",
        "last_message_at": None,
        "turn_count": "2",
    }
    assert set(changes) <= set(cells)
    cells |= changes
    assert tuple(cells) == SH.columns
    return tuple(cells.values())


def exp(token: int, fields: tuple[str | None, ...], version: int = V) -> Expected:
    return {fields[:1]: (token, fields, version)}


def act(
    token: int, fields: tuple[str | None, ...], wt: int | None = V, max_wt: int | None = V
) -> Actual:
    return {fields[:1]: (token, fields, wt, max_wt)}


# --------------------------------------------------------------------------------------------
# compare


def test_equal_rows_give_nothing() -> None:
    r1, r2 = row(U1), row(U2, last_message_at="1700000000001")
    assert compare(SH, {**exp(5, r1), **exp(-9, r2)}, {**act(5, r1), **act(-9, r2)}) == []
    assert compare(SH, {}, {}) == []


def test_a_row_only_in_postgres_is_missing() -> None:
    (d,) = compare(SH, exp(5, row(U1)), {})
    assert d == Difference("sessions_by_id", "missing", {"session_id": U1}, 5, (), V, None, None)


def test_a_row_only_in_scylla_is_extra() -> None:
    (d,) = compare(SH, {}, act(-7, row(U1), wt=V - 10, max_wt=V + 3))
    assert d == Difference(
        "sessions_by_id", "extra", {"session_id": U1}, -7, (), None, V - 10, V + 3
    )


def test_a_stale_row_names_only_the_differing_columns() -> None:
    want = row(U1, title=SECRET, turn_count="3")
    have = row(U1, title="old title", turn_count="2")
    (d,) = compare(SH, exp(5, want), act(5, have, wt=V - 1, max_wt=V - 1))
    assert d.kind == "stale"
    assert d.columns == ("title", "turn_count")  # in the shape's order, no other column
    assert (d.token, d.expected_version_us, d.writetime_us, d.max_writetime_us) == (
        5,
        V,
        V - 1,
        V - 1,
    )
    assert d.key == {"session_id": U1}


def test_null_and_empty_text_are_different_values() -> None:
    (d,) = compare(SH, exp(5, row(U1, last_message="")), act(5, row(U1, last_message=None)))
    assert (d.kind, d.columns) == ("stale", ("last_message",))


def test_a_version_only_difference_is_stale_with_no_columns() -> None:
    r = row(U1)
    (d,) = compare(SH, exp(5, r, V), act(5, r, wt=V - 1_000_000))
    assert (d.kind, d.columns) == ("stale", ())
    assert (d.expected_version_us, d.writetime_us) == (V, V - 1_000_000)
    # A version column never written (no write time) differs from any version too.
    (d,) = compare(SH, exp(5, r, V), act(5, r, wt=None, max_wt=None))
    assert (d.kind, d.columns, d.writetime_us) == ("stale", (), None)


def test_other_cells_write_times_do_not_make_a_difference() -> None:
    # Only the version column's write time is the row's version; a value cell written
    # later (max_writetime_us) is reported with a difference, not one by itself.
    r = row(U1)
    assert compare(SH, exp(5, r), act(5, r, wt=V, max_wt=V + 99)) == []


def test_all_kinds_at_once_sorted_by_token() -> None:
    expected = {**exp(30, row(U1)), **exp(-20, row(U2, title="new"))}
    actual = {**act(-20, row(U2)), **act(10, row(U3))}
    found = compare(SH, expected, actual)
    assert [(d.kind, d.token, d.key["session_id"]) for d in found] == [
        ("stale", -20, U2),
        ("extra", 10, U3),
        ("missing", 30, U1),
    ]


def test_a_clustered_read_model_names_its_whole_key() -> None:
    sh = shape("conversation_timeline")
    key = (U1, "1700000000000", "123456", U2)
    fields = (*key, "agent", "hi", None)
    (d,) = compare(sh, {key: (8, fields, V)}, {})
    assert d.key == {
        "session_id": U1,
        "created_at": "1700000000000",
        "created_at_micros": "123456",
        "turn_id": U2,
    }
    assert d.source_id == U2  # the turn's id, not the partition key
    (d,) = compare(sh, {key: (8, fields, V)}, {key: (8, (*key, "agent", "hi", "m1"), V, V)})
    assert (d.kind, d.columns) == ("stale", ("model",))


def test_source_id_is_the_key_column_the_source_s_id_fills() -> None:
    (d,) = compare(SH, exp(5, row(U1)), {})
    assert d.source_id == U1
    rc = shape("recent_conversations")
    key = (USER, "1700000000000", U3)
    (d,) = compare(rc, {key: (1, (*key, "t", "m", None, "1"), V)}, {})
    assert d.source_id == U3


# --------------------------------------------------------------------------------------------
# Which differences are read again, and which settle


NOW = 2_000_000_000_000_000
WINDOW = 10_000_000  # 10 s


def diff(
    kind: Any,
    version: int | None = None,
    wt: int | None = None,
    columns: tuple[str, ...] = (),
) -> Difference:
    return Difference("sessions_by_id", kind, {"session_id": U1}, 5, columns, version, wt, wt)


@pytest.mark.parametrize(
    ("d", "again"),
    [
        (diff("extra", wt=NOW - 10**12), True),  # a delete leaves no version to date it by
        (diff("extra", wt=None), True),
        (diff("missing", version=None), True),
        (diff("missing", version=NOW), True),
        (diff("missing", version=NOW - WINDOW), True),  # the window's edge is inside it
        (diff("missing", version=NOW - WINDOW - 1), False),
        (diff("stale", version=NOW - 1, wt=NOW - 5), True),
        (diff("stale", version=NOW - WINDOW - 1, wt=NOW - 10**9), False),
        (diff("stale", version=NOW + 5, wt=NOW), True),  # written after the clock was read
    ],
)
def test_needs_recheck(d: Difference, again: bool) -> None:
    assert needs_recheck(d, NOW, WINDOW) is again


def test_needs_recheck_with_no_window_only_rechecks_what_is_now_or_later() -> None:
    assert needs_recheck(diff("stale", version=NOW, wt=1), NOW, 0)
    assert not needs_recheck(diff("stale", version=NOW - 1, wt=1), NOW, 0)


@pytest.mark.parametrize(
    ("first", "again", "done"),
    [
        # Gone the second time: it was only behind.
        (diff("missing", version=V), None, True),
        (diff("extra", wt=V), None, True),
        (diff("stale", version=V, wt=V - 1), None, True),
        # The source moved on, and Scylla holds at least the version first expected.
        (diff("stale", version=V, wt=V - 1), diff("stale", version=V + 5, wt=V), True),
        (diff("stale", version=V, wt=V - 1), diff("stale", version=V + 5, wt=V + 2), True),
        # Moved on, but Scylla is still below the first version: not merely behind.
        (diff("stale", version=V, wt=V - 1), diff("stale", version=V + 5, wt=V - 1), False),
        # The same version is still wrong.
        (diff("stale", version=V, wt=V - 1), diff("stale", version=V, wt=V - 1), False),
        (diff("stale", version=V, wt=V, columns=("title",)), diff("stale", V, V), False),
        (diff("missing", version=V), diff("missing", version=V), False),
        # Still missing at a newer version: no write time to show it caught up.
        (diff("missing", version=V), diff("missing", version=V + 5), False),
        # An extra row still there has no version to compare.
        (diff("extra", wt=V), diff("extra", wt=V), False),
        # The source went back in time (restored): not settled.
        (diff("stale", version=V, wt=V - 1), diff("stale", version=V - 5, wt=V), False),
        # A missing row that appeared, but stale at a newer version it does not hold yet.
        (diff("missing", version=V), diff("stale", version=V + 5, wt=V), True),
    ],
)
def test_settled(first: Difference, again: Difference | None, done: bool) -> None:
    assert settled(first, again) is done


# --------------------------------------------------------------------------------------------
# What a difference shows


def test_describe_names_keys_and_columns_never_values() -> None:
    want = row(U1, title=SECRET, last_message=SECRET)
    have = row(U1, title="other " + SECRET[:4], last_message=None)
    (d,) = compare(SH, exp(5, want, V), act(5, have, wt=V - 1))
    text = d.describe()
    assert text == (
        f"stale sessions_by_id(session_id={U1}): title, last_message differ; "
        f"written at an older version (writetime {V - 1}, version {V})"
    )
    for shown in (text, repr(d), json.dumps(d.as_dict())):
        assert SECRET not in shown and "launch code" not in shown


@pytest.mark.parametrize(
    ("d", "text"),
    [
        (diff("missing", version=V), f"missing sessions_by_id(session_id={U1})"),
        (diff("extra", wt=V), f"extra sessions_by_id(session_id={U1})"),
        (
            diff("stale", version=V, wt=V + 1),
            f"stale sessions_by_id(session_id={U1}): only the version differs; a newer write "
            f"shadows it (writetime {V + 1}, version {V})",
        ),
        (
            diff("stale", version=V, wt=V, columns=("title",)),
            f"stale sessions_by_id(session_id={U1}): title differ (writetime {V}, version {V})",
        ),
        (
            diff("stale", version=V, wt=None, columns=("title",)),
            f"stale sessions_by_id(session_id={U1}): title differ (writetime None, version {V})",
        ),
    ],
)
def test_describe(d: Difference, text: str) -> None:
    assert d.describe() == text


def test_as_dict_is_json_ready() -> None:
    d = diff("stale", version=V, wt=V - 1, columns=("title", "turn_count"))
    assert json.loads(json.dumps(d.as_dict())) == {
        "read_model": "sessions_by_id",
        "kind": "stale",
        "key": {"session_id": U1},
        "token": 5,
        "columns": ["title", "turn_count"],
        "expected_version_us": V,
        "writetime_us": V - 1,
        "max_writetime_us": V - 1,
    }


def test_model_audit_counts_and_grouping() -> None:
    m = ModelAudit("sessions_by_id", 4)
    m.differences = [diff("missing", V), diff("stale", V, V - 1), diff("missing", V + 1)]
    assert (m.count("missing"), m.count("stale"), m.count("extra")) == (2, 1, 0)
    other = Difference("steps_by_turn", "extra", {"agent_turn_id": U2}, 1)
    grouped = differing_keys([*m.differences, other])
    assert list(grouped) == ["sessions_by_id", "steps_by_turn"]
    assert grouped["sessions_by_id"] == m.differences and grouped["steps_by_turn"] == [other]


def test_bucket_sums_agree_mod_2_64_and_name_the_differing_buckets() -> None:
    """Postgres sums fingerprints exactly (numeric), Scylla's side as it scans: both are
    kept mod 2**64, so a sum that wraps on one side still matches the other's."""
    buckets = Buckets(3)
    exact, wrapped = BucketSums(buckets), BucketSums(buckets)
    big = (1 << 63) - 1
    exact.add(-4, 3, 3 * big)  # one exact sum
    for _ in range(3):
        wrapped.add(-4, 1, big)  # the same rows one by one, wrapping
    exact.add(3, 1, -5)
    wrapped.add(3, 1, -5)
    assert exact.differing(wrapped) == []
    assert exact.total() == wrapped.total() == 4
    wrapped.add(0, 1, 7)  # an extra row
    exact.add(-1, 0, 1)  # the same count, another sum
    wrapped.add(-1, 0, 2)
    assert exact.differing(wrapped) == [-1, 0]
    assert wrapped.differing(exact) == [-1, 0]
