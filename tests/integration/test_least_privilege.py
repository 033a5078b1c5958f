"""Least privilege (docs/security.md, "Least privilege"; migration 0014 and
infra/conf/pg_hba.conf): each role is refused, with the precise error, what it may not do,
and in the same test does what it may, so every test fails if a privilege is missing as
well as if one is too broad."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo
from psycopg.pq import ExecStatus

from infra.postgres import hba_text, sync_hba
from tasks.adapters import postgres
from tasks.settings import get_settings

CFG = get_settings().postgres
WRITE_MODEL = ("sessions", "human_turns", "agent_turns", "steps")
# Written by triggers only (0002, 0006, 0007, 0011): the row version of every table and the
# session header.
DERIVED = [
    ("sessions", "updated_at"),
    ("sessions", "last_message"),
    ("sessions", "last_message_at"),
    ("sessions", "turn_count"),
    ("human_turns", "updated_at"),
    ("agent_turns", "updated_at"),
    ("steps", "updated_at"),
]
# A statement (run before the refused one) that the app may run on the same row.
SOURCE_UPDATE = {
    "sessions": "UPDATE sessions SET title = 'renamed' WHERE id = %s",
    "human_turns": "UPDATE human_turns SET content = 'edited' WHERE id = %s",
    "agent_turns": "UPDATE agent_turns SET model = 'm-2' WHERE id = %s",
    "steps": "UPDATE steps SET payload = '{\"done\": true}' WHERE id = %s",
}
FAR_FUTURE_US = 4_102_444_800_000_000  # 2100-01-01, in microseconds since the epoch


@pytest.fixture()
def app() -> Iterator[psycopg.Connection[Any]]:
    with postgres.connect("app", CFG) as conn:
        yield conn


@pytest.fixture()
def reader() -> Iterator[psycopg.Connection[Any]]:
    with postgres.connect("reader", CFG) as conn:
        yield conn


@pytest.fixture()
def debezium() -> Iterator[psycopg.Connection[Any]]:
    with postgres.connect("debezium", CFG) as conn:
        yield conn


def refused(
    conn: psycopg.Connection[Any],
    query: str | sql.Composed,
    params: tuple[Any, ...] = (),
    error: type[psycopg.Error] = errors.InsufficientPrivilege,
) -> str:
    """Run ``query`` in a savepoint, expect ``error``, return its message."""
    with pytest.raises(error) as info, conn.transaction():
        conn.execute(query, params)
    return str(info.value)


def allowed(
    conn: psycopg.Connection[Any], query: str | sql.Composed, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run ``query`` in a savepoint that is rolled back: allowed, and leaves nothing."""
    with conn.transaction(force_rollback=True):
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def write_model_rows(app: psycopg.Connection[Any]) -> dict[str, uuid.UUID]:
    """A session with a human turn, an agent turn and a step, written by the app (not
    committed: the caller's transaction is rolled back when its connection closes)."""
    ids = {t: uuid.uuid4() for t in WRITE_MODEL}
    app.execute(
        "INSERT INTO sessions (id, user_id, title, created_at) VALUES (%s, %s, 't', %s)",
        (ids["sessions"], uuid.uuid4(), datetime.now(UTC)),
    )
    app.execute(
        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, 'hello')",
        (ids["human_turns"], ids["sessions"]),
    )
    app.execute(
        "INSERT INTO agent_turns (id, session_id, content, model) VALUES (%s, %s, 'hi', 'm')",
        (ids["agent_turns"], ids["sessions"]),
    )
    app.execute(
        "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
        "VALUES (%s, %s, %s, 'tool', '{}')",
        (ids["steps"], ids["agent_turns"], ids["sessions"]),
    )
    return ids


def header(app: psycopg.Connection[Any], session_id: uuid.UUID) -> tuple[Any, ...]:
    """The session's derived columns: turn count, last message, version."""
    row = app.execute(
        "SELECT turn_count, last_message, updated_at FROM sessions WHERE id = %s", (session_id,)
    ).fetchone()
    assert row is not None
    return tuple(row)


