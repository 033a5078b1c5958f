"""A steady mixed write load for the chaos suite (tests/integration/test_chaos.py).

Worker threads write the four source tables as the app does, at a fixed rate: inserts,
updates, moves (a key column changed, so the read-model row moves), deletes and re-inserts
of deleted ids. About half the user-facing operations go through the dual-write library
(``tasks.dual_write.service``), the rest are plain ``app``-role transactions that only CDC
carries. Every operation is one transaction and is written so that running it again is
harmless (inserts ``ON CONFLICT DO NOTHING``, updates to absolute values, the dual-write's
idempotency by id): an outage makes a worker retry the same operation until it commits, so
a commit whose acknowledgement was lost is never mistaken for a failure or done twice.

Each worker owns its users, sessions, turns and steps (fresh ids), so workers never wait on
each other's row locks and the audit can be restricted to the partitions the load touched.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from tasks.adapters import postgres
from tasks.core.errors import InvalidInput, ServiceUnavailable, TransientError
from tasks.core.write_policy import StepInput
from tasks.dual_write import service as dual_write
from tasks.dual_write.deps import DualWriteDeps, connect_deps
from tasks.settings import Settings

# What an outage looks like to a writer: the server gone, the connection lost, no pooled
# connection in time. Retried; anything else is a bug of the load or of the product.
OUTAGE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    ServiceUnavailable,
    TransientError,
    PoolTimeout,
)
# How long one operation is retried through an outage before it is counted abandoned: longer
# than the Postgres restarts of the suite (a few seconds each).
RETRY_FOR_S = 45.0
MAX_LIVE_SESSIONS = 30  # per worker: deletes take over above it, so partitions stay small


@dataclass
class LoadStats:
    committed: int = 0  # operations whose transaction committed (retries included)
    failed_attempts: int = 0  # attempts an outage failed (each is retried)
    abandoned: int = 0  # operations still failing after RETRY_FOR_S
    rejected: int = 0  # refused by Postgres for a reason other than an outage (should be 0)
    dual_write: Counter[str] = field(default_factory=Counter)  # written / failed / skipped
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # outage error classes seen
    started: float = 0.0
    stopped: float = 0.0

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.stopped or time.monotonic()) - self.started)

    @property
    def tx_per_s(self) -> float:
        return self.committed / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "committed": self.committed,
            "tx_per_s": round(self.tx_per_s, 1),
            "failed_attempts": self.failed_attempts,
            "abandoned": self.abandoned,
            "rejected": self.rejected,
            "dual_write": dict(self.dual_write),
            "ops": dict(sorted(self.ops.items())),
            "outage_errors": dict(self.errors),
        }


@dataclass
class Touched:
    """Every id the load used, whether its write committed or not: the audit's partitions."""

    users: set[uuid.UUID] = field(default_factory=set)
    sessions: set[uuid.UUID] = field(default_factory=set)
    agent_turns: set[uuid.UUID] = field(default_factory=set)

    def partitions(self) -> dict[str, set[uuid.UUID]]:
        """Read model -> the partition keys the load may have written."""
        return {
            "recent_conversations": set(self.users),
            "conversation_timeline": set(self.sessions),
            "sessions_by_id": set(self.sessions),
            "steps_by_turn": set(self.agent_turns),
        }


@dataclass
class _Turn:
    session: uuid.UUID
    table: str  # human_turns or agent_turns


@dataclass
class _Step:
    turn: uuid.UUID
    session: uuid.UUID


class _Rejected(Exception):
    """An operation Postgres refused for good (not an outage)."""


Op = tuple[str, Callable[[], None], Callable[[], None]]  # name, write, apply to local state


