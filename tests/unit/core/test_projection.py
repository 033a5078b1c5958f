"""The projection, alone and through a model of Cassandra's last-write-wins."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.core.catalog import READ_MODELS, SOURCE_TABLES
from tasks.core.cql import to_cql
from tasks.core.errors import DecodeError, InvalidInput
from tasks.core.projection import (
    PLACEHOLDER_TEXT,
    UNAVAILABLE,
    Change,
    Delete,
    Mutation,
    Upsert,
    change_from_row,
    compact,
    expected_rows,
    normalize_row,
    project,
    project_row,
    tombstone_version,
    version_of,
)
from tests.unit.core.lww_model import LwwStore

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 11, 28, 7, 47, 42, 123456, tzinfo=UTC)
T0_MS = T0.replace(microsecond=123000)


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def us(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1)


def at(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def session(**kw: Any) -> dict[str, Any]:
    row = {
        "id": uid(1),
        "user_id": uid(10),
        "title": "Trip",
        "created_at": T0,
        "updated_at": T0 + timedelta(seconds=1),
        "last_message": "hello",
        "last_message_at": T0 + timedelta(microseconds=1500),
        "turn_count": 2,
    }
    return row | kw


def human(**kw: Any) -> dict[str, Any]:
    row = {
        "id": uid(2),
        "session_id": uid(1),
        "content": "hello",
        "created_at": T0,
        "updated_at": T0 + timedelta(seconds=1),
    }
    return row | kw


def agent(**kw: Any) -> dict[str, Any]:
    return human(id=uid(3), content="hi!", model="m-1") | kw


def step(**kw: Any) -> dict[str, Any]:
    row = {
        "id": uid(4),
        "agent_turn_id": uid(3),
        "session_id": uid(1),
        "kind": "tool",
        "payload": {"b": [1, 2], "a": "é"},
        "created_at": T0,
        "updated_at": T0 + timedelta(seconds=1),
    }
    return row | kw


ROWS = {"sessions": session, "human_turns": human, "agent_turns": agent, "steps": step}


def debezium(row: dict[str, Any], indent: int | None = None) -> dict[str, Any]:
    """A row as Debezium's JsonConverter sends it, plus a column the projection doesn't know."""
    out: dict[str, Any] = {"added_later": 1}
    for col, v in row.items():
        if isinstance(v, uuid.UUID):
            v = str(v)
        elif isinstance(v, datetime):
            v = v.isoformat().replace("+00:00", "Z")
        elif col == "payload":
            v = json.dumps(v, indent=indent)
        out[col] = v
    return out


# --- mapping of each table -------------------------------------------------------------------


def test_session_feeds_both_session_read_models() -> None:
    row = session()
    v = us(row["updated_at"])
    assert project(Change("sessions", "c", None, row, v)) == [
        Upsert(
            "recent_conversations",
            (("user_id", uid(10)), ("created_at", T0_MS), ("session_id", uid(1))),
            (
                ("title", "Trip"),
                ("last_message", "hello"),
                ("last_message_at", T0.replace(microsecond=124000)),
                ("turn_count", 2),
            ),
            v,
        ),
        Upsert(
            "sessions_by_id",
            (("session_id", uid(1)),),
            (
                ("user_id", uid(10)),
                ("title", "Trip"),
                ("created_at", T0_MS),
                ("last_message", "hello"),
                ("last_message_at", T0.replace(microsecond=124000)),
                ("turn_count", 2),
            ),
            v,
        ),
    ]


def test_turns_merge_into_timeline_and_human_turns_write_no_model() -> None:
    key = (
        ("session_id", uid(1)),
        ("created_at", T0_MS),
        ("created_at_micros", T0.microsecond % 1000),
    )
    (h,) = project_row("human_turns", human())
    (a,) = project_row("agent_turns", agent())
    assert h == Upsert(
        "conversation_timeline",
        (*key, ("turn_id", uid(2))),
        (("role", "human"), ("content", "hello")),
        us(human()["updated_at"]),
    )
    assert a.key == (*key, ("turn_id", uid(3)))
    assert a.values == (("role", "agent"), ("content", "hi!"), ("model", "m-1"))


def test_step_payload_is_the_same_canonical_text_from_every_path() -> None:
    from_dict = project_row("steps", step())
    from_text = project(Change("steps", "c", None, debezium(step(), indent=2), 0))
    from_reordered = project_row("steps", step(payload='{"a": "\\u00e9",  "b": [1, 2]}'))
    assert from_dict == from_text == from_reordered
    (up,) = from_dict
    assert up.key == (
        ("agent_turn_id", uid(3)),
        ("created_at", T0_MS),
        ("created_at_micros", 456),
        ("step_id", uid(4)),
    )
    assert dict(up.values)["payload"] == '{"a":"é","b":[1,2]}'
    assert type(dict(up.values)["payload"]) is str


def test_timestamps_are_source_versions_and_cells_are_milliseconds() -> None:
    row = session(updated_at=T0 + timedelta(microseconds=7))
    for m in project_row("sessions", row):
        assert m.timestamp_us == us(T0) + 7
        for _, v in m.key + m.values:
            assert not isinstance(v, datetime) or (v.microsecond % 1000 == 0 and v.tzinfo is UTC)


def test_read_model_filter() -> None:
    assert [m.read_model for m in project_row("sessions", session(), ["sessions_by_id"])] == [
        "sessions_by_id"
    ]
    assert project_row("steps", step(), ("sessions_by_id",)) == []
    assert [m.read_model for m in project_row("sessions", session(), "recent_conversations")] == [
        "recent_conversations"
    ]
    with pytest.raises(InvalidInput, match="nope"):
        project_row("sessions", session(), ["nope"])


def test_change_from_row_is_a_snapshot_read() -> None:
    ch = change_from_row("steps", debezium(step()))
    assert ch.op == "r" and ch.before is None and ch.version_us == us(step()["updated_at"])
    assert project(ch) == project_row("steps", step())


# --- updates, key changes, deletes -----------------------------------------------------------


def test_key_change_deletes_the_old_read_model_row_at_the_update_version() -> None:
    old, new = session(), session(user_id=uid(11), updated_at=T0 + timedelta(seconds=2))
    v = us(new["updated_at"])
    out = project(Change("sessions", "u", old, new, v))
    old_key = (("user_id", uid(10)), ("created_at", T0_MS), ("session_id", uid(1)))
    assert out[0] == Delete("recent_conversations", old_key, v)
    assert [type(m).__name__ for m in out] == ["Delete", "Upsert", "Upsert"]  # by_id key kept
    moved = project(Change("human_turns", "u", human(), human(session_id=uid(9)), 0))
    assert moved[0] == Delete(
        "conversation_timeline",
        (
            ("session_id", uid(1)),
            ("created_at", T0_MS),
            ("created_at_micros", 456),
            ("turn_id", uid(2)),
        ),
        us(human()["updated_at"]),
    )


def test_created_at_change_inside_one_millisecond_moves_the_row() -> None:
    # created_at_micros is part of the key: the old and new keys differ, so the delete of the
    # old one cannot shadow the upsert of the new one.
    new = human(created_at=T0 + timedelta(microseconds=400), updated_at=T0 + timedelta(seconds=2))
    out = project(Change("human_turns", "u", human(), new, 0))
    assert [type(m) for m in out] == [Delete, Upsert]
    assert dict(out[0].key)["created_at_micros"] == 456
    assert dict(out[1].key)["created_at_micros"] == 856
    assert dict(out[0].key)["created_at"] == dict(out[1].key)["created_at"]


def test_delete_is_stamped_one_microsecond_above_the_deleted_version() -> None:
    # Not at the commit time: a re-insert of the key stamped before that commit (in the
    # deleting transaction, or racing it) must stay visible.
    commit = us(T0) + 5_000_000
    assert project(Change("agent_turns", "d", debezium(agent()), None, commit)) == [
        Delete(
            "conversation_timeline",
            (
                ("session_id", uid(1)),
                ("created_at", T0_MS),
                ("created_at_micros", 456),
                ("turn_id", uid(3)),
            ),
            us(agent()["updated_at"]) + 1,
        )
    ]
    assert tombstone_version(agent()) == us(agent()["updated_at"]) + 1
    with pytest.raises(DecodeError, match="updated_at"):
        project(
            Change(
                "agent_turns",
                "d",
                {k: v for k, v in agent().items() if k != "updated_at"},
                None,
                commit,
            )
        )


def test_reinsert_in_the_deleting_transaction_is_visible() -> None:
    v1 = agent()
    commit = us(v1["updated_at"]) + 800_000  # the delete held its locks for 0.8 s
    gone = project(Change("agent_turns", "d", debezium(v1), None, commit))
    again = agent(content="again", updated_at=v1["updated_at"] + timedelta(microseconds=2))
    for order in (
        (gone, project_row("agent_turns", again)),
        (project_row("agent_turns", again), gone),
    ):
        assert state(*order) == expected({"agent_turns": [again]})


def test_delete_without_the_needed_before_columns_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="before"):
        project(Change("sessions", "d", None, None, 1))
    with pytest.raises(DecodeError, match="created_at"):
        project(
            Change("sessions", "d", {"id": str(uid(1)), "user_id": None, "updated_at": T0}, None, 1)
        )
    with pytest.raises(DecodeError, match="updated_at"):
        project(Change("sessions", "d", {"id": uid(1)}, None, 1), ["sessions_by_id"])
    # sessions_by_id alone needs only the id (and the version).
    assert project(
        Change("sessions", "d", {"id": uid(1), "updated_at": T0}, None, 1), ["sessions_by_id"]
    ) == [Delete("sessions_by_id", (("session_id", uid(1)),), us(T0) + 1)]


def test_unknown_table_or_op_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="unknown source table"):
        project(Change("users", "c", None, {}, 1))
    with pytest.raises(DecodeError, match="unknown op"):
        project(Change("sessions", "x", None, session(), 1))  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="after"):
        project(Change("sessions", "u", session(), None, 1))


# --- TOAST placeholders ----------------------------------------------------------------------


def values_of(m: Mutation) -> dict[str, Any]:
    assert isinstance(m, Upsert)
    return dict(m.values)


def test_placeholder_is_filled_from_before() -> None:
    new = step(payload=PLACEHOLDER_TEXT, kind="done", updated_at=T0 + timedelta(seconds=3))
    (up,) = project(Change("steps", "u", debezium(step()), new, 0))
    assert values_of(up) == {"session_id": uid(1), "kind": "done", "payload": '{"a":"é","b":[1,2]}'}


def test_placeholder_without_before_value_is_not_written() -> None:
    new = session(title=UNAVAILABLE, last_message=PLACEHOLDER_TEXT)
    for before in (None, {"id": uid(1)}):
        up = project(Change("sessions", "u", before, new, 0))[-1]
        assert "title" not in values_of(up) and "last_message" not in values_of(up)
        text, params = to_cql(up, "ks")
        assert "title" not in text and len(params) == text.count("?")


def test_placeholder_in_a_key_column_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"human_turns\.created_at"):
        project(Change("human_turns", "u", human(), human(created_at=PLACEHOLDER_TEXT), 0))


def test_placeholder_text_in_a_postgres_row_is_content() -> None:
    # Only an update's after image can hold placeholders; elsewhere the text is what it says.
    (row,) = project_row("human_turns", human(content=PLACEHOLDER_TEXT))
    (cdc,) = project(Change("human_turns", "c", None, human(content=PLACEHOLDER_TEXT), 0))
    assert values_of(row)["content"] == values_of(cdc)["content"] == PLACEHOLDER_TEXT


# --- normalization ---------------------------------------------------------------------------


def test_normalize_debezium_and_native_values_agree() -> None:
    native = normalize_row("steps", step())
    assert normalize_row("steps", debezium(step())) == native
    assert "added_later" not in normalize_row("steps", debezium(step()))
    assert isinstance(native["id"], uuid.UUID) and native["created_at"] == T0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2026-11-28T07:47:42.123456Z", T0),
        ("2026-11-28T07:47:42.123456789Z", T0),
        ("2026-11-28T08:47:42.123456+01:00", T0),
        ("2026-11-28 07:17:42.123456-00:30", T0),
        ("2026-11-28T07:47:42.12Z", T0.replace(microsecond=120000)),
        ("2026-11-28T07:47:42Z", T0.replace(microsecond=0)),
    ],
)
def test_timestamp_text_forms(text: str, expected: datetime) -> None:
    assert normalize_row("human_turns", human(created_at=text))["created_at"] == expected


@pytest.mark.slow
def test_native_timestamp_forms() -> None:
    pd = pytest.importorskip("pandas")
    tz = timezone(timedelta(hours=2))
    assert normalize_row("human_turns", human(created_at=T0.astimezone(tz)))["created_at"] == T0
    ts = pd.Timestamp("2026-11-28T07:47:42.123456789Z")
    got = normalize_row("human_turns", human(created_at=ts))["created_at"]
    assert got == T0 and type(got) is datetime
    assert normalize_row("sessions", session(last_message_at=pd.NaT))["last_message_at"] is None
    assert normalize_row("human_turns", human(id=uid(2).bytes))["id"] == uid(2)


@pytest.mark.parametrize(
    "table,column,value,message",
    [
        ("sessions", "id", 5, "expected a uuid"),
        ("sessions", "user_id", "not-a-uuid", "hexadecimal"),
        ("sessions", "created_at", datetime(2026, 1, 1), "naive"),
        ("sessions", "created_at", "yesterday", "ISO-8601"),
        ("sessions", "created_at", 1764316062, "expected a timestamp"),
        ("sessions", "turn_count", "2", "expected an integer"),
        ("sessions", "turn_count", True, "expected an integer"),
        ("sessions", "turn_count", 2**31, "out of range"),
        ("sessions", "title", None, "NOT NULL"),
        ("agent_turns", "model", 7, "expected text"),
        ("steps", "payload", "{not json", "Expecting"),
        ("steps", "payload", {1, 2}, "expected JSON"),
    ],
)
def test_wrong_types_name_table_and_column(
    table: str, column: str, value: Any, message: str
) -> None:
    row = ROWS[table]() | {column: value}
    with pytest.raises(DecodeError, match=rf"{table}\.{column}: .*{message}"):
        normalize_row(table, row)


def test_missing_required_column_and_partial_images() -> None:
    row = session()
    del row["turn_count"]
    with pytest.raises(DecodeError, match=r"sessions\.turn_count: required column missing"):
        normalize_row("sessions", row)
    assert normalize_row("sessions", {"id": str(uid(1)), "title": None}, partial=True) == {
        "id": uid(1)
    }
    assert normalize_row("sessions", session(last_message_at=None))["last_message_at"] is None


def test_version_of() -> None:
    assert version_of(session()) == us(T0) + 1_000_000
    assert version_of({"updated_at": "1970-01-01T00:00:01.000002Z"}) == 1_000_002
    for bad in ({}, {"updated_at": None}, {"updated_at": PLACEHOLDER_TEXT}, {"updated_at": 3}):
        with pytest.raises(DecodeError, match="updated_at"):
            version_of(bad)


# --- CQL -------------------------------------------------------------------------------------


def test_to_cql_insert_and_delete() -> None:
    (up,) = project_row("agent_turns", agent())
    text, params = to_cql(up, "cqrs")
    assert text == (
        "INSERT INTO cqrs.conversation_timeline (session_id, created_at, "
        "created_at_micros, turn_id, role, content, model) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    )
    assert params == (
        uid(1),
        T0_MS,
        T0.microsecond % 1000,
        uid(3),
        "agent",
        "hi!",
        "m-1",
        up.timestamp_us,
    )
    (de,) = project(Change("agent_turns", "d", agent(), None, 99 * 10**15))
    assert to_cql(de, "cqrs") == (
        "DELETE FROM cqrs.conversation_timeline USING TIMESTAMP ? "
        "WHERE session_id = ? AND created_at = ? AND created_at_micros = ? AND turn_id = ?",
        (us(agent()["updated_at"]) + 1, uid(1), T0_MS, T0.microsecond % 1000, uid(3)),
    )
    # Same columns, same text: statements are prepared once.
    (other,) = project_row("agent_turns", agent(id=uid(77), content="x"))
    assert to_cql(other, "cqrs")[0] == text
    with pytest.raises(InvalidInput):
        to_cql(up, "cqrs; DROP TABLE x")
    with pytest.raises(InvalidInput):
        to_cql(Upsert("sessions_by_id", (("session_id", uid(1)),), (("evil", 1),), 1), "cqrs")
    # The texts are cached by shape; a refusal is not, so it is refused every time.
    bad_key = Upsert("sessions_by_id", (("user_id", uid(1)),), (), 1)
    for _ in range(2):
        with pytest.raises(InvalidInput, match="not the primary key"):
            to_cql(bad_key, "cqrs")
        with pytest.raises(InvalidInput, match="unknown read model"):
            to_cql(Upsert("nope", (("id", uid(1)),), (), 1), "cqrs")


# --- expected rows ---------------------------------------------------------------------------


def test_expected_rows() -> None:
    rows = {"human_turns": [human()], "agent_turns": [debezium(agent())], "sessions": [session()]}
    got = expected_rows(rows, "conversation_timeline")
    assert got == {
        (
            ("session_id", uid(1)),
            ("created_at", T0_MS),
            ("created_at_micros", 456),
            ("turn_id", uid(2)),
        ): {"role": "human", "content": "hello", "model": None},
        (
            ("session_id", uid(1)),
            ("created_at", T0_MS),
            ("created_at_micros", 456),
            ("turn_id", uid(3)),
        ): {"role": "agent", "content": "hi!", "model": "m-1"},
    }
    assert expected_rows({}, "steps_by_turn") == {}
    with pytest.raises(DecodeError):
        expected_rows({"steps": [step(payload=UNAVAILABLE)]}, "steps_by_turn")
    with pytest.raises(InvalidInput):
        expected_rows({"steps": [step(), step()]}, "steps_by_turn")
    with pytest.raises(InvalidInput):
        expected_rows({"users": []}, "steps_by_turn")


# --- through last-write-wins -----------------------------------------------------------------


def state(*groups: Sequence[Mutation]) -> dict[str, dict[Any, dict[str, Any]]]:
    """The visible read models after applying the groups of mutations in this order."""
    store = LwwStore()
    for group in groups:
        store.apply_all(group)
    return {rm: store.visible(rm) for rm in READ_MODELS}


def expected(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[Any, dict[str, Any]]]:
    return {rm: expected_rows(rows, rm) for rm in READ_MODELS}


def test_delete_then_late_older_update_stays_deleted() -> None:
    v1, v2 = session(), session(title="Renamed", updated_at=T0 + timedelta(seconds=2))
    delete = project(Change("sessions", "d", v2, None, us(T0) + 3_000_000))
    late = project(Change("sessions", "u", v1, v2, 0)) + project_row("sessions", v1)
    assert state(delete, late) == state(late, delete) == expected({})


def test_dual_write_then_cdc_is_a_no_op_and_older_backfill_loses() -> None:
    v1, v2 = agent(), agent(content="edited", updated_at=T0 + timedelta(seconds=2))
    dual = project_row("agent_turns", v2)
    cdc = project(Change("agent_turns", "u", debezium(v1), debezium(v2), 0))
    backfill = project_row("agent_turns", v1)
    assert state(dual) == state(dual, cdc) == state(cdc, backfill) == state(backfill, dual)
    assert state(dual) == expected({"agent_turns": [v2]})


def test_reinsert_after_delete_is_visible() -> None:
    v1 = step()
    gone = project(Change("steps", "d", v1, None, us(T0) + 2_000_000))
    again = project_row("steps", step(kind="retry", updated_at=T0 + timedelta(seconds=3)))
    assert state(again, gone, project_row("steps", v1)) == expected(
        {"steps": [step(kind="retry", updated_at=T0 + timedelta(seconds=3))]}
    )


# Small domains so that histories collide: ids reused, created_at within and across ms.
IDS = {t: [uid(0x100 * (i + 1) + n) for n in range(3)] for i, t in enumerate(SOURCE_TABLES)}
USERS = [uid(0x10), uid(0x11)]
CREATED = [T0 + timedelta(microseconds=d) for d in (0, 1, 999, 1000, 2500)]
TEXTS = ["", "a", "b", "é" * 3]
PAYLOADS: list[Any] = [{}, {"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}, [1, "x"], {"k": None}]
TOASTABLE = {
    "sessions": ("title", "last_message"),
    "human_turns": ("content",),
    "agent_turns": ("content",),
    "steps": ("payload",),
}
KEY_SOURCES = {
    "sessions": ("user_id", "created_at"),
    "human_turns": ("session_id", "created_at"),
    "agent_turns": ("session_id", "created_at"),
    "steps": ("agent_turn_id", "created_at"),
}


def draw_row(data: st.DataObject, table: str, id_: uuid.UUID, version: int) -> dict[str, Any]:
    def pick(values: list[Any]) -> Any:
        return data.draw(st.sampled_from(values))

    row: dict[str, Any] = {"id": id_, "created_at": pick(CREATED), "updated_at": at(version)}
    if table == "sessions":
        row |= {
            "user_id": pick(USERS),
            "title": pick(TEXTS),
            "last_message": pick(TEXTS),
            "last_message_at": pick([None, T0, T0 + timedelta(microseconds=1500)]),
            "turn_count": data.draw(st.integers(0, 3)),
        }
    elif table == "steps":
        row |= {
            "agent_turn_id": pick(IDS["agent_turns"][:2]),
            "session_id": pick(IDS["sessions"]),
            "kind": pick(TEXTS),
            "payload": pick(PAYLOADS),
        }
    else:
        row |= {"session_id": pick(IDS["sessions"][:2]), "content": pick(TEXTS[1:])}
        if table == "agent_turns":
            row["model"] = pick(TEXTS)
    return row


def ms_key(row: dict[str, Any], table: str) -> tuple[Any, ...]:
    """The source columns of a row's read-model key as the read model sees them: sessions'
    created_at to the millisecond (recent_conversations), turns' and steps' created_at to the
    microsecond (their read models add created_at_micros to the key)."""
    exact = table != "sessions"
    return tuple(
        v.replace(microsecond=v.microsecond // 1000) if isinstance(v, datetime) and not exact else v
        for v in (row[c] for c in KEY_SOURCES[table])
    )


@pytest.mark.slow
@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_any_order_with_duplicates_converges_to_the_source(data: st.DataObject) -> None:
    clock = us(T0) + 10**6
    current: dict[tuple[str, uuid.UUID], dict[str, Any]] = {}
    mutations: list[Mutation] = []

    def tick() -> int:
        nonlocal clock
        clock += data.draw(st.integers(1, 1500))  # versions strictly increase
        return clock

    def as_sent(row: dict[str, Any]) -> dict[str, Any]:
        return (
            debezium(row, data.draw(st.sampled_from([None, 1])))
            if data.draw(st.booleans())
            else dict(row)
        )

    # The version of each deleted key's last row: a re-insert of the key is stamped at least
    # 2 µs above it (migration 0007), and may well be stamped below the delete's commit time
    # (in the deleting transaction, or in one that raced it).
    graveyard: dict[tuple[str, uuid.UUID], int] = {}

    for _ in range(data.draw(st.integers(1, 30))):
        table = data.draw(st.sampled_from(SOURCE_TABLES))
        id_ = data.draw(st.sampled_from(IDS[table]))
        old = current.get((table, id_))
        action = (
            "insert"
            if old is None
            else data.draw(st.sampled_from(["update", "update", "delete", "snapshot"]))
        )
        if action == "insert":
            version = tick()
            if (table, id_) in graveyard:
                # In the deleting transaction the clock may even lag the deleted version
                # (updates within one µs push updated_at ahead of it): the trigger's floor
                # lifts it. From a later transaction the clock is past the delete's commit.
                deleted = graveyard[table, id_]
                version = max(deleted + data.draw(st.integers(-50, 3000)), deleted + 2)
            new = draw_row(data, table, id_, version)
            mutations += project(Change(table, "c", None, as_sent(new), us(new["updated_at"])))
            mutations += project_row(table, new)  # the dual-write of the same insert
            current[table, id_] = new
        elif action == "update":
            assert old is not None
            new = draw_row(data, table, id_, max(tick(), us(old["updated_at"]) + 1))
            new |= {c: old[c] for c in new if c != "updated_at" and data.draw(st.booleans())}
            after = as_sent(new)
            for col in TOASTABLE[table]:  # unchanged TOASTed value: Debezium's placeholder
                if new[col] == old[col] and data.draw(st.booleans()):
                    after[col] = data.draw(st.sampled_from([PLACEHOLDER_TEXT, UNAVAILABLE]))
            # REPLICA IDENTITY FULL always sends before; also check the degraded no-before
            # case where it can be right, i.e. when no read-model key moves.
            moved = ms_key(old, table) != ms_key(new, table)
            before = as_sent(old) if moved or data.draw(st.booleans()) else None
            mutations += project(Change(table, "u", before, after, 0))
            if data.draw(st.booleans()):
                mutations += project_row(table, new)
            current[table, id_] = new
        elif action == "delete":
            assert old is not None
            # Debezium's version of a delete is its commit time: any time after the row's
            # version, up to seconds later when the transaction held its locks.
            commit = us(old["updated_at"]) + data.draw(st.integers(1, 2_000_000))
            mutations += project(Change(table, "d", as_sent(old), None, commit))
            if data.draw(st.booleans()):  # the dual-write of the same delete
                mutations += project(Change(table, "d", old, None, commit))
            if data.draw(st.booleans()):  # a backfill that read the row before the delete
                mutations += project_row(table, old)
            graveyard[table, id_] = us(old["updated_at"])
            del current[table, id_]
        else:  # a backfill read of the current row, overlapping CDC
            assert old is not None
            mutations += project(change_from_row(table, as_sent(old)))

    duplicates = data.draw(st.lists(st.sampled_from(mutations), max_size=20))
    order = data.draw(st.permutations(mutations + duplicates))
    final = {t: [row for (tt, _), row in current.items() if tt == t] for t in SOURCE_TABLES}
    assert state(order) == expected(final)
    # Compacting any batch of them (the CDC consumer does) changes nothing visible.
    cut = data.draw(st.integers(0, len(order)))
    assert state(compact(order[:cut]), order[cut:]) == expected(final)


def test_rows_within_one_millisecond_keep_their_microsecond_order() -> None:
    base = T0.replace(microsecond=500_000)
    keys = [
        dict(
            project_row(
                "steps",
                step(id=uid(50 + i), created_at=base + timedelta(microseconds=300 - 100 * i)),
            )[0].key
        )
        for i in range(3)
    ]
    # All three share the millisecond; created_at_micros orders them as Postgres would.
    assert len({k["created_at"] for k in keys}) == 1
    assert [k["created_at_micros"] for k in keys] == [300, 200, 100]


def test_compact_collapses_a_hot_sessions_header_updates_to_the_newest() -> None:
    versions = [session(title=f"t{i}", updated_at=T0 + timedelta(seconds=i)) for i in range(5)]
    muts = [m for v in versions for m in project_row("sessions", v)]
    kept = compact(muts)
    assert len(muts) == 10 and len(kept) == 2
    assert {dict(m.values)["title"] for m in kept if isinstance(m, Upsert)} == {"t4"}
    # An older write than a delete of its key is dropped; the delete is kept.
    gone = project(Change("sessions", "d", versions[4], None, us(T0) + 9_000_000))
    assert compact([*muts, *gone]) == gone