def public_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Every table of the schema, so that a table added later is covered without a test
    change."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
    ]


def first_column(admin: psycopg.Connection[Any], table: str) -> str:
    row = admin.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1",
        (table,),
    ).fetchone()
    assert row is not None
    return str(row[0])


def all_writes_refused(
    conn: psycopg.Connection[Any], admin: psycopg.Connection[Any], table: str
) -> None:
    column = sql.Identifier(first_column(admin, table))
    t = sql.Identifier(table)
    for query in (
        sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE false").format(t, t),
        sql.SQL("UPDATE {} SET {} = {} WHERE false").format(t, column, column),
        sql.SQL("DELETE FROM {} WHERE false").format(t),
        sql.SQL("TRUNCATE {}").format(t),
    ):
        message = refused(conn, query)
        assert f"permission denied for table {table}" in message, (query, message)


# --- the app ---------------------------------------------------------------------------


def test_the_app_writes_the_source_columns_and_the_triggers_derive_the_rest(
    app: psycopg.Connection[Any],
) -> None:
    ids = write_model_rows(app)
    count, last, version = header(app, ids["sessions"])
    assert (count, last) == (2, "hi")  # the header trigger wrote what the app may not
    for table, statement in SOURCE_UPDATE.items():
        assert app.execute(statement, (ids[table],)).rowcount == 1
    app.execute(
        "UPDATE human_turns SET created_at = created_at + interval '1 hour' WHERE id = %s",
        (ids["human_turns"],),
    )
    count, last, newer = header(app, ids["sessions"])
    assert (count, last) == (2, "edited") and newer > version
    assert app.execute("DELETE FROM human_turns WHERE id = %s", (ids["human_turns"],)).rowcount
    assert header(app, ids["sessions"])[:2] == (1, "hi")
    assert app.execute("DELETE FROM sessions WHERE id = %s", (ids["sessions"],)).rowcount == 1
    app.rollback()


@pytest.mark.parametrize(("table", "column"), DERIVED, ids=[f"{t}.{c}" for t, c in DERIVED])
def test_the_app_cannot_write_a_derived_column(
    app: psycopg.Connection[Any], table: str, column: str
) -> None:
    ids = write_model_rows(app)
    # The same row, a source column: allowed.
    assert len(allowed(app, SOURCE_UPDATE[table] + " RETURNING id", (ids[table],))) == 1
    t, c = sql.Identifier(table), sql.Identifier(column)
    message = refused(
        app, sql.SQL("UPDATE {} SET {} = {} WHERE id = %s").format(t, c, c), (ids[table],)
    )
    assert f"permission denied for table {table}" in message
    # Nor on insert: a copy of the row under a new id, naming the derived column.
    cols = [
        r[0]
        for r in app.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (table,),
        ).fetchall()
    ]
    names = sql.SQL(", ").join(map(sql.Identifier, cols))
    copied = sql.SQL(", ").join(
        sql.SQL("gen_random_uuid()") if col == "id" else sql.Identifier(col) for col in cols
    )
    refused(
        app,
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} WHERE id = %s").format(t, names, copied, t),
        (ids[table],),
    )
    app.rollback()


