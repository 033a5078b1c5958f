"""tasks.audit.sampled_quality and tasks.audit.cross_model without the stack: what the facts
read from Scylla mean (pure), which keys a sample and a list of failures give, how a sample is
read in bounded chunks (reading replaced by a fake), and Data Docs built by GX from validations
of pandas frames. Reading Scylla itself: tests/integration/test_sampled_quality.py."""

from __future__ import annotations

import uuid
from collections import namedtuple
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest
from cassandra.cluster import Session

from tasks.audit import cross_model, sampled_quality
from tasks.audit.cross_model import (
    HEADER_TURN_COUNT,
    RECENT_TURN_COUNT,
    STEP_TURN_IN_TIMELINE,
    CrossModelFailure,
    SessionFacts,
    StepFacts,
    session_failures,
    step_failures,
)
from tasks.audit.quality import Validation, run_validation
from tasks.audit.sampled_quality import build_data_docs, read_sample, validate_samples
from tasks.core.errors import InvalidInput

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
S, U, A, B = (uuid.UUID(int=n) for n in (1, 2, 3, 4))
NO_SESSION = cast(Session, None)  # for calls that must refuse their input before any I/O


# --------------------------------------------------------------------------------------------
# Cross-model checks: facts -> failures


def test_a_consistent_session_passes() -> None:
    facts = SessionFacts(S, 3, True, 3, U, recent_found=True, recent_turn_count=3)
    assert session_failures(facts) == []


def test_an_unknown_session_is_not_a_failure() -> None:
    assert session_failures(SessionFacts(S, 0, header_found=False)) == []


def test_turns_without_a_header() -> None:
    (f,) = session_failures(SessionFacts(S, 2, header_found=False))
    assert (f.check, f.key) == (HEADER_TURN_COUNT, {"session_id": str(S)})
    assert f.detail == "sessions_by_id has no row, conversation_timeline has 2 rows"


def test_header_and_recent_counts_are_each_compared_with_the_timeline() -> None:
    facts = SessionFacts(S, 2, True, 3, U, recent_found=True, recent_turn_count=1)
    header, recent = session_failures(facts)
    assert (header.check, header.key) == (HEADER_TURN_COUNT, {"session_id": str(S)})
    assert header.detail == "sessions_by_id.turn_count = 3, conversation_timeline has 2 rows"
    assert (recent.check, recent.key) == (
        RECENT_TURN_COUNT,
        {"user_id": str(U), "session_id": str(S)},
    )
    assert recent.detail == "recent_conversations.turn_count = 1, conversation_timeline has 2 rows"
    assert str(recent) == (
        f"recent_turn_count (user_id={U}, session_id={S}): "
        "recent_conversations.turn_count = 1, conversation_timeline has 2 rows"
    )


def test_a_missing_recent_row_fails_and_an_unlooked_one_does_not() -> None:
    (f,) = session_failures(SessionFacts(S, 2, True, 2, U, recent_found=False))
    assert f.check == RECENT_TURN_COUNT and "recent_conversations has no row" in f.detail
    # no user_id/created_at in the header to find the row by: only the header is compared
    assert session_failures(SessionFacts(S, 2, True, 2, None, recent_found=None)) == []
    assert [f.check for f in session_failures(SessionFacts(S, 2, True, None))] == [
        HEADER_TURN_COUNT
    ]


@pytest.mark.parametrize(
    ("roles", "fails", "says"),
    [
        (("agent",), False, ""),
        (("human", "agent"), False, ""),  # a duplicate turn is the timeline suite's finding
        ((), True, "no row with that turn_id"),
        (("human",), True, "the turn with role 'human'"),
        ((None,), True, "the turn with role None"),
    ],
)
def test_a_steps_turn_must_be_an_agent_turn_of_its_session(
    roles: tuple[str | None, ...], fails: bool, says: str
) -> None:
    failures = step_failures(StepFacts(A, S, roles))
    assert bool(failures) is fails
    if fails:
        (f,) = failures
        assert f.check == STEP_TURN_IN_TIMELINE
        assert f.key == {"agent_turn_id": str(A), "session_id": str(S)}
        assert f.detail.startswith(f"steps_by_turn.session_id = {S}, ")
        assert says in f.detail


def test_recheck_keys_come_from_the_failures() -> None:
    failures = [
        CrossModelFailure(HEADER_TURN_COUNT, {"session_id": str(S)}, "x"),
        CrossModelFailure(RECENT_TURN_COUNT, {"user_id": str(U), "session_id": str(S)}, "x"),
        CrossModelFailure(
            STEP_TURN_IN_TIMELINE, {"agent_turn_id": str(B), "session_id": str(U)}, ""
        ),
        CrossModelFailure(
            STEP_TURN_IN_TIMELINE, {"agent_turn_id": str(A), "session_id": str(S)}, ""
        ),
        CrossModelFailure("some_later_check", {"session_id": str(U)}, "not ours to re-check"),
    ]
    assert cross_model.recheck_keys(failures) == ([S], [B, A])
    assert cross_model.recheck_keys([]) == ([], [])


