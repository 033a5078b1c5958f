"""The catalog agrees with itself and drives the statements; tests/integration/test_catalog.py
checks it against the real schemas."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.core import catalog
from tasks.core.codec import INT, JSONB, SUB_MILLIS, TEXT, TIMESTAMPTZ, UUID, cell_of
from tasks.core.cql import delete_text, insert_text, is_cql_identifier


def test_derived_names_follow_the_declarations() -> None:
    assert catalog.SOURCE_TABLES == ("sessions", "human_turns", "agent_turns", "steps")
    assert catalog.READ_MODELS == (
        "recent_conversations",
        "conversation_timeline",
        "sessions_by_id",
        "steps_by_turn",
    )
    assert catalog.KEY_COLUMNS["steps_by_turn"] == (
        "agent_turn_id",
        "created_at",
        "created_at_micros",
        "step_id",
    )
    assert catalog.COLUMNS["steps"]["payload"] == "jsonb"
    assert catalog.read_models_of("sessions") == ("recent_conversations", "sessions_by_id")


def test_the_column_types_pick_the_conversion() -> None:
    assert cell_of(TIMESTAMPTZ, "timestamp") is TIMESTAMPTZ
    assert cell_of(TIMESTAMPTZ, "int") is SUB_MILLIS
    assert cell_of(JSONB, "text") is JSONB
    assert [cell_of(c, c.cql_type) for c in (UUID, TEXT, INT)] == [UUID, TEXT, INT]
    with pytest.raises(ValueError, match="no conversion from text to CQL int"):
        cell_of(TEXT, "int")


def test_a_feed_that_does_not_fit_its_tables_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    (feed,) = catalog.FEEDS["steps"]
    wrong = dataclasses.replace(feed, values=(*feed.values, ("kind", "payload")))
    monkeypatch.setattr(catalog, "FEEDS", {**catalog.FEEDS, "steps": (wrong,)})
    catalog._check()  # jsonb into text: a conversion that exists
    key = tuple(
        ("created_at_micros", "kind") if d == "created_at_micros" else (d, s) for d, s in feed.key
    )
    monkeypatch.setattr(
        catalog, "FEEDS", {**catalog.FEEDS, "steps": (dataclasses.replace(feed, key=key),)}
    )
    with pytest.raises(ValueError, match="no conversion from text to CQL int"):
        catalog._check()
    short = dataclasses.replace(feed, key=feed.key[:-1])
    monkeypatch.setattr(catalog, "FEEDS", {**catalog.FEEDS, "steps": (short,)})
    with pytest.raises(ValueError, match="not the primary key"):
        catalog._check()


def test_statements_come_from_the_catalog() -> None:
    assert insert_text("ks", "sessions_by_id", ("session_id", "title")) == (
        "INSERT INTO ks.sessions_by_id (session_id, title) VALUES (?, ?) USING TIMESTAMP ?"
    )
    assert delete_text("ks", "recent_conversations") == (
        "DELETE FROM ks.recent_conversations USING TIMESTAMP ? "
        "WHERE user_id = ? AND created_at = ? AND session_id = ?"
    )


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("cqrs", True),
        ("a" * 48, True),
        ("a" * 49, False),
        ("1ks", False),
        ("k-s", False),
        ("ks\n", False),
        ("", False),
        (None, False),
    ],
)
def test_cql_identifiers(name: object, ok: bool) -> None:
    assert is_cql_identifier(name) is ok
