"""Selective dual-write with read-your-writes: the app's write API.

Each operation validates its input (before any connection is taken), writes Postgres in ONE
transaction as the ``app`` role, and reads back in that transaction every row it changed,
including the ``sessions`` row the triggers re-derived (last message, turn count, version).
Those are exactly the row versions the Debezium events of this transaction will carry. After
the commit, when the policy says the operation is user-facing, the rows go through the one
projection module and are written to Scylla with a small deadline, so the next read shows them.

The Scylla step never fails a call: Postgres is the source of truth and has committed; on any
error or timeout the result says ``read_model_updated=False``, a warning names the keys, and CDC
converges the read models later. That is safe in any order because every cell carries
``USING TIMESTAMP`` = the source row's version (docs/architecture.md, "The one rule"): the CDC
event for the same change projects to the same cells with the same timestamps, a no-op.

Writes are idempotent by id: retrying a call with the same ids after an unknown outcome
(connection lost during COMMIT) finds the committed rows and returns them (``replayed``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from tasks.core.catalog import COLUMNS
from tasks.core.errors import InvalidInput, ServiceUnavailable, TransientError, classify
from tasks.core.write_policy import (
    Operation,
    StepInput,
    as_uuid,
    check_content,
    check_short_text,
    check_steps,
    check_title,
)
from tasks.dual_write.deps import (
    DualWriteDeps,
    close_default_deps,
    connect_deps,
    default_deps,
)
from tasks.dual_write.result import WriteResult, after_commit

# The operations' deps (tasks/dual_write/deps.py) and result (tasks/dual_write/result.py):
# app code may import them from here.
__all__ = [
    "DualWriteDeps",
    "WriteResult",
    "close_default_deps",
    "connect_deps",
    "create_session",
    "default_deps",
    "delete_session",
    "record_agent_turn",
    "record_human_turn",
    "rename_session",
]

Cursor = psycopg.Cursor[dict[str, Any]]


def _select_list(table: str) -> sql.Composed:
    # jsonb is read as text: a psycopg-decoded bare JSON string would be ambiguous to the
    # projection, and text is what Debezium sends, so both paths canonicalize the same input.
    return sql.SQL(", ").join(
        sql.SQL("{c}::text AS {c}").format(c=sql.Identifier(c))
        if t == "jsonb"
        else sql.Identifier(c)
        for c, t in COLUMNS[table].items()
    )


_COLS = {t: _select_list(t) for t in COLUMNS}


# --------------------------------------------------------------------------------------------
# Postgres


@contextmanager
def _connection(deps: DualWriteDeps) -> Iterator[psycopg.Connection[Any]]:
    try:
        with deps.pool.connection(timeout=deps.pool_timeout_s) as conn:
            yield conn
    except PoolTimeout as exc:
        raise ServiceUnavailable(
            "PostgreSQL", f"no app connection within {deps.pool_timeout_s}s"
        ) from exc
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        # Rolled back: nothing was written. Validation should have caught it first.
        diag = exc.diag.message_primary or type(exc).__name__
        raise InvalidInput(f"Postgres refused the write: {diag}") from exc
    except psycopg.Error as exc:
        error = classify(exc, "Postgres write")
        if isinstance(error, TransientError):
            # Lost connection, serialization failure, shutdown: if it happened during COMMIT
            # the outcome is unknown; a retry with the same ids is safe (idempotent by id).
            raise ServiceUnavailable(
                "PostgreSQL", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            ) from exc
        raise error from exc  # permissions, a schema mistake: no retry helps


def _one(cur: Cursor, query: sql.Composed, params: Sequence[Any]) -> dict[str, Any] | None:
    return cur.execute(query, params).fetchone()


def _select(table: str, where: str, lock: str = "") -> sql.Composed:
    return sql.SQL("SELECT {} FROM {} WHERE " + where + lock).format(
        _COLS[table], sql.Identifier(table)
    )


def _lock_session(cur: Cursor, session_id: uuid.UUID, lock: str) -> dict[str, Any]:
    # The lock serializes the writes of one session, so the header trigger of each
    # transaction sees the turns the previous one committed: without it, two concurrent
    # turns each count only themselves (READ COMMITTED snapshot taken before the row wait).
    # NO KEY UPDATE still lets direct writers take KEY SHARE for their foreign keys.
    row = _one(cur, _select("sessions", "id = %s", lock), (session_id,))
    if row is None:
        raise InvalidInput(f"unknown session {session_id}")
    return row


# --------------------------------------------------------------------------------------------
# Operations


def create_session(
    user_id: uuid.UUID | str,
    title: str = "",
    *,
    session_id: uuid.UUID | str | None = None,
    deps: DualWriteDeps | None = None,
) -> WriteResult:
    d = deps or default_deps()
    uid = as_uuid(user_id, "user_id")
    sid = uuid.uuid4() if session_id is None else as_uuid(session_id, "session_id")
    title = check_title(title, d.policy)
    t0 = time.perf_counter()
    replayed = False
    with _connection(d) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = _one(
            cur,
            sql.SQL(
                "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING {}"
            ).format(_COLS["sessions"]),
            (sid, uid, title),
        )
        if row is None:
            row = _one(cur, _select("sessions", "id = %s"), (sid,))
            if row is None or row["user_id"] != uid:
                raise InvalidInput(f"session id {sid} is already taken")
            replayed = True
    return after_commit(
        d, Operation.CREATE_SESSION, sid, {"sessions": [row]}, t0, replayed=replayed
    )


def record_human_turn(
    session_id: uuid.UUID | str,
    content: str,
    *,
    turn_id: uuid.UUID | str | None = None,
    deps: DualWriteDeps | None = None,
) -> WriteResult:
    d = deps or default_deps()
    sid = as_uuid(session_id, "session_id")
    tid = uuid.uuid4() if turn_id is None else as_uuid(turn_id, "turn_id")
    content = check_content(content, d.policy)
    t0 = time.perf_counter()
    with _connection(d) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        _lock_session(cur, sid, " FOR NO KEY UPDATE")
        turn, replayed = _insert_turn(cur, "human_turns", tid, sid, content, {})
        # Re-read: the AFTER trigger updated last_message, turn_count and the row's version.
        session = _lock_session(cur, sid, "")
    return after_commit(
        d,
        Operation.RECORD_HUMAN_TURN,
        sid,
        {"human_turns": [turn], "sessions": [session]},
        t0,
        replayed=replayed,
    )


def record_agent_turn(
    session_id: uuid.UUID | str,
    content: str,
    *,
    model: str = "",
    steps: Sequence[StepInput | Mapping[str, Any]] | None = None,
    turn_id: uuid.UUID | str | None = None,
    deps: DualWriteDeps | None = None,
) -> WriteResult:
    d = deps or default_deps()
    sid = as_uuid(session_id, "session_id")
    tid = uuid.uuid4() if turn_id is None else as_uuid(turn_id, "turn_id")
    content = check_content(content, d.policy)
    model = check_short_text(model, "model", d.policy.max_model_chars)
    valid_steps = check_steps(steps, d.policy)
    t0 = time.perf_counter()
    with _connection(d) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        _lock_session(cur, sid, " FOR NO KEY UPDATE")
        turn, replayed = _insert_turn(cur, "agent_turns", tid, sid, content, {"model": model})
        if replayed:
            step_rows = cur.execute(_select("steps", "agent_turn_id = %s"), (tid,)).fetchall()
        elif valid_steps:
            # One statement for all steps, inserted in the given order (created_at follows).
            step_rows = cur.execute(
                sql.SQL(
                    "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
                    "SELECT u.id, %s, %s, u.kind, u.payload::jsonb "
                    "FROM unnest(%s::uuid[], %s::text[], %s::text[]) WITH ORDINALITY "
                    "AS u(id, kind, payload, n) ORDER BY u.n RETURNING {}"
                ).format(_COLS["steps"]),
                (
                    tid,
                    sid,
                    [s.step_id for s in valid_steps],
                    [s.kind for s in valid_steps],
                    [s.payload_json for s in valid_steps],
                ),
            ).fetchall()
        else:
            step_rows = []
        session = _lock_session(cur, sid, "")
    return after_commit(
        d,
        Operation.RECORD_AGENT_TURN,
        sid,
        {"agent_turns": [turn], "steps": step_rows, "sessions": [session]},
        t0,
        replayed=replayed,
    )


def _insert_turn(
    cur: Cursor, table: str, tid: uuid.UUID, sid: uuid.UUID, content: str, extra: Mapping[str, Any]
) -> tuple[dict[str, Any], bool]:
    cols = ["id", "session_id", "content", *extra]
    row = _one(
        cur,
        sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (id) DO NOTHING RETURNING {}").format(
            sql.Identifier(table),
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            _COLS[table],
        ),
        (tid, sid, content, *extra.values()),
    )
    if row is not None:
        return row, False
    old = _one(cur, _select(table, "id = %s"), (tid,))
    if (
        old is None
        or old["session_id"] != sid
        or old["content"] != content
        or any(old[k] != v for k, v in extra.items())
    ):
        raise InvalidInput(f"turn id {tid} is already used by another turn")
    return old, True


def rename_session(
    session_id: uuid.UUID | str, title: str, *, deps: DualWriteDeps | None = None
) -> WriteResult:
    d = deps or default_deps()
    sid = as_uuid(session_id, "session_id")
    title = check_title(title, d.policy)
    t0 = time.perf_counter()
    with _connection(d) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = _one(
            cur,
            sql.SQL("UPDATE sessions SET title = %s WHERE id = %s RETURNING {}").format(
                _COLS["sessions"]
            ),
            (title, sid),
        )
        if row is None:
            raise InvalidInput(f"unknown session {sid}")
    return after_commit(d, Operation.RENAME_SESSION, sid, {"sessions": [row]}, t0)


def delete_session(
    session_id: uuid.UUID | str, *, deps: DualWriteDeps | None = None
) -> WriteResult:
    """Delete a session and, by cascade, its turns and steps. Each tombstone is stamped with
    its row's version + 1 µs, exactly as CDC projects the delete events (see
    ``projection.tombstone_version``), so a session re-created with the same id later is
    visible again."""
    d = deps or default_deps()
    sid = as_uuid(session_id, "session_id")
    t0 = time.perf_counter()
    with _connection(d) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        # FOR UPDATE (not NO KEY): it also blocks new turns and steps (their foreign key
        # takes KEY SHARE), so the children read here are all the cascade will delete.
        session = _lock_session(cur, sid, " FOR UPDATE")
        gone: dict[str, list[dict[str, Any]]] = {"sessions": [session]}
        for table in ("human_turns", "agent_turns"):
            gone[table] = cur.execute(
                _select(table, "session_id = %s", " FOR UPDATE"), (sid,)
            ).fetchall()
        gone["steps"] = cur.execute(
            _select(
                "steps",
                "session_id = %s OR agent_turn_id IN "
                "(SELECT id FROM agent_turns WHERE session_id = %s)",
                " FOR UPDATE",
            ),
            (sid, sid),
        ).fetchall()
        cur.execute("DELETE FROM sessions WHERE id = %s", (sid,))
    return after_commit(d, Operation.DELETE_SESSION, sid, gone, t0, deleted=True)
