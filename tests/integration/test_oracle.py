"""The oracle itself: the SQL views of schemas/postgres/0008 and the Python projection derive
the same read models from one varied data set, the comparison the integration tests rely on
agrees with rows really stored in Cassandra, and a wrong projection is caught by it (while the
old oracle, the projection's own expected_rows, would have mirrored the bug)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cassandra.cluster import Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from tasks.adapters import postgres, scylla
from tasks.core import catalog, codec
from tasks.core.catalog import KEY_COLUMNS
from tasks.core.codec import canonical_json
from tasks.core.projection import expected_rows, project_row
from tasks.settings import get_settings
from tests.integration import readmodels
from tests.integration.conftest import own_keyspace
from tests.integration.readmodels import READ_MODELS, Rows, postgres_rows

LONG = "Grüße aus Köln, 日本語も。" * 30  # 600 characters, multi-byte: the preview keeps 500
PAYLOADS: list[Any] = [
    {"b": 2, "a": [1, 2], "aa": {"z": None, "é": "ü", "Z": True}},  # jsonb orders "b" first
    {},
    [],
    None,
    "a bare string",
    True,
    {
        "float": 0.1,
        "int_like": 100.0,
        "tiny": 1e-7,
        "big": 1e16,
        "neg": -2.5e-5,
        "edge": 1000000000000000.5,
        "many": 123456789.123456789,
        "huge_int": 10**30,
    },
    {
        "esc": 'quote " backslash \\ nl \n tab \t ctrl \u0001 del \u007f sep \u2028',
        "emoji 🚀": "日本語",
        "": "empty key",
    },
    {"nested": [[[]], [{}], [1, [2, [3.25]]]], "x": {"y": {"z": []}}},
]


@dataclass
class Data:
    users: list[uuid.UUID] = field(default_factory=list)
    sessions: list[uuid.UUID] = field(default_factory=list)
    agent_turns: list[uuid.UUID] = field(default_factory=list)


def write_varied_data(conn: psycopg.Connection[Any]) -> Data:
    """Committed through the app role (the write model's triggers run): unicode, NULLs (a
    session without turns, human turns without model), several rows in one millisecond and
    in one microsecond, moved turns and steps, a preview over 500 characters, timestamps
    before 1970, and payloads of every JSON shape."""
    d = Data(users=[uuid.uuid4(), uuid.uuid4()])
    s = [uuid.uuid4() for _ in range(4)]
    d.sessions = s
    ms = datetime(2024, 2, 29, 23, 59, 59, 998_000, tzinfo=UTC)
    old = datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)
    cur = conn.cursor()
    cur.executemany(
        "INSERT INTO sessions (id, user_id, title, created_at) VALUES (%s, %s, %s, %s)",
        [
            (s[0], d.users[0], "Trip to Köln 🚀 «quotes» 'single' \"double\"", ms),
            (s[1], d.users[0], "", ms),  # same instant as s[0]: two rows
            (s[2], d.users[1], "before the epoch", old),
            (s[3], d.users[1], "no turns at all", ms + timedelta(days=1)),
        ],
    )
    humans = [uuid.uuid4() for _ in range(5)]
    cur.executemany(
        "INSERT INTO human_turns (id, session_id, content, created_at) VALUES (%s, %s, %s, %s)",
        [
            (humans[0], s[0], "hi ü", ms + timedelta(microseconds=1)),
            (humans[1], s[0], "moves to another session", ms + timedelta(microseconds=1)),
            (humans[2], s[0], "__debezium_unavailable_value", ms + timedelta(microseconds=999)),
            (humans[3], s[2], "before 1970\nline two\ttab", old + timedelta(microseconds=1)),
            (humans[4], s[0], "same µs as hi, other id", ms + timedelta(microseconds=1)),
        ],
    )
    agents = [uuid.uuid4() for _ in range(3)]
    d.agent_turns = agents
    cur.executemany(
        "INSERT INTO agent_turns (id, session_id, content, model, created_at) "
        "VALUES (%s, %s, %s, %s, %s)",
        [
            (agents[0], s[0], LONG, "m-1", ms + timedelta(microseconds=1000)),  # s[0]'s latest
            (agents[1], s[1], "", "", ms + timedelta(microseconds=2)),  # empty strings, not NULL
            (agents[2], s[2], "à" * 501, "m-2", old + timedelta(microseconds=3)),
        ],
    )
    steps = [uuid.uuid4() for _ in PAYLOADS]
    cur.executemany(
        "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload, created_at) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        [
            (
                sid,
                agents[i % 2],
                s[i % 2],
                f"kind {i} ✓",
                Jsonb(p),
                ms + timedelta(microseconds=i % 3),
            )  # several steps per millisecond
            for i, (sid, p) in enumerate(zip(steps, PAYLOADS, strict=True))
        ],
    )
    conn.commit()
    # Moves: a turn to another session, a turn and a step to another time, a step to another
    # agent turn (and its session); each moves its read-model row to another key.
    cur.execute("UPDATE human_turns SET session_id = %s WHERE id = %s", (s[1], humans[1]))
    cur.execute(
        "UPDATE human_turns SET created_at = created_at - interval '1 day 1 microsecond'"
        " WHERE id = %s",
        (humans[3],),
    )
    cur.execute(
        "UPDATE steps SET agent_turn_id = %s, session_id = %s, "
        "created_at = created_at + interval '7 microseconds' WHERE id = %s",
        (agents[2], s[2], steps[0]),
    )
    cur.execute("UPDATE sessions SET user_id = %s WHERE id = %s", (d.users[1], s[1]))
    conn.commit()
    return d


@pytest.fixture()
def data(pg_app: psycopg.Connection[Any]) -> Data:
    return write_varied_data(pg_app)


def projected(conn: psycopg.Connection[Any], d: Data, read_model: str) -> Rows:
    """What the Python projection expects, keyed by the key columns' values."""
    rows = postgres_rows(conn, d.sessions, jsonb_as_text=True)
    want = expected_rows(rows, read_model)
    return {tuple(v for _, v in key): values for key, values in want.items()}


