"""The read-model expectation suites on the real stack: a conversation written to Postgres
reaches Cassandra through CDC and its rows meet every suite; rows written straight into a read
model that break an invariant are caught. Fresh ids only (the stack is shared); the bad rows
are removed afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra.cluster import Session

from tasks.adapters import postgres
from tasks.audit.quality import validate_frame
from tasks.audit.rows import read_model_frame
from tasks.core.catalog import KEY_COLUMNS, READ_MODELS
from tasks.settings import get_settings
from tests.integration.readmodels import agree, wait_for

LONG_ANSWER = "Lisbon, then Porto. " * 40  # 800 characters: the preview keeps 500


@pytest.fixture(scope="module")
def conversation(cdc_consumer: Any, cql: Session) -> dict[str, uuid.UUID]:
    """A small conversation written through the app role, once it is in every read model."""
    ids = {k: uuid.uuid4() for k in ("user", "session", "h1", "a1", "st1", "st2")}
    with postgres.connect("app", get_settings().postgres) as pg:
        pg.execute(
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'Quality trip')",
            (ids["session"], ids["user"]),
        )
        pg.execute(
            "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
            (ids["h1"], ids["session"], "Where should I go in May?"),
        )
        pg.commit()
        pg.execute(
            "INSERT INTO agent_turns (id, session_id, content, model) "
            "VALUES (%s, %s, %s, 'test-model-1')",
            (ids["a1"], ids["session"], LONG_ANSWER),
        )
        pg.execute(
            "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) VALUES "
            "(%s, %s, %s, 'tool_call', %s), (%s, %s, %s, 'answer', '{}')",
            (
                ids["st1"],
                ids["a1"],
                ids["session"],
                '{"tool": "search", "q": "may"}',
                ids["st2"],
                ids["a1"],
                ids["session"],
            ),
        )
        pg.commit()

    # Every read model equal to the SQL oracle (schemas/postgres/0008).
    assert wait_for(lambda: agree(cql, [ids["user"]], [ids["session"]]), timeout=90), (
        "the conversation did not reach Cassandra"
    )
    return ids


def partitions(ids: dict[str, uuid.UUID], read_model: str) -> list[uuid.UUID]:
    return {
        "recent_conversations": [ids["user"]],
        "conversation_timeline": [ids["session"]],
        "sessions_by_id": [ids["session"]],
        "steps_by_turn": [ids["a1"]],
    }[read_model]


EXPECTED_ROWS = {
    "recent_conversations": 1,
    "conversation_timeline": 2,
    "sessions_by_id": 1,
    "steps_by_turn": 2,
}


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_a_real_conversation_meets_every_suite(
    conversation: dict[str, uuid.UUID], cql: Session, read_model: str
) -> None:
    frame = read_model_frame(cql, read_model, partitions(conversation, read_model), limit=100)
    assert len(frame) == EXPECTED_ROWS[read_model]
    assert set(KEY_COLUMNS[read_model]) <= set(frame.columns)
    result = validate_frame(read_model, frame)
    assert result.success, result.summary()
    assert result.row_count == EXPECTED_ROWS[read_model]


def test_frames_hold_what_the_pipeline_wrote(
    conversation: dict[str, uuid.UUID], cql: Session
) -> None:
    header = read_model_frame(cql, "sessions_by_id", [conversation["session"]])
    assert header.loc[0, "user_id"] == conversation["user"]
    assert header.loc[0, "last_message"] == LONG_ANSWER[:500]  # the trigger's cap, end to end
    assert header.loc[0, "turn_count"] == 2
    assert str(header["created_at"].dt.tz) == "UTC"
    timeline = read_model_frame(cql, "conversation_timeline", [conversation["session"]])
    assert list(timeline["role"]) == ["human", "agent"]  # clustering order
    assert timeline["model"].isna().tolist() == [True, False]
    # limit caps the frame; an unknown partition gives an empty frame that still validates
    assert (
        len(read_model_frame(cql, "conversation_timeline", [conversation["session"]], limit=1)) == 1
    )
    empty = read_model_frame(cql, "steps_by_turn", [uuid.uuid4()])
    assert empty.empty and set(KEY_COLUMNS["steps_by_turn"]) <= set(empty.columns)
    assert validate_frame("steps_by_turn", empty).success


# --------------------------------------------------------------------------------------------
# Bad rows written straight into a read model, each in a fresh partition


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# Each bad row breaks invariants the named expectations stand for; the partition key is filled
# in with a fresh uuid.
BAD_ROWS: dict[str, tuple[Callable[[], dict[str, Any]], list[str]]] = {
    "conversation_timeline": (
        lambda: {
            "created_at": _now(),
            "turn_id": uuid.uuid4(),
            "role": "robot",
            "content": "beep",
            "model": None,
        },
        ["expect_column_values_to_be_in_set(role)"],
    ),
    "sessions_by_id": (
        lambda: {
            "user_id": uuid.uuid4(),
            "title": "t",
            "created_at": _now(),
            "last_message": "x" * 600,
            "last_message_at": _now(),
            "turn_count": -1,
        },
        [
            "expect_column_values_to_be_between(turn_count)",
            "expect_column_value_lengths_to_be_between(last_message)",
        ],
    ),
    "steps_by_turn": (
        lambda: {
            "created_at": _now(),
            "step_id": uuid.uuid4(),
            "session_id": uuid.uuid4(),
            "kind": "",
            "payload": '{"tool": ',
        },
        [
            "expect_column_value_lengths_to_be_between(kind)",
            "expect_column_values_to_be_json_parseable(payload)",
        ],
    ),
    "recent_conversations": (
        lambda: {
            "created_at": _now() + timedelta(days=1),
            "session_id": uuid.uuid4(),
            "title": "t",
            "last_message": "",
            "last_message_at": _now(),
            "turn_count": 0,
        },
        [
            "expect_column_values_to_be_null(last_message_at where turn_count == 0)",
            "expect_column_values_to_be_between(created_at)",
        ],
    ),
}
_FILL: dict[str, Callable[[], Any]] = {"int": lambda: 0, "uuid": uuid.uuid4, "timestamp": _now}


def insert_row(cql: Session, table: str, values: dict[str, Any]) -> None:
    """INSERT the values, filling primary-key columns they do not name (a clustering column
    added to the schema later) with a default of the column's type."""
    meta = cql.cluster.metadata.keyspaces[cql.keyspace].tables[table]
    row = dict(values)
    for col in (*meta.partition_key, *meta.clustering_key):
        if col.name not in row:
            row[col.name] = _FILL[col.cql_type]()
    cols = list(row)
    cql.execute(
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
        [row[c] for c in cols],
    )


