"""Pure tests of the backfill: parameter validation, the command line, chunk planning, the
rate limiter and the gap rule. No stack needed."""

from __future__ import annotations

import inspect
import itertools
import json
import multiprocessing
import random
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.backfill import backfill_flow, build_parser, main
from tasks.backfill.load import RowRateLimiter
from tasks.backfill.params import BackfillParams, validate
from tasks.backfill.snapshot import (
    FEEDS,
    KeyRange,
    SnapshotFilter,
    check_cdc_slot,
    plan_table,
    tables_for,
    where,
)
from tasks.core.errors import ConfigurationError
from tasks.core.projection import READ_MODELS, SOURCE_TABLES
from tests.unit.backfill import limiter_worker

# --------------------------------------------------------------------------------------------
# Parameters


def test_defaults_are_valid_and_cover_every_read_model() -> None:
    p = validate({})
    assert set(p.read_models) == set(READ_MODELS)
    assert p.user_ids is None and p.chunk_size > 0 and p.concurrency > 0
    assert not (p.resume or p.dry_run or p.rebuild or p.no_cdc)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"read_models": ["conversation_timeline", "nope"]}, "read_models: unknown read model"),
        ({"read_models": []}, "read_models: must name at least one"),
        ({"chunk_size": 0}, "chunk_size: Input should be greater than 0"),
        ({"chunk_size": -5}, "chunk_size: Input should be greater than 0"),
        ({"concurrency": 0}, "concurrency: Input should be greater than 0"),
        ({"readers": -1}, "readers: Input should be greater than 0"),
        ({"rate_limit_rows_per_s": 0}, "rate_limit_rows_per_s: Input should be greater than 0"),
        ({"rate_limit_rows_per_s": -100.0}, "rate_limit_rows_per_s: Input should be greater"),
        ({"user_ids": ["not-a-uuid"]}, "user_ids.0: Input should be a valid UUID"),
        ({"user_ids": [str(uuid.uuid4()), "1234"]}, "user_ids.1: Input should be a valid UUID"),
        ({"user_ids": []}, "user_ids: an empty list would select nothing"),
        ({"created_from": "2026-01-01T00:00:00"}, "created_from: Input should have timezone"),
        ({"created_from": "yesterday"}, "created_from: Input should be a valid datetime"),
        (
            {"created_from": "2026-02-01T00:00:00Z", "created_to": "2026-01-01T00:00:00Z"},
            "created_from .* must be before created_to",
        ),
        ({"rebuild": True, "resume": True}, "rebuild and resume together"),
        ({"keyspace": "drop table; --"}, "keyspace: must be a CQL identifier"),
        ({"chunk_size": "ten"}, "chunk_size: Input should be a valid integer"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_name_themselves(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        validate(params)


def test_every_bad_parameter_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as err:
        validate({"chunk_size": 0, "concurrency": 0, "user_ids": ["x"]})
    text = str(err.value)
    assert all(name in text for name in ("chunk_size", "concurrency", "user_ids.0"))


def test_snapshot_dir_must_be_a_complete_snapshot(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"has no manifest\.json"):
        validate({"snapshot_dir": str(tmp_path)})
    snap = _snapshot(tmp_path)
    assert validate({"snapshot_dir": str(snap)}).snapshot_dir == snap
    with pytest.raises(ConfigurationError, match="rebuild with snapshot_dir"):
        validate({"snapshot_dir": str(snap), "rebuild": True})
    # Knowingly without CDC there are no CDC changes to lose.
    assert validate({"snapshot_dir": str(snap), "rebuild": True, "no_cdc": True}).rebuild


def test_strings_from_the_command_line_are_parsed() -> None:
    u = uuid.uuid4()
    p = validate(
        {
            "user_ids": [str(u)],
            "chunk_size": "1000",
            "rate_limit_rows_per_s": "2.5",
            "created_from": "2026-01-01T00:00:00+02:00",
            "read_models": "sessions_by_id",
        }
    )
    assert p.user_ids == (u,)
    assert p.chunk_size == 1000 and p.rate_limit_rows_per_s == 2.5
    assert p.created_from == datetime(2025, 12, 31, 22, tzinfo=UTC)
    assert p.read_models == ("sessions_by_id",)
    assert p.filter == SnapshotFilter((u,), p.created_from, None)


def test_cli_flow_and_model_have_the_same_parameters() -> None:
    flow_params = set(inspect.signature(backfill_flow.fn).parameters)
    cli = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flow_params == set(BackfillParams.model_fields) == cli


def test_cli_rejects_bad_parameters_before_starting_a_flow(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(**_: object) -> None:
        raise AssertionError("the flow was started")

    monkeypatch.setattr("flows.backfill.backfill_flow", must_not_run)
    assert main(["--chunk-size", "0", "--user-ids", "nope"]) == 2
    err = capsys.readouterr().err
    assert "chunk_size: Input should be greater than 0" in err
    assert "user_ids.0: Input should be a valid UUID" in err


# --------------------------------------------------------------------------------------------
# Chunk planning


def _boundaries(keys: list[uuid.UUID], chunk_size: int) -> list[uuid.UUID]:
    """What the planning query returns: every chunk_size-th key in key order."""
    return sorted(keys)[::chunk_size]


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


# --------------------------------------------------------------------------------------------
# The gap rule and the rate limiter


def test_gap_rule() -> None:
    check_cdc_slot({"exists": True, "active": True}, "s")
    with pytest.raises(ConfigurationError, match=r"does not exist.*gap"):
        check_cdc_slot({"exists": False}, "s")
    with pytest.raises(ConfigurationError, match="no connector is streaming"):
        check_cdc_slot({"exists": True, "active": False}, "s")


@pytest.mark.parametrize("limit", [500.0, 4000.0])
def test_rate_limiter_never_runs_ahead_of_the_limit(limit: float) -> None:
    limiter = RowRateLimiter(limit)
    try:
        rows, started = 0, time.monotonic()
        while rows < limit * 0.8:  # ~0.8 s of rows in odd-sized writes
            n = random.randint(1, int(limit // 5))
            limiter.acquire(n)
            rows += n
            # The bucket starts empty: rows taken by any moment never exceed limit x elapsed
            # (plus one 1/10 s piece, taken at the start of its slot).
            assert rows <= limit * (time.monotonic() - started) + limiter.burst + 1
        rate = rows / (time.monotonic() - started)
    finally:
        limiter.close()
    assert limit * 0.85 <= rate <= limit * 1.05, rate


def test_rate_limiter_makes_up_for_a_stall() -> None:
    limiter = RowRateLimiter(1000.0)
    try:
        started = time.monotonic()
        limiter.acquire(100)
        time.sleep(0.3)  # a stall: its tokens are kept (up to 0.5 s), not lost
        limiter.acquire(300)
        elapsed = time.monotonic() - started
    finally:
        limiter.close()
    assert elapsed < 0.45, elapsed


def test_one_rate_limit_holds_for_several_worker_processes() -> None:
    # Three spawned processes share one limit (the loader's workers > 1): together they take
    # the limit's rows, not three times as many.
    limit = 600.0
    limiter = RowRateLimiter.shared(limit)
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(
            3, mp_context=ctx, initializer=limiter_worker.join, initargs=(limiter.for_worker(),)
        ) as pool:
            # All three processes started and imported before the clock starts.
            pids: set[int] = set()
            for _ in range(20):
                pids |= {
                    f.result(timeout=120)
                    for f in [pool.submit(limiter_worker.ready, 0.3) for _ in range(3)]
                }
                if len(pids) == 3:
                    break
            assert len(pids) == 3, pids
            end_at = time.monotonic() + 4.0
            futures = [pool.submit(limiter_worker.take_rows, end_at) for _ in range(3)]
            shares = [f.result(timeout=60) for f in futures]
    finally:
        limiter.close()
    rows = sum(n for n, _ in shares)
    # From the first process's first row on, the bucket is taken at the full rate by
    # whoever is running; it refilled at most catch_up_s (0.5 s) of rows before that.
    window = end_at - min(started for _, started in shares)
    assert window > 3, f"a worker took {4 - window:.1f} s to take its first rows"
    assert limit * window * 0.9 <= rows <= limit * (window + 0.5) + 3 * 20, (rows, window)


def test_batching_writer_drops_only_the_replica_batch_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server warns on every batch over 10 partitions; the loader's batches span
    # partitions of one replica set on purpose. Other server warnings still get through.
    from cassandra.protocol import log as driver_log

    from tasks.adapters.scylla import ScyllaWriter

    ScyllaWriter(object(), "ks", batch_rows=20)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="cassandra.protocol"):
        driver_log.warning(
            "Server warning: %s",
            "Unlogged batch covering 13 partitions detected against table [ks.t].",
        )
        driver_log.warning("Server warning: %s", "Batch for [ks.t] is of size 6.1KiB")
    assert [r.getMessage() for r in caplog.records] == [
        "Server warning: Batch for [ks.t] is of size 6.1KiB"
    ]


# --------------------------------------------------------------------------------------------
# Values that used to pass: each now stops the run with a message naming it


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"rate_limit_rows_per_s": float("inf")}, "rate_limit_rows_per_s: .*finite"),
        ({"rate_limit_rows_per_s": "inf"}, "rate_limit_rows_per_s: .*finite"),
        ({"rate_limit_rows_per_s": float("nan")}, "rate_limit_rows_per_s: .*finite"),
        ({"readers": 10_000}, "readers: Input should be less than or equal to"),
        ({"concurrency": 10**9}, "concurrency: Input should be less than or equal to"),
        ({"chunk_size": 10**12}, "chunk_size: Input should be less than or equal to"),
        ({"write_batch_rows": 10**6}, "write_batch_rows: Input should be less than or equal to"),
        ({"chunk_size": True}, "chunk_size: Input should be a valid integer"),
        ({"readers": False}, "readers: Input should be a valid integer"),
    ],
)
def test_unbounded_or_non_numeric_values_are_refused(params: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        validate(params)


def _snapshot(tmp_path: Path, filt: SnapshotFilter | None = None) -> Path:
    d = tmp_path / "snap"
    d.mkdir()
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "snapshot_id": "s",
                "snapshot_time": datetime.now(UTC).isoformat(),
                "wal_lsn": "0/1",
                "slot": {"exists": True},
                "filter": (filt or SnapshotFilter()).to_json(),
                "read_models": list(READ_MODELS),
                "chunk_size": 10,
                "tables": {},
                "chunks": [],
                "seconds": 0.0,
                "format": 1,
            }
        )
    )
    return d