def from_views(d: Data, read_model: str) -> Rows:
    parts = readmodels.partitions(read_model, d.users, d.sessions, d.agent_turns)
    return readmodels.expected(read_model, parts, KEY_COLUMNS[read_model])


# --------------------------------------------------------------------------------------------
# The two derivations agree


@pytest.mark.parametrize("read_model", READ_MODELS)
def test_sql_views_equal_the_python_projection(
    read_model: str, data: Data, pg_app: psycopg.Connection[Any]
) -> None:
    got, want = from_views(data, read_model), projected(pg_app, data, read_model)
    assert got, "the data set should reach every read model"
    assert readmodels.compare(want, got, read_model) is None


def test_the_data_set_has_what_it_claims(data: Data) -> None:
    """The cases the comparison above is meant to cover are really in the data."""
    timeline = from_views(data, "conversation_timeline")
    per_ms: dict[tuple[Any, ...], int] = {}
    for key in timeline:
        per_ms[key[:2]] = per_ms.get(key[:2], 0) + 1
    assert max(per_ms.values()) >= 3  # several turns in one millisecond
    assert any(v["model"] is None for v in timeline.values())  # human turns
    assert any(k[1].year == 1969 for k in timeline)
    header = from_views(data, "sessions_by_id")
    assert any(v["last_message_at"] is None for v in header.values())  # a session, no turns
    previews = [v["last_message"] for v in header.values()]
    assert LONG[:500] in previews and "à" * 500 in previews
    steps = from_views(data, "steps_by_turn")
    assert len({k[:2] for k in steps}) < len(steps)  # steps sharing a millisecond
    stored = [json.loads(v["payload"]) for v in steps.values()]
    assert len(stored) == len(PAYLOADS) and all(p in stored for p in PAYLOADS)


def test_the_views_do_not_depend_on_the_session_time_zone(data: Data) -> None:
    with postgres.connect("reader", get_settings().postgres, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'Asia/Kathmandu'")  # +05:45: not a whole hour
        for rm in READ_MODELS:
            col = readmodels.PARTITION_COLUMN[rm]
            parts = list(readmodels.partitions(rm, data.users, data.sessions, data.agent_turns))
            with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                rows = cur.execute(
                    f"SELECT * FROM expected_{rm} WHERE {col} = ANY(%s)", (parts,)
                ).fetchall()
            assert readmodels._keyed(rows, KEY_COLUMNS[rm]) == from_views(data, rm)


_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=6)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_JSON, min_size=1, max_size=25))
def test_sql_canonical_json_equals_the_projections(values: list[Any]) -> None:
    """Any JSON value, stored as jsonb: the SQL canonical text is the projection's."""
    texts = [json.dumps(v, ensure_ascii=False) for v in values]
    rows = (
        readmodels.reader()
        .execute(
            "SELECT t::jsonb::text AS stored, cqrs_canonical_json(t::jsonb) AS canonical "
            "FROM unnest(%s::text[]) AS t",
            (texts,),
        )
        .fetchall()
    )
    for r in rows:
        assert r["canonical"] == canonical_json(json.loads(r["stored"])), r["stored"]


