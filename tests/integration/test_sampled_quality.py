"""The audit's sampled quality pass (tasks/audit/sampled_quality.py) on the real stack: a real
conversation, written to Postgres and carried by CDC, passes every suite and every cross-model
check; a bad row written straight into a read model fails its suite; read models that disagree
with each other are reported by the cross-model checks with their keys; Data Docs are written.
Fresh ids only (the stack is shared): rows written straight into Cassandra are removed after."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session

from tasks.adapters import postgres
from tasks.audit.cross_model import (
    HEADER_TURN_COUNT,
    RECENT_TURN_COUNT,
    STEP_TURN_IN_TIMELINE,
)
from tasks.audit.sampled_quality import (
    cross_model_failures,
    recheck_keys,
    validate_samples,
)
from tasks.core.catalog import KEY_COLUMNS, READ_MODELS
from tasks.settings import get_settings
from tests.integration.readmodels import agree, wait_for

KS = get_settings().scylla.keyspace


@pytest.fixture(scope="module")
def conversation(cdc_consumer: Any, cql: Session) -> dict[str, uuid.UUID]:
    """A small conversation written through the app role, once it is in every read model."""
    ids = {k: uuid.uuid4() for k in ("user", "session", "h1", "a1", "st1", "st2")}
    with postgres.connect("app", get_settings().postgres) as pg:
        pg.execute(
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'Sampled trip')",
            (ids["session"], ids["user"]),
        )
        pg.execute(
            "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, 'Where to?')",
            (ids["h1"], ids["session"]),
        )
        pg.execute(
            "INSERT INTO agent_turns (id, session_id, content, model) "
            "VALUES (%s, %s, 'Lisbon.', 'test-model-1')",
            (ids["a1"], ids["session"]),
        )
        pg.execute(
            "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) VALUES "
            "(%s, %s, %s, 'tool_call', '{\"q\": 1}'), (%s, %s, %s, 'answer', '{}')",
            (ids["st1"], ids["a1"], ids["session"], ids["st2"], ids["a1"], ids["session"]),
        )
        pg.commit()
    assert wait_for(lambda: agree(cql, [ids["user"]], [ids["session"]]), timeout=90), (
        "the conversation did not reach Cassandra"
    )
    return ids


def samples_of(ids: dict[str, uuid.UUID]) -> dict[str, list[uuid.UUID]]:
    return {
        "recent_conversations": [ids["user"]],
        "conversation_timeline": [ids["session"]],
        "sessions_by_id": [ids["session"]],
        "steps_by_turn": [ids["a1"]],
    }


# --------------------------------------------------------------------------------------------
# Rows written straight into Cassandra, removed after the test


@pytest.fixture()
def write(cql: Session) -> Iterator[Callable[[str, dict[str, Any]], None]]:
    written: list[tuple[str, Any]] = []

    def insert(table: str, row: dict[str, Any]) -> None:
        meta = cql.cluster.metadata.keyspaces[KS].tables[table]
        full = dict(row)
        for col in meta.clustering_key:  # created_at_micros, or a clustering column added later
            full.setdefault(col.name, 0 if col.cql_type == "int" else None)
        written.append((table, full[KEY_COLUMNS[table][0]]))
        cols = list(full)
        marks = ", ".join(["%s"] * len(cols))
        cql.execute(
            f"INSERT INTO {KS}.{table} ({', '.join(cols)}) VALUES ({marks})",
            [full[c] for c in cols],
        )

    yield insert
    for table, partition in written:
        cql.execute(f"DELETE FROM {KS}.{table} WHERE {KEY_COLUMNS[table][0]} = %s", (partition,))


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)


def turn(session_id: uuid.UUID, turn_id: uuid.UUID, role: str, at: datetime) -> dict[str, Any]:
    model = "m" if role == "agent" else None
    return {
        "session_id": session_id,
        "created_at": at,
        "turn_id": turn_id,
        "role": role,
        "content": "hi",
        "model": model,
    }


def step(turn_id: uuid.UUID, session_id: uuid.UUID, at: datetime) -> dict[str, Any]:
    return {
        "agent_turn_id": turn_id,
        "created_at": at,
        "step_id": uuid.uuid4(),
        "session_id": session_id,
        "kind": "answer",
        "payload": "{}",
    }


def header(user: uuid.UUID, session_id: uuid.UUID, at: datetime, turns: int) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "user_id": user,
        "title": "t",
        "created_at": at,
        "last_message": "hi",
        "last_message_at": at,
        "turn_count": turns,
    }


# --------------------------------------------------------------------------------------------
# Tests


def test_a_real_conversation_passes_and_gets_data_docs(
    conversation: dict[str, uuid.UUID], cql: Session, tmp_path: Path
) -> None:
    docs = tmp_path / "data_docs"
    result = validate_samples(
        cql, KS, samples_of(conversation), max_rows=100, data_docs_dir=docs, run_name="it clean"
    )
    assert result.cross_model == ()
    assert set(result.results) == set(READ_MODELS)
    for quality in result.results.values():
        assert quality.success, quality.summary()
    assert result.success
    assert result.rows_validated == {
        "recent_conversations": 1,
        "conversation_timeline": 2,
        "sessions_by_id": 1,
        "steps_by_turn": 2,
    }
    assert result.cross_model_keys == {"session_id": 1, "agent_turn_id": 1}
    assert result.data_docs_error is None
    assert result.data_docs_index == docs / "index.html"
    index = result.data_docs_index.read_text(encoding="utf-8")
    for read_model in READ_MODELS:
        # the suite and its validation are listed, and their pages written
        assert f"expectations/{read_model}.html" in index
        assert f"validations/{read_model}/it_clean/" in index
        assert (docs / "expectations" / f"{read_model}.html").is_file()
        pages = list((docs / "validations" / read_model / "it_clean").rglob("*.html"))
        assert len(pages) == 1, pages
    assert "'_validation_success_text': 'Failed'" not in index
    assert result.seconds is not None and result.seconds["data_docs"] > 0


def test_a_bad_row_fails_its_suite_and_shows_in_the_data_docs(
    conversation: dict[str, uuid.UUID], cql: Session, write: Any, tmp_path: Path
) -> None:
    robot = uuid.uuid4()
    write("conversation_timeline", turn(robot, uuid.uuid4(), "robot", _now()))
    samples = samples_of(conversation) | {"conversation_timeline": [conversation["session"], robot]}
    result = validate_samples(
        cql, KS, samples, max_rows=100, data_docs_dir=tmp_path, run_name="it-bad"
    )
    timeline = result.results["conversation_timeline"]
    assert [f.name for f in timeline.failures] == ["expect_column_values_to_be_in_set(role)"]
    assert timeline.failures[0].unexpected_values == ("robot",)
    assert result.rows_validated["conversation_timeline"] == 3
    assert all(result.results[m].success for m in READ_MODELS if m != "conversation_timeline")
    assert not result.success
    # The robot's timeline has no header: the cross-model check says so too.
    assert [(f.check, f.key) for f in result.cross_model] == [
        (HEADER_TURN_COUNT, {"session_id": str(robot)})
    ]
    assert "conversation_timeline has 1 rows" in result.cross_model[0].detail
    # The failed validation's page shows the offending value.
    assert result.data_docs_index is not None
    (page,) = (tmp_path / "validations" / "conversation_timeline").rglob("*.html")
    assert "robot" in page.read_text(encoding="utf-8")


def test_read_models_that_disagree_are_reported_with_their_keys(
    cql: Session, write: Any, tmp_path: Path
) -> None:
    user, s, h, a, orphan = (uuid.uuid4() for _ in range(5))
    at = _now()
    write("sessions_by_id", header(user, s, at, turns=3))  # the timeline has 2 rows
    write("recent_conversations", header(user, s, at, turns=1) | {"user_id": user})
    write("conversation_timeline", turn(s, h, "human", at))
    write("conversation_timeline", turn(s, a, "agent", at + timedelta(seconds=1)))
    write("steps_by_turn", step(a, s, at + timedelta(seconds=2)))  # fine
    write("steps_by_turn", step(orphan, s, at + timedelta(seconds=3)))  # turn not in timeline
    write("steps_by_turn", step(h, s, at + timedelta(seconds=4)))  # a human turn

    failures = cross_model_failures(cql, KS, [s], [a, orphan, h])
    found = {(f.check, tuple(sorted(f.key.items()))): f.detail for f in failures}
    assert set(found) == {
        (HEADER_TURN_COUNT, (("session_id", str(s)),)),
        (RECENT_TURN_COUNT, (("session_id", str(s)), ("user_id", str(user)))),
        (STEP_TURN_IN_TIMELINE, (("agent_turn_id", str(orphan)), ("session_id", str(s)))),
        (STEP_TURN_IN_TIMELINE, (("agent_turn_id", str(h)), ("session_id", str(s)))),
    }, failures
    details = list(found.values())
    assert "sessions_by_id.turn_count = 3, conversation_timeline has 2 rows" in details
    assert "recent_conversations.turn_count = 1, conversation_timeline has 2 rows" in details
    assert any(re.search(r"no row with that turn_id", d) for d in details)
    assert any("role 'human'" in d for d in details)

    # The audit re-checks the failing keys once; what was repaired meanwhile is gone.
    write("sessions_by_id", header(user, s, at, turns=2))
    write("steps_by_turn", step(orphan, uuid.uuid4(), at + timedelta(seconds=5)))
    sessions, turns = recheck_keys(failures)
    assert sessions == [s] and set(turns) == {orphan, h}
    again = cross_model_failures(cql, KS, sessions, turns)
    checks = sorted((f.check, f.key.get("agent_turn_id", "")) for f in again)
    # orphan's steps now also name a second session, whose timeline lacks the turn as well
    assert checks == sorted(
        [
            (RECENT_TURN_COUNT, ""),
            (STEP_TURN_IN_TIMELINE, str(orphan)),
            (STEP_TURN_IN_TIMELINE, str(orphan)),
            (STEP_TURN_IN_TIMELINE, str(h)),
        ]
    ), again

    # The same disagreements, found from a sample.
    result = validate_samples(
        cql,
        KS,
        {"sessions_by_id": [s], "steps_by_turn": [a, orphan, h]},
        max_rows=100,
        data_docs_dir=tmp_path,
    )
    assert {f.check for f in result.cross_model} == {RECENT_TURN_COUNT, STEP_TURN_IN_TIMELINE}
    assert result.cross_model_keys == {"session_id": 1, "agent_turn_id": 3}
    assert result.results["sessions_by_id"].success, result.results["sessions_by_id"].summary()


def test_at_most_max_rows_are_read_per_read_model(cql: Session, write: Any, tmp_path: Path) -> None:
    # 40 partitions of 3 steps (more partitions than are read at once), and one big partition.
    turns = [uuid.uuid4() for _ in range(40)]
    s, at = uuid.uuid4(), _now()
    for t in turns:
        for i in range(3):
            write("steps_by_turn", step(t, s, at + timedelta(milliseconds=i)))
    big = uuid.uuid4()
    for i in range(30):
        write("conversation_timeline", turn(big, uuid.uuid4(), "human", at + timedelta(seconds=i)))
    samples = {"steps_by_turn": turns, "conversation_timeline": [big]}
    result = validate_samples(cql, KS, samples, max_rows=25, data_docs_dir=tmp_path / "a")
    assert result.rows_validated == {"steps_by_turn": 25, "conversation_timeline": 25}
    assert all(r.success for r in result.results.values())
    whole = validate_samples(cql, KS, samples, max_rows=1000, data_docs_dir=tmp_path / "b")
    assert whole.rows_validated == {"steps_by_turn": 120, "conversation_timeline": 30}
    # max_rows 0 (CQRS_AUDIT_QUALITY_SAMPLE_ROWS=0): nothing validated, no Data Docs
    none = validate_samples(cql, KS, samples, max_rows=0, data_docs_dir=tmp_path / "c")
    assert none.results == {} and none.rows_validated == {} and none.data_docs_index is None
    assert not (tmp_path / "c").exists()