@pytest.fixture()
def bad_partition(cql: Session) -> Iterator[Callable[[str], uuid.UUID]]:
    written: list[tuple[str, uuid.UUID]] = []

    def write(read_model: str) -> uuid.UUID:
        partition = uuid.uuid4()
        written.append((read_model, partition))
        insert_row(
            cql, read_model, {KEY_COLUMNS[read_model][0]: partition} | BAD_ROWS[read_model][0]()
        )
        return partition

    yield write
    for read_model, partition in written:
        cql.execute(
            f"DELETE FROM {read_model} WHERE {KEY_COLUMNS[read_model][0]} = %s", (partition,)
        )


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_a_bad_row_in_a_read_model_is_caught(
    cql: Session, bad_partition: Any, read_model: str
) -> None:
    partition = bad_partition(read_model)
    frame = read_model_frame(cql, read_model, [partition])
    assert len(frame) == 1
    result = validate_frame(read_model, frame)
    assert not result.success
    names = {f.name for f in result.failures}
    expected = BAD_ROWS[read_model][1]
    assert set(expected) <= names, result.summary()
    assert all(
        f.unexpected_count == 1 and f.error is None for f in result.failures if f.name in expected
    ), result.summary()


def test_a_bad_row_among_good_ones_is_the_only_one_flagged(
    conversation: dict[str, uuid.UUID], cql: Session, bad_partition: Any
) -> None:
    robot = bad_partition("conversation_timeline")
    frame = read_model_frame(cql, "conversation_timeline", [conversation["session"], robot])
    assert len(frame) == 3
    result = validate_frame("conversation_timeline", frame)
    assert [f.name for f in result.failures] == ["expect_column_values_to_be_in_set(role)"]
    failure = result.failures[0]
    assert failure.unexpected_count == 1 and failure.element_count == 3
    assert failure.unexpected_values == ("robot",)