def test_sql_canonical_json_of_numbers_jsonb_keeps_as_written() -> None:
    """jsonb keeps a number's decimal text (1.10, 1E+2, 1e400...); Python parses that text."""
    raw = [
        "1.10",
        "1.0",
        "1E+2",
        "1e400",
        "1.5e-3",
        "0.000",
        "-0.0",
        "0.1e1",
        "5e-324",
        "123456789.123456789123456789",
        "9007199254740993.0",
        "1" + "0" * 400 + ".5",
        "-1" + "0" * 400 + ".5",
        "0." + "0" * 400 + "1",
        "-0." + "0" * 400 + "1",
    ]
    rows = (
        readmodels.reader()
        .execute(
            "SELECT t::jsonb::text AS stored, cqrs_canonical_json(t::jsonb) AS canonical "
            "FROM unnest(%s::text[]) AS t",
            (raw,),
        )
        .fetchall()
    )
    assert [r["canonical"] for r in rows] == [canonical_json(json.loads(r["stored"])) for r in rows]


# --------------------------------------------------------------------------------------------
# The comparison against Cassandra, with the real projection and with broken ones


@pytest.fixture(scope="module")
def oracle_keyspace() -> Iterator[Session]:
    with own_keyspace("oracle") as ks:
        session = scylla.connect(get_settings().scylla, ks)
        try:
            yield session
        finally:
            scylla.close(session)


def load_with_projection(session: Session, conn: psycopg.Connection[Any], d: Data) -> None:
    """Project the data set's current rows with tasks.core.projection (whatever it is patched to)
    and write them into the keyspace, as the backfill does."""
    rows = postgres_rows(conn, d.sessions, jsonb_as_text=True)
    mutations = [m for table, rs in rows.items() for r in rs for m in project_row(table, r)]
    scylla.ScyllaWriter(session, get_settings().scylla, keyspace=session.keyspace).write(mutations)


def old_oracle_agrees(
    session: Session, conn: psycopg.Connection[Any], d: Data, read_model: str
) -> bool:
    """What the integration tests compared before: Cassandra vs the projection's own
    expected_rows."""
    parts = readmodels.partitions(read_model, d.users, d.sessions, d.agent_turns)
    key_cols = readmodels.primary_key(session, read_model)
    return readmodels.actual(session, read_model, parts, key_cols) == projected(conn, d, read_model)


def test_rows_stored_by_the_real_projection_equal_the_oracle(
    oracle_keyspace: Session, data: Data, pg_app: psycopg.Connection[Any]
) -> None:
    load_with_projection(oracle_keyspace, pg_app, data)
    assert (
        readmodels.differences(oracle_keyspace, data.users, data.sessions, data.agent_turns) == []
    )


def _swap_title_and_preview(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = dict(catalog.FEEDS)
    header = specs["sessions"][1]
    assert header.read_model == "sessions_by_id"
    values = tuple(
        ("title", "last_message") if dst == "title" else (dst, src) for dst, src in header.values
    )
    specs["sessions"] = (
        specs["sessions"][0],
        catalog.Feed(header.read_model, header.key, values),
    )
    monkeypatch.setattr(catalog, "FEEDS", specs)


def _agent_turns_as_human(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = dict(catalog.FEEDS)
    (spec,) = specs["agent_turns"]
    specs["agent_turns"] = (
        catalog.Feed(spec.read_model, spec.key, spec.values, (("role", "human"),)),
    )
    monkeypatch.setattr(catalog, "FEEDS", specs)


def _payload_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        codec,
        "canonical_json",
        lambda obj: json.dumps(obj, sort_keys=True, ensure_ascii=False),
    )


def _micros_from_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = dict(catalog.FEEDS)
    (spec,) = specs["steps"]
    key = tuple(
        (dst, "updated_at") if dst == "created_at_micros" else (dst, src) for dst, src in spec.key
    )
    specs["steps"] = (catalog.Feed(spec.read_model, key, spec.values),)
    monkeypatch.setattr(catalog, "FEEDS", specs)


@pytest.mark.parametrize(
    ("breakage", "read_model"),
    [
        (_swap_title_and_preview, "sessions_by_id"),
        (_agent_turns_as_human, "conversation_timeline"),
        (_payload_with_spaces, "steps_by_turn"),
        (_micros_from_the_version, "steps_by_turn"),
    ],
    ids=[
        "title from the preview",
        "agent turns as human",
        "payload not canonical",
        "micros from updated_at",
    ],
)
def test_a_wrong_projection_is_caught_by_the_oracle(
    breakage: Callable[[pytest.MonkeyPatch], None],
    read_model: str,
    oracle_keyspace: Session,
    data: Data,
    pg_app: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    breakage(monkeypatch)
    load_with_projection(oracle_keyspace, pg_app, data)
    problems = readmodels.differences(oracle_keyspace, data.users, data.sessions, data.agent_turns)
    assert [p.split(":")[0] for p in problems] == [read_model], problems
    # The projection's own expectation has the same bug, so it saw nothing wrong.
    assert old_oracle_agrees(oracle_keyspace, pg_app, data, read_model)
