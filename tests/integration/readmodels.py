"""The integration tests' oracle: what the read models should hold, read from the SQL views of
schemas/postgres/0008 (derived from the write model without the Python projection), compared
with what Cassandra holds, both read with plain queries. A projection bug therefore shows up
as a difference instead of being mirrored by the expectation."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from cassandra.cluster import Session
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

from tasks.adapters import postgres
from tasks.settings import get_settings

# The oracle's own list (not the projection module's): every read model has a view.
READ_MODELS: Final = (
    "recent_conversations",
    "conversation_timeline",
    "sessions_by_id",
    "steps_by_turn",
)
PARTITION_COLUMN: Final = {
    "recent_conversations": "user_id",
    "conversation_timeline": "session_id",
    "sessions_by_id": "session_id",
    "steps_by_turn": "agent_turn_id",
}
SOURCE_TABLES: Final = ("sessions", "human_turns", "agent_turns", "steps")
TABLE_QUERIES: Final = {
    "sessions": "SELECT * FROM sessions WHERE id = ANY(%s) ORDER BY id",
    "human_turns": "SELECT * FROM human_turns WHERE session_id = ANY(%s) ORDER BY id",
    "agent_turns": "SELECT * FROM agent_turns WHERE session_id = ANY(%s) ORDER BY id",
    "steps": "SELECT * FROM steps WHERE session_id = ANY(%s) ORDER BY id",
}

Key = tuple[Any, ...]
Rows = dict[Key, dict[str, Any]]

_reader: psycopg.Connection[dict[str, Any]] | None = None
_reader_lock = threading.Lock()


def reader() -> psycopg.Connection[dict[str, Any]]:
    """One autocommit connection as the reader role (the role the views are granted to), so
    every query sees what is committed now."""
    global _reader
    with _reader_lock:
        if _reader is None or _reader.closed:
            conn = postgres.connect("reader", get_settings().postgres, autocommit=True)
            conn.row_factory = dict_row  # type: ignore[assignment]
            _reader = conn  # type: ignore[assignment]
        assert _reader is not None
        return _reader


def close_reader() -> None:
    global _reader
    with _reader_lock:
        if _reader is not None:
            _reader.close()
            _reader = None


def postgres_rows(
    conn: psycopg.Connection[Any], session_ids: Iterable[uuid.UUID], jsonb_as_text: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """The write model's rows of these sessions, as psycopg reads them; with
    ``jsonb_as_text`` payloads stay jsonb's text, as Debezium and the snapshot carry them."""
    ids = list(session_ids)
    with conn.cursor(row_factory=dict_row) as cur:
        if jsonb_as_text:
            cur.adapters.register_loader("jsonb", TextLoader)
        out = {t: cur.execute(sql, (ids,)).fetchall() for t, sql in TABLE_QUERIES.items()}
    conn.commit()
    return out


def _utc(v: Any) -> Any:
    """Cassandra gives naive UTC datetimes, psycopg aware ones in the session's zone."""
    if isinstance(v, datetime):
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
    return v


def primary_key(cql: Session, read_model: str) -> tuple[str, ...]:
    """The read model's primary key columns as the Cassandra schema declares them."""
    meta = cql.cluster.metadata.keyspaces[cql.keyspace].tables[read_model]
    return tuple(c.name for c in (*meta.partition_key, *meta.clustering_key))


def _keyed(rows: Iterable[Mapping[str, Any]], key_cols: tuple[str, ...]) -> Rows:
    out: Rows = {}
    for r in rows:
        d = {k: _utc(v) for k, v in r.items()}
        key = tuple(d.pop(c) for c in key_cols)
        assert key not in out, f"two rows with key {key}"
        out[key] = d
    return out


def expected(read_model: str, partitions: Iterable[uuid.UUID], key_cols: tuple[str, ...]) -> Rows:
    """The rows of ``expected_<read_model>`` in these partitions."""
    assert read_model in READ_MODELS, read_model
    rows = (
        reader()
        .execute(
            f"SELECT * FROM expected_{read_model} WHERE {PARTITION_COLUMN[read_model]} = ANY(%s)",
            (list(partitions),),
        )
        .fetchall()
    )
    return _keyed(rows, key_cols)


def actual(
    cql: Session, read_model: str, partitions: Iterable[uuid.UUID], key_cols: tuple[str, ...]
) -> Rows:
    """Every row Cassandra holds in these partitions of the read model."""
    rows: list[dict[str, Any]] = []
    for p in set(partitions):
        rows.extend(
            r._asdict()
            for r in cql.execute(
                f"SELECT * FROM {read_model} WHERE {PARTITION_COLUMN[read_model]} = %s", (p,)
            )
        )
    return _keyed(rows, key_cols)


def partitions(
    read_model: str,
    users: Iterable[uuid.UUID],
    sessions: Iterable[uuid.UUID],
    agent_turns: Iterable[uuid.UUID] = (),
) -> set[uuid.UUID]:
    """The partitions a test's ids cover. Steps: the agent turns named (deleted ones too, so a
    resurrected step shows), those the sessions have now and those their steps point at."""
    sids = list(sessions)
    if read_model == "recent_conversations":
        return set(users)
    if read_model != "steps_by_turn":
        return set(sids)
    found = (
        reader()
        .execute(
            "SELECT id FROM agent_turns WHERE session_id = ANY(%(s)s) UNION "
            "SELECT agent_turn_id FROM steps WHERE session_id = ANY(%(s)s)",
            {"s": sids},
        )
        .fetchall()
    )
    return set(agent_turns) | {r["id"] for r in found}


def compare(want: Rows, got: Rows, read_model: str) -> str | None:
    """None when equal, else what differs, with a few examples."""
    if want == got:
        return None
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    sample = [(k, got.get(k), want.get(k)) for k in (missing + extra + wrong)[:2]]
    return (
        f"{read_model}: {len(missing)} missing, {len(extra)} extra (resurrected?), "
        f"{len(wrong)} differ; e.g. (key, Cassandra, expected) {sample}"
    )


def differences(
    cql: Session,
    users: Iterable[uuid.UUID],
    sessions: Iterable[uuid.UUID],
    agent_turns: Iterable[uuid.UUID] = (),
    read_models: Iterable[str] = READ_MODELS,
) -> list[str]:
    """Cassandra's read models vs the SQL oracle over the partitions of these ids; [] when
    they agree cell for cell."""
    users, sessions, agent_turns = list(users), list(sessions), list(agent_turns)
    problems = []
    for rm in read_models:
        key_cols = primary_key(cql, rm)
        parts = partitions(rm, users, sessions, agent_turns)
        problem = compare(expected(rm, parts, key_cols), actual(cql, rm, parts, key_cols), rm)
        if problem:
            problems.append(problem)
    return problems


def agree(
    cql: Session,
    users: Iterable[uuid.UUID],
    sessions: Iterable[uuid.UUID],
    agent_turns: Iterable[uuid.UUID] = (),
    read_models: Iterable[str] = READ_MODELS,
) -> bool:
    return differences(cql, users, sessions, agent_turns, read_models) == []


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