def test_the_app_cannot_choose_a_version(app: psycopg.Connection[Any]) -> None:
    """The version floor (0011) is ignored for the app; cqrs_new_version, reconcile's way to
    give a row a version above a shadowing write, is the one way above the clock."""
    ids = write_model_rows(app)
    app.execute("SELECT set_config('cqrs.version_floor_us', %s, true)", (str(FAR_FUTURE_US),))
    row = app.execute(
        "UPDATE sessions SET title = 'floor' WHERE id = %s RETURNING updated_at",
        (ids["sessions"],),
    ).fetchone()
    assert row is not None and row[0] < datetime.now(UTC) + timedelta(minutes=1)
    app.execute("SELECT set_config('cqrs.version_floor_us', '', true)")
    for table in WRITE_MODEL:
        (found,) = app.execute(
            "SELECT cqrs_new_version(%s, %s, %s)", (table, ids[table], FAR_FUTURE_US)
        ).fetchone() or (None,)
        assert found is True
        version = app.execute(
            sql.SQL("SELECT updated_at FROM {} WHERE id = %s").format(sql.Identifier(table)),
            (ids[table],),
        ).fetchone()
        assert version is not None and version[0] > datetime(2099, 12, 31, tzinfo=UTC)
    # The floor applied to those rows only, not to the app's next write.
    later = app.execute(
        "UPDATE agent_turns SET model = 'after' WHERE id = %s RETURNING updated_at",
        (ids["agent_turns"],),
    ).fetchone()
    assert later is not None and later[0] < datetime(2100, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert app.execute("SELECT cqrs_new_version('sessions', %s)", (uuid.uuid4(),)).fetchone() == (
        False,
    )
    message = refused(
        app,
        "SELECT cqrs_new_version('schema_migrations', %s)",
        (uuid.uuid4(),),
        errors.InvalidParameterValue,
    )
    assert "not a table of the write model" in message
    message = refused(app, "SELECT cqrs_refresh_session_header(%s)", (ids["sessions"],))
    assert "permission denied for function cqrs_refresh_session_header" in message
    app.rollback()


def test_the_header_functions_run_as_a_role_that_cannot_log_in(
    pg_admin: psycopg.Connection[Any],
) -> None:
    rows = pg_admin.execute(
        """SELECT p.proname, p.prosecdef, p.proconfig, r.rolname, r.rolcanlogin
             FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
            WHERE p.proname = ANY(%s) ORDER BY 1""",
        (["cqrs_new_version", "cqrs_refresh_session_header", "cqrs_turn_changed"],),
    ).fetchall()
    assert [r[0] for r in rows] == [
        "cqrs_new_version",
        "cqrs_refresh_session_header",
        "cqrs_turn_changed",
    ]
    for name, definer, config, owner, can_login in rows:
        assert definer, name
        assert config == ["search_path=pg_catalog, public, pg_temp"], name
        assert (owner, can_login) == ("cqrs_derived", False), name
    # What that role may write: the derived columns, nothing else.
    grants = pg_admin.execute(
        """SELECT table_name, column_name FROM information_schema.column_privileges
            WHERE grantee = 'cqrs_derived' AND privilege_type = 'UPDATE' ORDER BY 1, 2"""
    ).fetchall()
    assert sorted(grants) == sorted(DERIVED)
    assert not pg_admin.execute(
        """SELECT 1 FROM information_schema.table_privileges
            WHERE grantee = 'cqrs_derived' AND privilege_type <> 'SELECT'"""
    ).fetchall()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT * FROM schema_migrations", "permission denied for table schema_migrations"),
        ("SELECT * FROM cqrs_heartbeat", "permission denied for table cqrs_heartbeat"),
        (
            "UPDATE cqrs_heartbeat SET beat_at = now() WHERE id = 1",
            "permission denied for table cqrs_heartbeat",
        ),
        ("SELECT * FROM audit_sessions_by_id", "permission denied for view audit_sessions_by_id"),
        (
            "SELECT * FROM expected_sessions_by_id",
            "permission denied for view expected_sessions_by_id",
        ),
        ("CREATE TABLE public.intruder (i int)", "permission denied for schema public"),
        ("CREATE FUNCTION public.intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'", "public"),
        ("CREATE VIEW intruder AS SELECT 1", "permission denied for schema public"),
        ("CREATE TEMP TABLE intruder (i int)", "permission denied to create temporary tables"),
        ("TRUNCATE steps", "permission denied for table steps"),
        ("UPDATE sessions SET id = id WHERE false", "permission denied for table sessions"),
    ],
    ids=[
        "migrations",
        "heartbeat-read",
        "heartbeat-write",
        "audit-view",
        "expected-view",
        "create-table",
        "create-function",
        "create-view",
        "temp-table",
        "truncate",
        "update-id",
    ],
)
def test_the_app_touches_nothing_else(
    app: psycopg.Connection[Any], query: str, message: str
) -> None:
    # What it may: read and write the write model.
    assert allowed(app, "SELECT count(*) FROM (SELECT 1 FROM steps LIMIT 1) s")[0][0] in (0, 1)
    assert allowed(app, "DELETE FROM steps WHERE false") == []
    assert message in refused(app, query)