def test_cross_keys_of_a_sample() -> None:
    samples: dict[str, list[Any]] = {
        "sessions_by_id": [S, A],
        "conversation_timeline": [str(A), B],  # text ids are accepted, duplicates dropped
        "steps_by_turn": [U, U],
        "recent_conversations": [uuid.uuid4()],  # user ids: their sessions come from the rows
    }
    assert cross_model.cross_keys(samples, [U, S], limit=10) == ([S, A, B, U], [U])
    assert cross_model.cross_keys(samples, [U], limit=2) == ([S, A], [U])
    assert cross_model.cross_keys({}, [], limit=5) == ([], [])
    with pytest.raises(InvalidInput, match="session_id must be a UUID"):
        cross_model.cross_keys({"sessions_by_id": [7]}, [], limit=5)


def test_cells_are_read_whatever_the_row_factory() -> None:
    Row = namedtuple("Row", "user_id created_at")
    for row in ({"user_id": U, "created_at": NOW}, Row(U, NOW), (U, NOW)):
        assert cross_model._cell(row, "created_at", 1) == NOW


def test_chunks() -> None:
    assert [list(c) for c in cross_model.chunks(list(range(5)), 2)] == [[0, 1], [2, 3], [4]]
    assert list(cross_model.chunks([], 3)) == []


# --------------------------------------------------------------------------------------------
# Reading a sample: chunked, and never more than max_rows (read_model_frame replaced by a fake)


class FakeReader:
    """read_model_frame over partitions of known sizes, recording each call."""

    def __init__(self, sizes: dict[uuid.UUID, int]) -> None:
        self.sizes = sizes
        self.calls: list[tuple[list[uuid.UUID], int]] = []

    def __call__(
        self, _session: Any, _read_model: str, keys: list[uuid.UUID], limit: int, **_kw: Any
    ) -> pd.DataFrame:
        self.calls.append((list(keys), limit))
        rows = [{"agent_turn_id": k, "n": i} for k in keys for i in range(self.sizes.get(k, 0))]
        return pd.DataFrame(rows[:limit], columns=["agent_turn_id", "n"])


def test_a_sample_is_read_in_chunks_until_max_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [uuid.UUID(int=i) for i in range(1, 41)]
    reader = FakeReader({k: 3 for k in keys})
    monkeypatch.setattr(sampled_quality, "read_model_frame", reader)
    frame = read_sample(NO_SESSION, "cqrs", "steps_by_turn", [*keys, keys[0]], max_rows=50)
    assert len(frame) == 50 and list(frame.index) == list(range(50))
    chunk = sampled_quality.READ_CHUNK
    # 16 partitions (48 rows), then the next 16 asked for the 2 rows still wanted; no third read
    assert reader.calls == [(keys[:chunk], 50), (keys[chunk : 2 * chunk], 2)]
    assert list(frame["agent_turn_id"].unique()) == keys[:17]


def test_a_sample_of_empty_partitions_keeps_the_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = FakeReader({})
    monkeypatch.setattr(sampled_quality, "read_model_frame", reader)
    assert list(read_sample(NO_SESSION, "ks", "steps_by_turn", [A], 10).columns) == [
        "agent_turn_id",
        "n",
    ]
    frame = read_sample(NO_SESSION, "ks", "steps_by_turn", [], 10)
    assert frame.empty and list(frame.columns) == ["agent_turn_id", "n"]
    assert reader.calls[-1] == ([], 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rows": -1}, "max_rows must be a non-negative integer"),
        ({"max_rows": True}, "max_rows must be a non-negative integer"),
        ({"max_rows": 2.5}, "max_rows must be a non-negative integer"),
        ({"keyspace": "bad-name"}, "invalid keyspace name"),
        ({"samples": {"users": [S]}}, "unknown read model"),
        ({"run_name": "///"}, "no usable characters"),
    ],
)
def test_validate_samples_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "keyspace": "cqrs",
        "samples": {"sessions_by_id": [S]},
        "max_rows": 10,
        "data_docs_dir": Path("/nonexistent"),
    } | kwargs
    with pytest.raises(InvalidInput, match=message):
        validate_samples(NO_SESSION, **args)


