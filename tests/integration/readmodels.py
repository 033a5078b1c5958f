"""Helpers for integration tests: read what Postgres and Scylla hold for a set of sessions,
and wait for them to agree."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from cassandra.cluster import Session

from tasks.projection import expected_rows, normalize_row

TABLE_QUERIES = {
    "sessions": "SELECT * FROM sessions WHERE id = ANY(%s)",
    "human_turns": "SELECT * FROM human_turns WHERE session_id = ANY(%s)",
    "agent_turns": "SELECT * FROM agent_turns WHERE session_id = ANY(%s)",
    "steps": "SELECT * FROM steps WHERE session_id = ANY(%s)",
}


def postgres_rows(conn: psycopg.Connection, session_ids: Iterable[uuid.UUID]
                  ) -> dict[str, list[dict[str, Any]]]:
    ids = list(session_ids)
    out = {}
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        for table, sql in TABLE_QUERIES.items():
            rows = cur.execute(sql, (ids,)).fetchall()
            out[table] = [normalize_row(table, r, toast_placeholders=False) for r in rows]
    conn.commit()
    return out


def scylla_rows(cql: Session, read_model: str, rows_pg: dict[str, list[dict[str, Any]]],
                session_ids: Iterable[uuid.UUID], user_ids: Iterable[uuid.UUID]
                ) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The read model's rows for these sessions/users, keyed like expected_rows()."""
    ids = list(session_ids)
    if read_model == "recent_conversations":
        rows = [r for u in set(user_ids) for r in cql.execute(
            "SELECT * FROM recent_conversations WHERE user_id = %s", (u,))]
    elif read_model == "steps_by_turn":
        turn_ids = {r["id"] for r in rows_pg["agent_turns"]}
        rows = [r for t in turn_ids for r in cql.execute(
            "SELECT * FROM steps_by_turn WHERE agent_turn_id = %s", (t,))]
    else:
        rows = [r for s in ids for r in cql.execute(
            f"SELECT * FROM {read_model} WHERE session_id = %s", (s,))]
    exp = expected_rows(rows_pg, read_model)
    key_cols = [c for c, _ in next(iter(exp))] if exp else None
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        d = {k: _utc(v) for k, v in r._asdict().items()}
        cols = key_cols or list(d)[:1]
        key = tuple((c, d.pop(c)) for c in cols)
        out[key] = d
    return out


def _utc(v: Any) -> Any:
    from datetime import UTC, datetime

    return v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
