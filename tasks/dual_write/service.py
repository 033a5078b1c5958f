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

import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from tasks.core.errors import InvalidInput, ServiceUnavailable, TransientError, classify
from tasks.core.projection import (
    COLUMNS,
    Change,
    Mutation,
    change_from_row,
    normalize_row,
    project,
    tombstone_version,
)
from tasks.core.write_policy import (
    DualWritePolicy,
    Operation,
    StepInput,
    as_uuid,
    check_content,
    check_short_text,
    check_steps,
    check_title,
)
from tasks.dual_write.read_model import ScyllaHandle
from tasks.settings import get_settings

log = logging.getLogger("cqrs_sync.dual_write")

Row = Mapping[str, Any]
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


@dataclass(frozen=True)
class DualWriteDeps:
    """What the operations need: an ``app``-role connection pool, the Scylla handle, the
    policy. ``with_policy`` gives the same connections under another policy."""

    pool: ConnectionPool
    scylla: ScyllaHandle
    policy: DualWritePolicy = field(default_factory=DualWritePolicy)
    pool_timeout_s: float = 5.0

    def with_policy(self, policy: DualWritePolicy) -> DualWriteDeps:
        return replace(self, policy=policy)

    def close(self) -> None:
        self.scylla.close()
        self.pool.close()


def connect_deps(
    policy: DualWritePolicy | None = None,
    *,
    pool_size: int = 8,
    scylla: ScyllaHandle | None = None,
    wait_s: float | None = 10.0,
) -> DualWriteDeps:
    """Open a pool for the app role and a Scylla handle (connected in the background). With
    ``wait_s`` it waits that long for both, so the first calls are not needlessly left to CDC;
    a Scylla that is down does not stop the app from writing."""
    pool: ConnectionPool = ConnectionPool(
        get_settings().postgres.conninfo("app"),
        min_size=1,
        max_size=pool_size,
        kwargs={"autocommit": True},
        name="cqrs-dual-write",
        open=True,
    )
    handle = scylla or ScyllaHandle(max_in_flight=(policy or DualWritePolicy()).max_in_flight)
    if wait_s:
        try:
            pool.wait(timeout=wait_s)
        except PoolTimeout as exc:
            pool.close()
            handle.close()
            raise ServiceUnavailable("PostgreSQL", f"no app connection in {wait_s}s") from exc
        handle.wait_ready(wait_s)
    return DualWriteDeps(pool, handle, policy or DualWritePolicy())


_default: DualWriteDeps | None = None


def default_deps() -> DualWriteDeps:
    """The process-wide deps (settings and policy from the environment), opened on first use."""
    global _default
    if _default is None:
        _default = connect_deps()
    return _default


def close_default_deps() -> None:
    global _default
    if _default is not None:
        _default.close()
        _default = None


@dataclass(frozen=True)
class WriteResult:
    operation: Operation
    session_id: uuid.UUID
    # Canonical rows this call wrote (for delete: the rows it deleted), by source table.
    rows: Mapping[str, tuple[Row, ...]]
    # "skipped": the policy leaves this operation to CDC.
    dual_write: Literal["written", "failed", "skipped"]
    mutations: tuple[Mutation, ...] = ()
    replayed: bool = False  # the ids existed already with the same content: nothing new
    postgres_ms: float = 0.0
    scylla_ms: float | None = None
    error: str | None = None

    @property
    def read_model_updated(self) -> bool:
        return self.dual_write == "written"

    def ids(self, table: str) -> list[uuid.UUID]:
        return [r["id"] for r in self.rows.get(table, ())]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly, free of content: what a flow or a log may keep."""
        return {
            "operation": self.operation.value,
            "session_id": str(self.session_id),
            "ids": {t: [str(r["id"]) for r in rs] for t, rs in self.rows.items()},
            "read_model_updated": self.read_model_updated,
            "dual_write": self.dual_write,
            "replayed": self.replayed,
            "postgres_ms": round(self.postgres_ms, 3),
            "scylla_ms": None if self.scylla_ms is None else round(self.scylla_ms, 3),
            "error": self.error,
        }


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
    return _finish(d, Operation.CREATE_SESSION, sid, {"sessions": [row]}, t0, replayed=replayed)


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
    return _finish(
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
    return _finish(
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
    return _finish(d, Operation.RENAME_SESSION, sid, {"sessions": [row]}, t0)


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
    return _finish(d, Operation.DELETE_SESSION, sid, gone, t0, deleted=True)


# --------------------------------------------------------------------------------------------
# After the commit: project, then the Scylla step


def _finish(
    d: DualWriteDeps,
    op: Operation,
    sid: uuid.UUID,
    raw: Mapping[str, Sequence[Row]],
    t0: float,
    *,
    replayed: bool = False,
    deleted: bool = False,
) -> WriteResult:
    postgres_ms = (time.perf_counter() - t0) * 1000
    # The same normalization and projection CDC and backfill use: same cells, same stamps.
    if not deleted:
        changes = [change_from_row(t, r) for t, rs in raw.items() for r in rs]
    else:
        changes = []
        for t, rs in raw.items():
            for r in rs:
                before = normalize_row(t, r, toast_placeholders=False)
                changes.append(Change(t, "d", before, None, tombstone_version(before)))
    rows = {t: tuple(c.after or c.before or {} for c in changes if c.table == t) for t in raw}
    result = WriteResult(op, sid, rows, "skipped", replayed=replayed, postgres_ms=postgres_ms)
    if not d.policy.dual_writes(op):
        return result
    t1 = time.perf_counter()
    mutations: tuple[Mutation, ...] = ()
    try:
        mutations = tuple(m for c in changes for m in project(c))
        d.scylla.write(mutations, d.policy.deadline_s)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
        keys = [f"{t}:{r['id']}" for t, rs in rows.items() for r in rs][:20]
        # Keys only: never the content, which may be private.
        log.warning(
            "dual-write %s committed to Postgres but the read models were not "
            "updated (%s); CDC will converge them. session=%s keys=%s",
            op.value,
            error,
            sid,
            keys,
        )
        return replace(
            result,
            dual_write="failed",
            mutations=mutations,
            error=error,
            scylla_ms=(time.perf_counter() - t1) * 1000,
        )
    return replace(
        result,
        dual_write="written",
        mutations=mutations,
        scylla_ms=(time.perf_counter() - t1) * 1000,
    )
