"""A key deleted and inserted again is visible again: after CDC, after a backfill and after a
dual-write, for every source table, whether the re-insert runs in the deleting transaction or
races it from another one (docs/decisions.md, "Versions over a key's whole life").

Oracles are plain SQL and plain CQL on the rows at hand. The projection is used once, to turn
the real Debezium delete events into tombstones as the consumer would, for the backfill case."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from support.cdc_probe import ChangeTap, LocalCdc, TappedEvent
from tasks.adapters import postgres, scylla
from tasks.core.projection import project
from tasks.dual_write import service as dual_write
from tasks.settings import get_settings
from tests.integration.conftest import own_keyspace
from tests.integration.readmodels import wait_for

# Alone (docs/decisions.md, "How `make test` runs"): its trigger on the shared `sessions`
# table takes a lock every other writer would queue behind.
pytestmark = pytest.mark.solo

CFG = get_settings()

TABLES = ("sessions", "human_turns", "agent_turns", "steps")


def _insert_sql(table: str) -> str:
    return {
        "sessions": "INSERT INTO sessions (id, user_id, title, created_at) "
        "VALUES (%(id)s, %(user)s, %(text)s, %(at)s)",
        "human_turns": "INSERT INTO human_turns (id, session_id, content, created_at) "
        "VALUES (%(id)s, %(session)s, %(text)s, %(at)s)",
        "agent_turns": "INSERT INTO agent_turns (id, session_id, content, model, created_at) "
        "VALUES (%(id)s, %(session)s, %(text)s, 'm', %(at)s)",
        "steps": "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload, created_at) "
        "VALUES (%(id)s, %(turn)s, %(session)s, %(text)s, '{}', %(at)s)",
    }[table]


class World:
    """One user, a parent session and agent turn, and one row per table to delete again."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.user, self.session, self.turn = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        self.ids = {t: uuid.uuid4() for t in TABLES}
        self.created = conn.execute(
            "SELECT date_trunc('milliseconds', now()) - interval '1 hour'"
        ).fetchone()[0]  # type: ignore[index]
        with conn.transaction():
            conn.execute(
                "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'parent')",
                (self.session, self.user),
            )
            conn.execute(
                "INSERT INTO agent_turns (id, session_id, content) VALUES (%s, %s, 'parent turn')",
                (self.turn, self.session),
            )
            for t in TABLES:
                conn.execute(_insert_sql(t), self.params(t, "first"))

    def params(self, table: str, text: str) -> dict[str, Any]:
        return {
            "id": self.ids[table],
            "user": self.user,
            "session": self.session,
            "turn": self.turn,
            "text": text,
            "at": self.created,
        }


def visible_text(cql: Any, w: World, table: str) -> str | None:
    """What the read models show for the row's text, plain CQL; None when absent. For a
    session, both session read models must agree or the answer is 'disagree'."""
    i = w.ids[table]
    if table == "sessions":
        a = cql.execute("SELECT title FROM sessions_by_id WHERE session_id = %s", (i,)).one()
        b = [
            r.title
            for r in cql.execute(
                "SELECT session_id, title FROM recent_conversations WHERE user_id = %s", (w.user,)
            )
            if r.session_id == i
        ]
        got = {a.title if a else None, b[0] if b else None}
        return got.pop() if len(got) == 1 else "disagree"
    if table == "steps":
        rows = [
            r.kind
            for r in cql.execute(
                "SELECT step_id, kind FROM steps_by_turn WHERE agent_turn_id = %s", (w.turn,)
            )
            if r.step_id == i
        ]
    else:
        rows = [
            r.content
            for r in cql.execute(
                "SELECT turn_id, content FROM conversation_timeline WHERE session_id = %s",
                (w.session,),
            )
            if r.turn_id == i
        ]
    return rows[0] if rows else None


def reinsert_in_deleting_transaction(conn: psycopg.Connection, w: World, table: str) -> None:
    with conn.transaction():
        conn.execute(f"DELETE FROM {table} WHERE id = %s", (w.ids[table],))
        conn.execute(_insert_sql(table), w.params(table, "again"))


def reinsert_racing_the_delete(conn: psycopg.Connection, w: World, table: str) -> None:
    """D deletes and holds its lock 0.8 s before committing; I inserts the key meanwhile."""
    deleted = threading.Event()

    def delete() -> None:
        with postgres.connect("app", CFG.postgres) as d, d.transaction():
            d.execute(f"DELETE FROM {table} WHERE id = %s", (w.ids[table],))
            deleted.set()
            d.execute("SELECT pg_sleep(0.8)")

    t = threading.Thread(target=delete)
    t.start()
    assert deleted.wait(10)
    with conn.transaction():
        conn.execute(_insert_sql(table), w.params(table, "again"))
    t.join(10)


FORMS: dict[str, Callable[[psycopg.Connection, World, str], None]] = {
    "same transaction": reinsert_in_deleting_transaction,
    "racing": reinsert_racing_the_delete,
}