def test_snapshot_dir_with_other_filters_is_refused(tmp_path: Path) -> None:
    u = uuid.uuid4()
    d = _snapshot(tmp_path, SnapshotFilter((u,)))
    # The snapshot's own filter, given again, is fine: that is what gets loaded.
    assert validate({"snapshot_dir": str(d), "user_ids": [str(u)]}).user_ids == (u,)
    with pytest.raises(ConfigurationError, match=r"snapshot_dir .* filter"):
        validate({"snapshot_dir": str(d), "user_ids": [str(uuid.uuid4())]})
    with pytest.raises(ConfigurationError, match=r"snapshot_dir .* filter"):
        validate({"snapshot_dir": str(d), "created_from": "2026-01-01T00:00:00Z"})
    unfiltered = tmp_path / "other"
    unfiltered.mkdir()
    (unfiltered / "manifest.json").write_text(
        (d / "manifest.json")
        .read_text()
        .replace(f'"{u}"', '"00000000-0000-0000-0000-000000000001"')
    )
    with pytest.raises(ConfigurationError, match=r"snapshot_dir .* filter"):
        validate({"snapshot_dir": str(unfiltered), "user_ids": [str(u)]})


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1}', ""])
def test_a_corrupt_manifest_names_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ConfigurationError, match=r"manifest\.json"):
        validate({"snapshot_dir": str(tmp_path)})
    from tasks.backfill.snapshot import Manifest

    with pytest.raises(ConfigurationError, match=r"manifest\.json"):
        Manifest.read(tmp_path)


def test_snapshot_age_against_gc_grace_seconds() -> None:
    from tasks.backfill.snapshot import check_snapshot_age

    taken = datetime(2026, 1, 1, tzinfo=UTC)
    grace = {"conversation_timeline": 864_000, "sessions_by_id": 3_600}
    check_snapshot_age(taken, grace, now=taken + timedelta(seconds=3_599))
    with pytest.raises(
        ConfigurationError,
        match=r"older than .*gc_grace_seconds.*sessions_by_id.*allow_old_snapshot",
    ):
        check_snapshot_age(taken, grace, now=taken + timedelta(seconds=3_601))
    check_snapshot_age(taken, grace, now=taken + timedelta(days=30), allow=True)