# --- the reader ------------------------------------------------------------------------


def test_the_reader_reads_the_write_model_and_writes_nothing(
    reader: psycopg.Connection[Any], pg_admin: psycopg.Connection[Any]
) -> None:
    tables = public_tables(pg_admin)
    assert set(WRITE_MODEL) | {"cqrs_heartbeat", "schema_migrations"} <= set(tables)
    for table in WRITE_MODEL:
        allowed(reader, sql.SQL("SELECT * FROM {} LIMIT 1").format(sql.Identifier(table)))
    for view in ("audit_sessions_by_id", "expected_steps_by_turn"):
        allowed(reader, sql.SQL("SELECT * FROM {} LIMIT 1").format(sql.Identifier(view)))
    for table in tables:
        all_writes_refused(reader, pg_admin, table)
    # No locks that writers would wait on either (FOR UPDATE needs UPDATE).
    refused(reader, "SELECT 1 FROM sessions LIMIT 1 FOR UPDATE")
    assert "permission denied for schema public" in refused(
        reader, "CREATE TABLE public.intruder (i int)"
    )
    assert "permission denied to create temporary tables" in refused(
        reader, "CREATE TEMP TABLE intruder (i int)"
    )


# --- Debezium --------------------------------------------------------------------------


def test_debezium_reads_the_published_tables_only(
    debezium: psycopg.Connection[Any], pg_admin: psycopg.Connection[Any]
) -> None:
    published = {
        r[0]
        for r in pg_admin.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s",
            (CFG.publication_name,),
        ).fetchall()
    }
    assert published == {*WRITE_MODEL, "cqrs_heartbeat"}
    for table in public_tables(pg_admin):
        select = sql.SQL("SELECT * FROM {} LIMIT 1").format(sql.Identifier(table))
        if table in published:
            allowed(debezium, select)
        else:
            assert f"permission denied for table {table}" in refused(debezium, select)
        if table != "cqrs_heartbeat":
            all_writes_refused(debezium, pg_admin, table)
    # Its heartbeat.action.query, and no other write of that table.
    assert allowed(
        debezium, "UPDATE cqrs_heartbeat SET beat_at = now() WHERE id = 1 RETURNING id"
    ) == [(1,)]
    refused(debezium, "UPDATE cqrs_heartbeat SET id = id WHERE false")
    refused(debezium, "INSERT INTO cqrs_heartbeat VALUES (2, now())")
    refused(debezium, "DELETE FROM cqrs_heartbeat WHERE false")
    refused(debezium, "SELECT * FROM audit_sessions_by_id")
    assert "permission denied for schema public" in refused(
        debezium, "CREATE TABLE public.intruder (i int)"
    )


def debezium_conninfo(**extra: str) -> str:
    return make_conninfo(CFG.conninfo("debezium"), **extra)