class _Worker:
    """One writer thread's world: its own users and the rows it believes exist."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.rng = random.Random(f"chaos-{index}-{uuid.uuid4()}")
        self.users = [uuid.uuid4() for _ in range(4)]
        self.sessions: dict[uuid.UUID, uuid.UUID] = {}  # session -> user
        self.turns: dict[uuid.UUID, _Turn] = {}
        self.steps: dict[uuid.UUID, _Step] = {}
        self.deleted_sessions: list[tuple[uuid.UUID, uuid.UUID]] = []
        self.deleted_turns: list[uuid.UUID] = []  # human turns
        self.deleted_steps: list[uuid.UUID] = []
        self.conn: psycopg.Connection[Any] | None = None
        with load.lock:
            load.touched.users.update(self.users)

    # -- connections

    def _conn(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = postgres.connect("app", self.load.settings.postgres)
        return self.conn

    def _drop_conn(self) -> None:
        if self.conn is not None:
            # A broken connection may fail to close: it is gone anyway.
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def _tx(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        conn = self._conn()
        try:
            with conn.transaction():
                for query, params in statements:
                    conn.execute(query, params)
        except psycopg.IntegrityError as exc:
            raise _Rejected(str(exc).splitlines()[0]) from exc

    def _dual(self, call: Callable[[], dual_write.WriteResult]) -> None:
        try:
            result = call()
        except InvalidInput as exc:
            raise _Rejected(str(exc)) from exc
        with self.load.lock:
            self.load.stats.dual_write[result.dual_write] += 1

    # -- bookkeeping

    def _touch(
        self, sessions: tuple[uuid.UUID, ...] = (), agent_turns: tuple[uuid.UUID, ...] = ()
    ) -> None:
        with self.load.lock:
            self.load.touched.sessions.update(sessions)
            self.load.touched.agent_turns.update(agent_turns)

    def _forget_session(self, sid: uuid.UUID) -> None:
        """What a session's delete takes with it (the foreign keys cascade)."""
        self.sessions.pop(sid, None)
        gone_turns = {t for t, v in self.turns.items() if v.session == sid}
        for t in gone_turns:
            self.turns.pop(t)
        for s in [s for s, v in self.steps.items() if v.session == sid or v.turn in gone_turns]:
            self.steps.pop(s)

    def _forget_turn(self, tid: uuid.UUID) -> None:
        self.turns.pop(tid, None)
        for s in [s for s, v in self.steps.items() if v.turn == tid]:
            self.steps.pop(s)

    def _pick(self, items: Any) -> Any:
        return self.rng.choice(list(items))

    def _agent_turns(self) -> list[uuid.UUID]:
        return [t for t, v in self.turns.items() if v.table == "agent_turns"]

    # -- the operations

    def plan(self) -> Op:
        """The next operation, drawn from the mix."""
        r, dual = self.rng.random(), self.rng.random() < 0.5
        if not self.sessions or r < 0.08:
            return self._create_session(dual)
        if len(self.sessions) > MAX_LIVE_SESSIONS:
            return self._delete_session(dual)
        if r < 0.36:
            return self._human_turn(dual)
        if r < 0.48:
            return self._agent_turn(dual)
        if r < 0.55 and self._agent_turns():
            return self._step()
        if r < 0.63 and self.turns:
            return self._update_content()
        if r < 0.68:
            return self._rename(dual)
        if r < 0.76 and self.turns:
            return self._move()
        if r < 0.88:
            return self._delete(dual)
        return self._reinsert(dual)

    def _create_session(self, dual: bool, sid: uuid.UUID | None = None) -> Op:
        sid = sid or uuid.uuid4()
        user = self._pick(self.users)
        self._touch((sid,))
        title = f"chaos {sid.hex[:6]}"
        if dual:

            def write() -> None:
                self._dual(
                    lambda: dual_write.create_session(
                        user, title, session_id=sid, deps=self.load.deps
                    )
                )
        else:

            def write() -> None:
                self._tx(
                    (
                        "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s) "
                        "ON CONFLICT (id) DO NOTHING",
                        (sid, user, title),
                    )
                )

        def apply() -> None:
            self.sessions[sid] = user

        return ("create_session" + ("/dual" if dual else ""), write, apply)

    def _human_turn(self, dual: bool, tid: uuid.UUID | None = None) -> Op:
        sid, tid = self._pick(self.sessions), tid or uuid.uuid4()
        content = f"human {self.rng.randrange(10**9)}"
        if dual:

            def write() -> None:
                self._dual(
                    lambda: dual_write.record_human_turn(
                        sid, content, turn_id=tid, deps=self.load.deps
                    )
                )
        else:

            def write() -> None:
                self._tx(
                    (
                        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s) "
                        "ON CONFLICT (id) DO NOTHING",
                        (tid, sid, content),
                    )
                )

        def apply() -> None:
            self.turns[tid] = _Turn(sid, "human_turns")

        return ("human_turn" + ("/dual" if dual else ""), write, apply)

    def _agent_turn(self, dual: bool) -> Op:
        sid, tid = self._pick(self.sessions), uuid.uuid4()
        step_ids = [uuid.uuid4() for _ in range(self.rng.randrange(4))]
        self._touch(agent_turns=(tid,))
        content = f"agent {self.rng.randrange(10**9)}"
        if dual:

            def write() -> None:
                self._dual(
                    lambda: dual_write.record_agent_turn(
                        sid,
                        content,
                        model="m",
                        steps=[StepInput("tool", {"n": i}, s) for i, s in enumerate(step_ids)],
                        turn_id=tid,
                        deps=self.load.deps,
                    )
                )
        else:

            def write() -> None:
                self._tx(
                    (
                        "INSERT INTO agent_turns (id, session_id, content, model) "
                        "VALUES (%s, %s, %s, 'm') ON CONFLICT (id) DO NOTHING",
                        (tid, sid, content),
                    ),
                    *(
                        (
                            "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
                            "VALUES (%s, %s, %s, 'tool', %s) ON CONFLICT (id) DO NOTHING",
                            (s, tid, sid, json.dumps({"n": i})),
                        )
                        for i, s in enumerate(step_ids)
                    ),
                )

        def apply() -> None:
            self.turns[tid] = _Turn(sid, "agent_turns")
            for s in step_ids:
                self.steps[s] = _Step(tid, sid)

        return ("agent_turn" + ("/dual" if dual else ""), write, apply)

    def _step(self, stid: uuid.UUID | None = None) -> Op:
        turn = self._pick(self._agent_turns())
        sid, stid = self.turns[turn].session, stid or uuid.uuid4()

        def write() -> None:
            self._tx(
                (
                    "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
                    "VALUES (%s, %s, %s, 'tool', %s) ON CONFLICT (id) DO NOTHING",
                    (stid, turn, sid, json.dumps({"r": self.rng.random()})),
                )
            )

        def apply() -> None:
            self.steps[stid] = _Step(turn, sid)

        return ("step", write, apply)

    def _update_content(self) -> Op:
        if self.steps and self.rng.random() < 0.4:
            stid = self._pick(self.steps)
            payload = json.dumps({"updated": self.rng.randrange(10**9)})
            return (
                "update_step",
                lambda: self._tx(("UPDATE steps SET payload = %s WHERE id = %s", (payload, stid))),
                lambda: None,
            )
        tid = self._pick(self.turns)
        table = self.turns[tid].table
        content = f"edited {self.rng.randrange(10**9)}"
        return (
            "update_turn",
            lambda: self._tx((f"UPDATE {table} SET content = %s WHERE id = %s", (content, tid))),
            lambda: None,
        )

    def _rename(self, dual: bool) -> Op:
        sid = self._pick(self.sessions)
        title = f"renamed {self.rng.randrange(10**9)}"
        if dual:
            return (
                "rename_session/dual",
                lambda: self._dual(
                    lambda: dual_write.rename_session(sid, title, deps=self.load.deps)
                ),
                lambda: None,
            )
        return (
            "rename_session",
            lambda: self._tx(("UPDATE sessions SET title = %s WHERE id = %s", (title, sid))),
            lambda: None,
        )

    def _move(self) -> Op:
        """A key column changes: the read-model row moves to another partition or key."""
        kind = self.rng.choice(["turn_session", "turn_time", "step_turn", "session_user"])
        if kind == "step_turn" and self.steps and len(self._agent_turns()) > 1:
            stid = self._pick(self.steps)
            turn = self._pick(t for t in self._agent_turns() if t != self.steps[stid].turn)
            sid = self.turns[turn].session

            def apply_step() -> None:
                self.steps[stid] = _Step(turn, sid)

            return (
                "move_step",
                lambda: self._tx(
                    (
                        "UPDATE steps SET agent_turn_id = %s, session_id = %s WHERE id = %s",
                        (turn, sid, stid),
                    )
                ),
                apply_step,
            )
        if kind == "session_user":
            sid = self._pick(self.sessions)
            user = self._pick(u for u in self.users if u != self.sessions[sid])

            def apply_user() -> None:
                self.sessions[sid] = user

            return (
                "move_session_user",
                lambda: self._tx(("UPDATE sessions SET user_id = %s WHERE id = %s", (user, sid))),
                apply_user,
            )
        tid = self._pick(self.turns)
        table = self.turns[tid].table
        if kind == "turn_time" or len(self.sessions) < 2:
            shift = self.rng.randrange(1, 10**6)
            return (
                "move_turn_time",
                lambda: self._tx(
                    (
                        f"UPDATE {table} SET created_at = created_at - make_interval("
                        "secs => %s::float8 / 1e6) WHERE id = %s",
                        (shift, tid),
                    )
                ),
                lambda: None,
            )
        sid = self._pick(s for s in self.sessions if s != self.turns[tid].session)

        def apply_turn() -> None:
            self.turns[tid] = _Turn(sid, table)

        return (
            "move_turn_session",
            lambda: self._tx((f"UPDATE {table} SET session_id = %s WHERE id = %s", (sid, tid))),
            apply_turn,
        )

    def _delete_session(self, dual: bool) -> Op:
        sid = self._pick(self.sessions)
        user = self.sessions[sid]

        def apply() -> None:
            self._forget_session(sid)
            self.deleted_sessions.append((sid, user))

        if dual:

            def write() -> None:
                # "unknown session": a retry after a commit whose answer was lost.
                with contextlib.suppress(_Rejected):
                    self._dual(lambda: dual_write.delete_session(sid, deps=self.load.deps))

            return ("delete_session/dual", write, apply)
        return (
            "delete_session",
            lambda: self._tx(("DELETE FROM sessions WHERE id = %s", (sid,))),
            apply,
        )

    def _delete(self, dual: bool) -> Op:
        r = self.rng.random()
        if r < 0.25 or not self.turns:
            return self._delete_session(dual)
        if r < 0.5 and self.steps:
            stid = self._pick(self.steps)

            def apply_step() -> None:
                self.steps.pop(stid, None)
                self.deleted_steps.append(stid)

            return (
                "delete_step",
                lambda: self._tx(("DELETE FROM steps WHERE id = %s", (stid,))),
                apply_step,
            )
        tid = self._pick(self.turns)
        table = self.turns[tid].table

        def apply_turn() -> None:
            self._forget_turn(tid)
            if table == "human_turns":
                self.deleted_turns.append(tid)

        return (
            f"delete_{table[:-1]}",
            lambda: self._tx((f"DELETE FROM {table} WHERE id = %s", (tid,))),
            apply_turn,
        )

    def _reinsert(self, dual: bool) -> Op:
        """An id deleted earlier is inserted again (its tombstone must not hide it)."""
        r = self.rng.random()
        if r < 0.4 and self.deleted_sessions:
            # The same user as before: a create with the same id and another user is refused.
            sid, user = self.deleted_sessions.pop(self.rng.randrange(len(self.deleted_sessions)))

            def apply_session() -> None:
                self.sessions[sid] = user

            if dual:

                def write_dual() -> None:
                    self._dual(
                        lambda: dual_write.create_session(
                            user, "again", session_id=sid, deps=self.load.deps
                        )
                    )

                return ("reinsert_session/dual", write_dual, apply_session)
            return (
                "reinsert_session",
                lambda: self._tx(
                    (
                        "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'again') "
                        "ON CONFLICT (id) DO NOTHING",
                        (sid, user),
                    )
                ),
                apply_session,
            )
        if r < 0.7 and self.deleted_steps and self._agent_turns():
            stid = self.deleted_steps.pop(self.rng.randrange(len(self.deleted_steps)))
            _name, write, apply = self._step(stid)
            return ("reinsert_step", write, apply)
        if self.deleted_turns:
            tid = self.deleted_turns.pop(self.rng.randrange(len(self.deleted_turns)))
            _name, write, apply = self._human_turn(dual, tid)
            return ("reinsert_human_turn" + ("/dual" if dual else ""), write, apply)
        return self._human_turn(dual)

    # -- the loop

    def run_op(self, op: Op) -> None:
        name, write, apply = op
        stats, lock = self.load.stats, self.load.lock
        give_up = time.monotonic() + RETRY_FOR_S
        delay = 0.1
        while True:
            try:
                write()
            except _Rejected as exc:
                with lock:
                    stats.rejected += 1
                    stats.errors[f"rejected {name}: {exc}"[:120]] += 1
                self._drop_conn()
                return
            except OUTAGE as exc:
                self._drop_conn()
                with lock:
                    stats.failed_attempts += 1
                    stats.errors[type(exc).__name__] += 1
                if time.monotonic() > give_up:
                    with lock:
                        stats.abandoned += 1
                    return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            apply()
            with lock:
                stats.committed += 1
                stats.ops[name] += 1
            return

    def loop(self, rate: float) -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        while not self.load.stop_event.is_set():
            self.run_op(self.plan())
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                # Behind after an outage: go on at the rate, without a burst to catch up.
                next_at = time.monotonic()
        self._drop_conn()


