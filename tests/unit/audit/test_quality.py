"""tasks.audit.quality: frames of read-model rows validated against their suites, on pandas
frames only (no stack). Every expectation of every suite is shown to fail on a frame that
breaks its invariant (test_every_expectation_is_exercised keeps VIOLATIONS complete), and good
frames pass."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from tasks.audit import quality, suites
from tasks.core.catalog import READ_MODELS
from tasks.core.errors import InvalidInput
from tasks.core.write_policy import DualWritePolicy

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
T1 = NOW - timedelta(hours=2)
T2 = NOW - timedelta(hours=1)
T3 = NOW - timedelta(minutes=30)
POLICY = DualWritePolicy()

Row = dict[str, Any]


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


USER, S1, S2 = uid(1), uid(2), uid(3)
H1, A1, H2 = uid(11), uid(12), uid(13)
ST1, ST2 = uid(21), uid(22)


def good_rows(read_model: str) -> list[Row]:
    """Rows as the projection writes them (timestamps naive UTC, as the driver reads them)."""
    naive = {t: t.replace(tzinfo=None) for t in (T1, T2, T3)}
    if read_model == "recent_conversations":
        return [
            {
                "user_id": USER,
                "created_at": naive[T2],
                "session_id": S2,
                "title": "",
                "last_message": "",
                "last_message_at": None,
                "turn_count": 0,
            },
            {
                "user_id": USER,
                "created_at": naive[T1],
                "session_id": S1,
                "title": "Trip",
                "last_message": "x" * 500,
                "last_message_at": naive[T3],
                "turn_count": 3,
            },
        ]
    if read_model == "sessions_by_id":
        return [
            {
                "session_id": S1,
                "user_id": USER,
                "title": "Trip",
                "created_at": naive[T1],
                "last_message": "Sure: Lisbon.",
                "last_message_at": naive[T3],
                "turn_count": 3,
            },
            {
                "session_id": S2,
                "user_id": USER,
                "title": "",
                "created_at": naive[T2],
                "last_message": "",
                "last_message_at": None,
                "turn_count": 0,
            },
        ]
    if read_model == "conversation_timeline":
        return [
            {
                "session_id": S1,
                "created_at": naive[T1],
                "turn_id": H1,
                "role": "human",
                "content": "Where to?",
                "model": None,
            },
            {
                "session_id": S1,
                "created_at": naive[T2],
                "turn_id": A1,
                "role": "agent",
                "content": "",
                "model": "",
            },  # agent content and model may be empty
            {
                "session_id": S1,
                "created_at": naive[T3],
                "turn_id": H2,
                "role": "human",
                "content": "Lisbon?",
                "model": None,
            },
        ]
    if read_model == "steps_by_turn":
        return [
            {
                "agent_turn_id": A1,
                "created_at": naive[T2],
                "step_id": ST1,
                "session_id": S1,
                "kind": "tool_call",
                "payload": '{"args":{"q":"lisbon"},"tool":"search"}',
            },
            {
                "agent_turn_id": A1,
                "created_at": naive[T2],
                "step_id": ST2,
                "session_id": S1,
                "kind": "answer",
                "payload": "null",
            },
        ]
    raise AssertionError(read_model)


def frame(rows: list[Row]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows)


def validate(read_model: str, rows: list[Row], **kw: Any) -> quality.QualityResult:
    return quality.validate_frame(read_model, frame(rows), now=NOW, **kw)


# --------------------------------------------------------------------------------------------
# Good frames


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_good_frames_pass(read_model: str) -> None:
    result = validate(read_model, good_rows(read_model))
    assert result.success, result.summary()
    assert result.failures == ()
    assert result.row_count == len(good_rows(read_model))
    assert result.evaluated == len(suites.expectation_names(read_model)) > 5
    assert result.suite == read_model


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_empty_frame_with_the_columns_passes(read_model: str) -> None:
    cols = list(good_rows(read_model)[0])
    result = quality.validate_frame(read_model, pd.DataFrame(columns=cols), now=NOW)
    assert result.success, result.summary()
    assert result.row_count == 0


@pytest.mark.parametrize("read_model", ["conversation_timeline", "steps_by_turn"])
def test_a_new_column_does_not_break_the_suites(read_model: str) -> None:
    # The schema may gain an int clustering column created_at_micros on these two tables.
    rows = [r | {"created_at_micros": i} for i, r in enumerate(good_rows(read_model))]
    result = validate(read_model, rows)
    assert result.success, result.summary()


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_timestamps_may_be_tz_aware(read_model: str) -> None:
    rows = [
        {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) else v for k, v in r.items()}
        for r in good_rows(read_model)
    ]
    assert validate(read_model, rows).success


def test_a_small_clock_skew_is_tolerated_a_large_one_is_not() -> None:
    rows = good_rows("conversation_timeline")
    rows[-1]["created_at"] = (NOW + timedelta(minutes=1)).replace(tzinfo=None)
    assert validate("conversation_timeline", rows).success
    result = validate("conversation_timeline", rows, clock_skew=timedelta(seconds=30))
    assert not result.success
    assert [f.name for f in result.failures] == ["expect_column_values_to_be_between(created_at)"]


@pytest.mark.slow  # three validations
def test_parameters_follow_the_write_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = good_rows("sessions_by_id")
    rows[0]["title"] = "t" * (POLICY.max_title_chars + 1)
    assert not validate("sessions_by_id", rows).success
    monkeypatch.setenv("CQRS_DUAL_WRITE_MAX_TITLE_CHARS", str(POLICY.max_title_chars + 1))
    assert validate("sessions_by_id", rows).success
    # explicit parameters win over the defaults
    assert not validate("sessions_by_id", rows, parameters={"max_title_chars": 10}).success


# --------------------------------------------------------------------------------------------
# Violations: each breaks one invariant; the named expectation must be among the failures.


Mutation = Callable[[list[Row]], None]


def set_(i: int, **values: Any) -> Mutation:
    def apply(rows: list[Row]) -> None:
        rows[i].update(values)

    return apply


def dup(i: int, **values: Any) -> Mutation:
    def apply(rows: list[Row]) -> None:
        rows.append(copy.copy(rows[i]) | values)

    return apply


FUTURE = (NOW + timedelta(hours=1)).replace(tzinfo=None)
NN = "expect_column_values_to_not_be_null"
LEN = "expect_column_value_lengths_to_be_between"
BETWEEN = "expect_column_values_to_be_between"
OTHER = T1.replace(tzinfo=None) - timedelta(days=1)


def _header_violations(rm: str, first: str) -> list[tuple[str, str, Mutation]]:
    # Row 0 has turns in recent_conversations' good rows' second row; use the right index.
    with_turns = 1 if rm == "recent_conversations" else 0
    no_turns = 1 - with_turns
    return [
        (rm, f"{NN}(title)", set_(0, title=None)),
        (rm, f"{LEN}(title)", set_(0, title="t" * (POLICY.max_title_chars + 1))),
        (rm, f"{NN}(last_message)", set_(with_turns, last_message=None)),
        (rm, f"{LEN}(last_message)", set_(with_turns, last_message="m" * 501)),
        (rm, f"{NN}(turn_count)", set_(with_turns, turn_count=None)),
        (rm, f"{BETWEEN}(turn_count)", set_(with_turns, turn_count=-1)),
        (
            rm,
            "expect_column_values_to_be_null(last_message_at where turn_count == 0)",
            set_(no_turns, last_message_at=T3.replace(tzinfo=None)),
        ),
        (
            rm,
            "expect_column_value_lengths_to_equal(last_message where turn_count == 0)",
            set_(no_turns, last_message="hello"),
        ),
        (rm, f"{NN}(last_message_at where turn_count > 0)", set_(with_turns, last_message_at=None)),
        (rm, f"{BETWEEN}(created_at)", set_(0, created_at=FUTURE)),
        (rm, f"{BETWEEN}(last_message_at)", set_(with_turns, last_message_at=FUTURE)),
        (rm, f"{NN}({first})", set_(0, **{first: None})),
        (rm, f"{NN}(created_at)", set_(0, created_at=None)),
    ]


VIOLATIONS: list[tuple[str, str, Mutation]] = [
    # recent_conversations
    *_header_violations("recent_conversations", "user_id"),
    ("recent_conversations", f"{NN}(session_id)", set_(0, session_id=None)),
    (
        "recent_conversations",
        "expect_compound_columns_to_be_unique(user_id, created_at, session_id)",
        dup(0),
    ),
    (
        "recent_conversations",
        "expect_column_values_to_be_unique(session_id)",
        dup(1, created_at=OTHER),
    ),  # a moved session left a copy behind
    # sessions_by_id
    *_header_violations("sessions_by_id", "session_id"),
    ("sessions_by_id", "expect_column_values_to_be_unique(session_id)", dup(0)),
    ("sessions_by_id", f"{NN}(user_id)", set_(1, user_id=None)),
    # conversation_timeline
    ("conversation_timeline", f"{NN}(session_id)", set_(0, session_id=None)),
    ("conversation_timeline", f"{NN}(created_at)", set_(1, created_at=None)),
    ("conversation_timeline", f"{NN}(turn_id)", set_(2, turn_id=None)),
    (
        "conversation_timeline",
        "expect_compound_columns_to_be_unique(session_id, created_at, turn_id)",
        dup(1),
    ),
    (
        "conversation_timeline",
        "expect_column_values_to_be_unique(turn_id)",
        dup(0, created_at=OTHER),
    ),
    ("conversation_timeline", f"{NN}(role)", set_(0, role=None)),
    ("conversation_timeline", "expect_column_values_to_be_in_set(role)", set_(1, role="robot")),
    ("conversation_timeline", f"{NN}(content)", set_(1, content=None)),
    ("conversation_timeline", f"{LEN}(content where role == 'human')", set_(0, content="")),
    (
        "conversation_timeline",
        "expect_column_values_to_be_null(model where role == 'human')",
        set_(2, model="gpt-x"),
    ),
    ("conversation_timeline", f"{NN}(model where role == 'agent')", set_(1, model=None)),
    ("conversation_timeline", f"{LEN}(model)", set_(1, model="m" * (POLICY.max_model_chars + 1))),
    ("conversation_timeline", f"{BETWEEN}(created_at)", set_(2, created_at=FUTURE)),
    # steps_by_turn
    ("steps_by_turn", f"{NN}(agent_turn_id)", set_(0, agent_turn_id=None)),
    ("steps_by_turn", f"{NN}(created_at)", set_(0, created_at=None)),
    ("steps_by_turn", f"{NN}(step_id)", set_(1, step_id=None)),
    (
        "steps_by_turn",
        "expect_compound_columns_to_be_unique(agent_turn_id, created_at, step_id)",
        dup(0),
    ),
    ("steps_by_turn", "expect_column_values_to_be_unique(step_id)", dup(0, created_at=OTHER)),
    ("steps_by_turn", f"{NN}(session_id)", set_(1, session_id=None)),
    ("steps_by_turn", f"{NN}(kind)", set_(0, kind=None)),
    ("steps_by_turn", f"{LEN}(kind)", set_(0, kind="")),
    ("steps_by_turn", f"{LEN}(kind)", set_(0, kind="k" * (POLICY.max_kind_chars + 1))),
    ("steps_by_turn", "expect_column_values_to_match_regex(kind)", set_(1, kind=" \t")),
    ("steps_by_turn", f"{NN}(payload)", set_(0, payload=None)),
    (
        "steps_by_turn",
        "expect_column_values_to_be_json_parseable(payload)",
        set_(1, payload='{"tool": "search",'),
    ),
    ("steps_by_turn", f"{BETWEEN}(created_at)", set_(1, created_at=FUTURE)),
]


# One GX validation per case (about half a second each, dozens of cases): the matrix is slow.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("read_model", "expectation", "mutate"),
    VIOLATIONS,
    ids=[f"{rm}-{name}" for rm, name, _ in VIOLATIONS],
)
def test_a_violation_fails_naming_the_expectation(
    read_model: str, expectation: str, mutate: Mutation
) -> None:
    rows = copy.deepcopy(good_rows(read_model))
    mutate(rows)
    result = validate(read_model, rows)
    assert not result.success
    names = [f.name for f in result.failures]
    assert expectation in names, names
    failure = next(f for f in result.failures if f.name == expectation)
    assert failure.error is None, failure.error
    assert failure.unexpected_count is not None and failure.unexpected_count >= 1
    assert expectation in result.summary()


def test_every_expectation_is_exercised() -> None:
    covered = {(rm, name) for rm, name, _ in VIOLATIONS}
    declared = {(rm, name) for rm in READ_MODELS for name in suites.expectation_names(rm)}
    assert declared - covered == set(), "expectations no test shows failing"
    assert covered - declared == set(), "tests naming expectations no suite has"


def test_failure_details_count_and_show_the_offending_values() -> None:
    rows = good_rows("conversation_timeline")
    rows += [
        {
            "session_id": S1,
            "created_at": T3.replace(tzinfo=None),
            "turn_id": uid(100 + i),
            "role": "robot",
            "content": "beep",
            "model": None,
        }
        for i in range(8)
    ]
    result = validate("conversation_timeline", rows)
    f = result.failure("expect_column_values_to_be_in_set", "role")
    assert f is not None
    assert f.unexpected_count == 8
    assert f.element_count == 11
    assert f.unexpected_values == ("robot",) * quality.MAX_UNEXPECTED_VALUES
    assert f.kwargs["value_set"] == ["human", "agent"]
    assert f.invariant and "role" in f.invariant
    # robot rows are in neither row-conditioned model check; only role flags them
    assert result.failed == ("expect_column_values_to_be_in_set",)


def test_a_missing_column_is_a_failure_with_an_error() -> None:
    rows = [{k: v for k, v in r.items() if k != "payload"} for r in good_rows("steps_by_turn")]
    result = validate("steps_by_turn", rows)
    assert not result.success
    f = result.failure("expect_column_values_to_be_json_parseable", "payload")
    assert f is not None and f.error is not None and "payload" in f.error


def test_unknown_read_model_and_bad_input_are_refused() -> None:
    with pytest.raises(InvalidInput):
        suites.load_suite("users")
    with pytest.raises(InvalidInput):
        quality.validate_frame("users", pd.DataFrame())
    with pytest.raises(InvalidInput):
        quality.validate_frame("sessions_by_id", [{"session_id": S1}])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        suites.default_parameters(datetime(2026, 1, 1))