@pytest.mark.parametrize("form", FORMS)
def test_reinserted_rows_are_visible_after_cdc_and_after_a_backfill(
    form: str, cdc_consumer: LocalCdc, cql: Any
) -> None:
    tap = ChangeTap(CFG.kafka)
    try:
        with postgres.connect("app", CFG.postgres) as conn:
            conn.autocommit = True
            w = World(conn)
            for table in TABLES:
                FORMS[form](conn, w, table)
            # Plain SQL: every row exists again with the new text.
            for table in TABLES:
                col = {"sessions": "title", "steps": "kind"}.get(table, "content")
                got = conn.execute(
                    f"SELECT {col} FROM {table} WHERE id = %s", (w.ids[table],)
                ).fetchone()
                assert got == ("again",), (table, got)
        ids = {str(i) for i in w.ids.values()}
        deletes = tap.collect(
            lambda e: (
                e.change is not None
                and e.change.op == "d"
                and str((e.change.before or {}).get("id")) in ids
            ),
            4,
        )
        assert len(deletes) == 4, [d.event.change for d in deletes]
    finally:
        tap.close()

    # CDC: the consumer applies the delete and the insert (and any order of them converges).
    assert wait_for(lambda: all(visible_text(cql, w, t) == "again" for t in TABLES)), (
        {t: visible_text(cql, w, t) for t in TABLES},
        cdc_consumer.where(),
    )

    # Backfill: a keyspace that holds CDC's tombstones of the deletes (the real events,
    # decoded and projected as the consumer does) and nothing else gets the rows back.
    with own_keyspace("reinsert") as ks, scylla.session(CFG.scylla, ks) as session:
        writer = scylla.ScyllaWriter(session, CFG.scylla, keyspace=ks)
        writer.write([m for d in deletes for m in project(_change(d))])
        from flows.backfill import backfill_flow

        backfill_flow(user_ids=[str(w.user)], keyspace=ks, chunk_size=1000)
        assert {t: visible_text(session, w, t) for t in TABLES} == dict.fromkeys(TABLES, "again")


def _change(e: TappedEvent) -> Any:
    assert e.event.change is not None
    return e.event.change


def test_dual_write_create_racing_delete_session_is_visible(
    cdc_consumer: LocalCdc, cql: Any
) -> None:
    """create_session(S) issued while delete_session(S) holds S deleted, uncommitted."""
    deps = dual_write.connect_deps(CFG)
    tap = ChangeTap(CFG.kafka)
    user, sid = uuid.uuid4(), uuid.uuid4()
    try:
        dual_write.create_session(user, "first", session_id=sid, deps=deps)
        with postgres.connect("admin", CFG.postgres) as admin:
            admin.autocommit = True
            # A test-only trigger holds this one delete open for 1.5 s after the session row
            # is deleted (uncommitted): the create below then races it, every time.
            trigger = f"cqrs_test_slow_delete_{sid.hex}"
            admin.execute(
                "CREATE OR REPLACE FUNCTION cqrs_test_slow_delete() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; "
                "END $$"
            )
            admin.execute(
                f"CREATE TRIGGER {trigger} AFTER DELETE ON sessions FOR EACH ROW "
                f"WHEN (OLD.id = '{sid}') EXECUTE FUNCTION cqrs_test_slow_delete()"
            )
            try:
                results: dict[str, dual_write.WriteResult] = {}
                d = threading.Thread(
                    target=lambda: results.__setitem__(
                        "delete", dual_write.delete_session(sid, deps=deps)
                    )
                )
                d.start()
                sleeping = (
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                    "AND query LIKE 'DELETE FROM sessions WHERE id%%'"
                )
                assert wait_for(lambda: admin.execute(sleeping).fetchone() != (0,), 20, 0.01), (
                    "the delete never started"
                )
                results["create"] = dual_write.create_session(
                    user, "again", session_id=sid, deps=deps
                )
                d.join(60)
            finally:
                admin.execute(f"DROP TRIGGER IF EXISTS {trigger} ON sessions")
        assert not results["create"].replayed
        assert results["delete"].mutations and results["create"].mutations
        w = World.__new__(World)
        w.user, w.ids = user, {"sessions": sid}
        # What the two dual-writes write, whether or not they made their deadline, in either
        # order of arrival:
        with own_keyspace("reinsert_dw") as ks, scylla.session(CFG.scylla, ks) as session:
            writer = scylla.ScyllaWriter(session, CFG.scylla, keyspace=ks)
            for order in (("delete", "create"), ("create", "delete")):
                for name in order:
                    writer.write(results[name].mutations)
                assert visible_text(session, w, "sessions") == "again", order
        # ...and after CDC applied the delete and both creates of the session:
        events = tap.collect(
            lambda e: (
                e.change is not None
                and e.change.table == "sessions"
                and e.change.op in ("c", "d")
                and str((e.change.after or e.change.before or {}).get("id")) == str(sid)
            ),
            3,
        )
        assert len(events) == 3, events
        assert wait_for(lambda: cdc_consumer.applied(events)), cdc_consumer.where()
        assert visible_text(cql, w, "sessions") == "again"
    finally:
        tap.close()
        deps.close()