def test_debezium_cannot_replicate_physically(tmp_path: Path) -> None:
    """No physical replication connection, hence no pg_basebackup; the admin's (backups)
    still gets one, so the refusal is the role's, not the server's."""
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(debezium_conninfo(replication="true"), connect_timeout=5)
    assert "pg_hba.conf rejects replication connection" in str(info.value)
    assert f'user "{CFG.debezium_user}"' in str(info.value)
    basebackup = shutil.which("pg_basebackup") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"))), None
    )
    assert basebackup is not None, "pg_basebackup not found"
    done = subprocess.run(
        [
            str(basebackup),
            "-h",
            CFG.host,
            "-p",
            str(CFG.port),
            "-U",
            CFG.debezium_user,
            "-D",
            str(tmp_path / "backup"),
            "-w",
        ],
        env={**os.environ, "PGPASSWORD": CFG.debezium_password.get_secret_value()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "pg_hba.conf rejects replication connection" in done.stderr
    assert not (tmp_path / "backup" / "PG_VERSION").exists()
    admin = make_conninfo(CFG.conninfo("admin"), replication="true")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert result.status == ExecStatus.TUPLES_OK


def test_debezium_replicates_logically_from_its_database_only(
    pg_admin: psycopg.Connection[Any],
) -> None:
    with psycopg.connect(
        debezium_conninfo(replication="database"), autocommit=True, connect_timeout=5
    ) as conn:
        result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert result.status == ExecStatus.TUPLES_OK
        assert result.get_value(0, 3) == CFG.database.encode()  # dbname: a logical walsender
    for extra in ({}, {"replication": "database"}):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(debezium_conninfo(dbname="postgres", **extra), connect_timeout=5)
        assert "pg_hba.conf rejects" in str(info.value)
        assert f'user "{CFG.debezium_user}", database "postgres"' in str(info.value)
    # The running connector: its walsender streams the slot, and its heartbeat query (the
    # one write it has) keeps succeeding.
    walsender = pg_admin.execute(
        """SELECT a.usename, a.datname FROM pg_replication_slots s
             JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s""",
        (CFG.slot_name,),
    ).fetchone()
    assert walsender == (CFG.debezium_user, CFG.database)
    pg_admin.rollback()
    (before,) = pg_admin.execute("SELECT beat_at FROM cqrs_heartbeat").fetchone() or (None,)
    pg_admin.rollback()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (beat,) = pg_admin.execute("SELECT beat_at FROM cqrs_heartbeat").fetchone() or (None,)
        pg_admin.rollback()
        if beat is not None and before is not None and beat > before:
            break
        time.sleep(1)
    else:
        pytest.fail("Debezium's heartbeat did not advance in 30 s")


@pytest.mark.xfail(
    strict=True,
    reason="PostgreSQL runs BASE_BACKUP on a logical (database) walsender for any REPLICATION "
    "role, which pg_hba cannot tell from logical replication (docs/security.md)",
)
def test_debezium_cannot_take_a_base_backup_over_a_logical_connection() -> None:
    with psycopg.connect(
        debezium_conninfo(replication="database"), autocommit=True, connect_timeout=5
    ) as conn:
        pg = conn.pgconn
        # Throttled to the minimum and abandoned at its first row: the probe reads nothing.
        pg.send_query(
            b"BASE_BACKUP (LABEL 'least-privilege probe', MAX_RATE 32, "
            b"CHECKPOINT 'fast', WAL false, MANIFEST 'no')"
        )
        result = pg.get_result()
        assert result is not None
        assert result.status == ExecStatus.FATAL_ERROR, "BASE_BACKUP started"


# --- pg_hba on an existing data dir ------------------------------------------------------


def test_the_cluster_runs_the_projects_pg_hba(pg_admin: psycopg.Connection[Any]) -> None:
    """`make up` rewrites a data dir's pg_hba.conf that differs (one initialised before a
    change) and reloads; the rules in force are the project's, without errors."""
    (text,) = pg_admin.execute("SELECT pg_read_file(current_setting('hba_file'))").fetchone() or (
        None,
    )
    assert text == hba_text()
    assert not pg_admin.execute(
        "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL"
    ).fetchall()


def test_syncing_pg_hba_is_idempotent_and_keeps_the_files_mode(tmp_path: Path) -> None:
    hba = tmp_path / "pg_hba.conf"
    hba.write_text("host all all 0.0.0.0/0 trust\n")
    hba.chmod(0o600)
    assert sync_hba(tmp_path) is True
    assert hba.read_text() == hba_text()
    assert hba.stat().st_mode & 0o777 == 0o600
    assert sync_hba(tmp_path) is False