def test_validate_samples_end_to_end_on_fakes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    recent = pd.DataFrame(
        [
            {
                "user_id": U,
                "created_at": NOW - timedelta(hours=1),
                "session_id": B,
                "title": "",
                "last_message": "",
                "last_message_at": None,
                "turn_count": 0,
            }
        ]
    )
    timeline = pd.DataFrame(
        [{"session_id": S, "created_at": NOW, "turn_id": A, "role": "robot", "content": "x"}]
    )
    frames = {"recent_conversations": recent, "conversation_timeline": timeline}
    monkeypatch.setattr(
        sampled_quality, "read_sample", lambda _s, _ks, rm, _keys, _max: frames[rm].copy()
    )
    asked: list[tuple[list[uuid.UUID], list[uuid.UUID]]] = []
    failure = CrossModelFailure(HEADER_TURN_COUNT, {"session_id": str(S)}, "1 vs 2")

    def fake_cross(_s: Any, _ks: str, sessions: Any, turns: Any) -> list[CrossModelFailure]:
        asked.append((list(sessions), list(turns)))
        return [failure]

    monkeypatch.setattr(sampled_quality, "cross_model_failures", fake_cross)
    samples = {"recent_conversations": [U], "conversation_timeline": [S]}
    result = validate_samples(
        NO_SESSION, "cqrs", samples, max_rows=5, data_docs_dir=tmp_path / "d", now=NOW
    )
    assert asked == [([S, B], [])]  # the sampled session, then the recent row's session
    assert result.cross_model == (failure,)
    assert result.rows_validated == {"recent_conversations": 1, "conversation_timeline": 1}
    assert result.results["recent_conversations"].success
    assert not result.results["conversation_timeline"].success and not result.success
    assert result.data_docs_index == tmp_path / "d" / "index.html"
    assert result.data_docs_index.is_file() and result.data_docs_error is None
    assert result.seconds is not None and set(result.seconds) == {
        "read",
        "validate",
        "cross_model",
        "data_docs",
    }

    # Data Docs that cannot be written are reported, not raised: the findings still count.
    (tmp_path / "file").write_text("not a folder")
    broken = validate_samples(
        NO_SESSION, "cqrs", samples, max_rows=5, data_docs_dir=tmp_path / "file", now=NOW
    )
    assert broken.data_docs_index is None and broken.data_docs_error
    assert broken.cross_model == (failure,) and set(broken.results) == set(samples)

    # max_rows 0: nothing read or validated, no Data Docs; the cross-model checks still run
    none = validate_samples(
        NO_SESSION, "cqrs", samples, max_rows=0, data_docs_dir=tmp_path / "z", now=NOW
    )
    assert none.results == {} and none.data_docs_index is None and none.cross_model == (failure,)
    assert asked[-1] == ([S], []) and not (tmp_path / "z").exists()


# --------------------------------------------------------------------------------------------
# Data Docs


def _validation(role: str, now: datetime = NOW) -> Validation:
    frame = pd.DataFrame(
        [{"session_id": S, "created_at": NOW, "turn_id": A, "role": role, "content": "x"}]
    )
    return run_validation("conversation_timeline", frame, now=now)


def _steps() -> Validation:
    frame = pd.DataFrame(
        [
            {
                "agent_turn_id": A,
                "created_at": NOW,
                "step_id": B,
                "session_id": S,
                "kind": "answer",
                "payload": "{}",
            }
        ]
    )
    return run_validation("steps_by_turn", frame, now=NOW)


def test_data_docs_show_the_suites_and_their_validations(tmp_path: Path) -> None:
    bad, good = _validation("robot"), _steps()
    index = build_data_docs(tmp_path, [bad, good], run_name="nightly audit/1", run_time=NOW)
    assert index == tmp_path / "index.html"
    html = index.read_text(encoding="utf-8")
    for suite in ("conversation_timeline", "steps_by_turn"):
        assert f"expectations/{suite}.html" in html
        (page,) = (tmp_path / "validations" / suite / "nightly_audit_1").rglob("*.html")
        assert f"validations/{suite}/nightly_audit_1/" in html
    (page,) = (tmp_path / "validations" / "conversation_timeline").rglob("*.html")
    assert "robot" in page.read_text(encoding="utf-8")
    assert "'_validation_success_text': 'Failed', 'asset_name': 'conversation_timeline'" in html
    assert "'_validation_success_text': 'Success', 'asset_name': 'steps_by_turn'" in html
    # the caller's result is left as it was
    assert "run_id" not in bad.gx_result.meta


def test_a_rebuild_shows_only_its_own_validations(tmp_path: Path) -> None:
    build_data_docs(tmp_path, [_validation("robot"), _steps()], run_name="first", run_time=NOW)
    later = NOW + timedelta(hours=1)
    build_data_docs(tmp_path, [_validation("human", later)], run_name="second", run_time=later)
    html = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "second" in html and "validations/conversation_timeline/first" not in html
    assert "steps_by_turn" not in html
    assert not list((tmp_path / "validations").rglob("first/*/*.html"))


def test_data_docs_refuse_bad_input(tmp_path: Path) -> None:
    v = _validation("human")
    with pytest.raises(InvalidInput, match="one validation per suite"):
        build_data_docs(tmp_path, [v, v], run_name="x")
    with pytest.raises(InvalidInput, match="timezone-aware"):
        build_data_docs(tmp_path, [v], run_name="x", run_time=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("name", "safe"),
    [("audit 2026-12-02T10:00", "audit_2026-12-02T10_00"), ("a/../b", "a_.._b"), ("ok", "ok")],
)
def test_run_names_become_one_path_segment(name: str, safe: str) -> None:
    assert sampled_quality.safe_run_name(name) == safe