class Load:
    """``workers`` writer threads at ``rate`` transactions/s in all; ``start()``, ``stop()``."""

    def __init__(self, settings: Settings, rate: float = 120.0, workers: int = 3) -> None:
        self.settings = settings
        self.rate, self.n_workers = rate, workers
        self.stats = LoadStats()
        self.touched = Touched()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.deps: DualWriteDeps = connect_deps(settings, pool_size=workers + 1)
        self.workers = [_Worker(self, i) for i in range(workers)]
        self.threads: list[threading.Thread] = []
        self.crashed: list[BaseException] = []

    def _run(self, worker: _Worker) -> None:
        try:
            worker.loop(self.rate / self.n_workers)
        except BaseException as exc:  # reported by stop(): a load that dies is a test failure
            self.crashed.append(exc)

    def start(self) -> Load:
        self.stats.started = time.monotonic()
        for i, w in enumerate(self.workers):
            t = threading.Thread(target=self._run, args=(w,), name=f"chaos-load-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> LoadStats:
        self.stop_event.set()
        for t in self.threads:
            # An operation may be in its retry loop (RETRY_FOR_S) when asked to stop.
            t.join(RETRY_FOR_S + 15)
        self.stats.stopped = time.monotonic()
        self.deps.close()
        if self.crashed:
            raise RuntimeError(f"the load crashed: {self.crashed[0]!r}") from self.crashed[0]
        if any(t.is_alive() for t in self.threads):
            raise RuntimeError("a load worker did not stop")
        return self.stats

    def write_marker(self) -> uuid.UUID:
        """One more session in the load's partitions, written after the load stopped: once CDC
        applied it, it applied everything committed before it (one slot, commit order)."""
        sid = uuid.uuid4()
        user = self.workers[0].users[0]
        with self.lock:
            self.touched.sessions.add(sid)
        with postgres.connect("app", self.settings.postgres) as conn:
            conn.execute(
                "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'marker')", (sid, user)
            )
        return sid
