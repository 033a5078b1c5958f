"""The backfill on the real stack: snapshot → Parquet → projection → Cassandra.

The database is shared: every test makes its own users and passes them as the backfill's
user_ids filter, and compares only its own ids. Tests that need a read model of their own
(exact equality without CDC writing into it, truncation, checkpoints) load a keyspace made for
this module and dropped at its end.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cassandra.cluster import Session
from psycopg.types.json import Jsonb

from bench.proc import proc_stat
from flows import backfill
from flows.backfill import backfill_flow
from infra import stack
from support.cdc_probe import position_group_at_end
from tasks.adapters import postgres, scylla
from tasks.backfill.load import Checkpoints
from tasks.backfill.snapshot import Manifest
from tasks.core.errors import ConfigurationError
from tasks.core.timestamps import cql_timestamp, sub_millis
from tasks.settings import get_settings
from tests.integration import readmodels
from tests.integration.conftest import own_keyspace
from tests.integration.readmodels import READ_MODELS, wait_for

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------
# Data


@dataclass
class Dataset:
    """Everything a test created; ids stay listed after deletion, so a resurrected row in
    Scylla shows up as an extra."""

    user_ids: list[uuid.UUID] = field(default_factory=list)
    session_ids: list[uuid.UUID] = field(default_factory=list)
    human_turn_ids: list[uuid.UUID] = field(default_factory=list)
    agent_turn_ids: list[uuid.UUID] = field(default_factory=list)
    step_ids: list[uuid.UUID] = field(default_factory=list)

    @property
    def users(self) -> list[str]:
        return [str(u) for u in self.user_ids]


_WORDS = [
    "hello",
    "naïve",
    "Grüße",
    "日本語",
    "emoji 🚀",
    "quote ' \"",
    "tab\there",
    "line\nbreak",
    "back\\slash",
    "50%",
    "{json}",
    "NULL",
]


def _text(rng: random.Random, lo: int = 1, hi: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def generate(
    conn: psycopg.Connection,
    rng: random.Random,
    users: int,
    sessions_per_user: tuple[int, int] = (1, 8),
    turns: tuple[int, int] = (0, 12),
    steps: tuple[int, int] = (0, 3),
) -> Dataset:
    """Users with sessions, human and agent turns, and steps, written with COPY as the app
    role (the write model's triggers run: versions and session headers are the real ones)."""
    d = Dataset(user_ids=[uuid.uuid4() for _ in range(users)])
    base = datetime.now(UTC) - timedelta(days=30)
    sessions, humans, agents, step_rows = [], [], [], []
    for user in d.user_ids:
        for _ in range(rng.randint(*sessions_per_user)):
            sid, at = uuid.uuid4(), base + timedelta(seconds=rng.randint(0, 29 * 86400))
            sessions.append((sid, user, _text(rng, 1, 4), at))
            for t in range(rng.randint(*turns)):
                tat = at + timedelta(
                    seconds=t * 30 + rng.randint(0, 20), microseconds=rng.randint(0, 999_999)
                )
                if t % 2 == 0:
                    humans.append((uuid.uuid4(), sid, _text(rng), tat))
                else:
                    aid = uuid.uuid4()
                    agents.append((aid, sid, _text(rng, 5, 40), rng.choice(["m-1", "m-2"]), tat))
                    for s in range(rng.randint(*steps)):
                        step_rows.append(
                            (
                                uuid.uuid4(),
                                aid,
                                sid,
                                rng.choice(["tool", "answer"]),
                                Jsonb({"n": s, "q": _text(rng, 1, 3), "ok": True}),
                                tat + timedelta(milliseconds=s + 1),
                            )
                        )
    # Two sessions of one user created in the same microsecond stay two rows.
    if sessions:
        twin = sessions[0]
        sessions.append((uuid.uuid4(), twin[1], "twin", twin[3]))
    with conn.cursor() as cur:
        for table, cols, rows in (
            ("sessions", "id, user_id, title, created_at", sessions),
            ("human_turns", "id, session_id, content, created_at", humans),
            ("agent_turns", "id, session_id, content, model, created_at", agents),
            ("steps", "id, agent_turn_id, session_id, kind, payload, created_at", step_rows),
        ):
            with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
    conn.commit()
    d.session_ids = [s[0] for s in sessions]
    d.human_turn_ids = [h[0] for h in humans]
    d.agent_turn_ids = [a[0] for a in agents]
    d.step_ids = [s[0] for s in step_rows]
    return d


def pg_counts(conn: psycopg.Connection, d: Dataset) -> dict[str, int]:
    q = {
        "sessions": "SELECT count(*) FROM sessions WHERE user_id = ANY(%s)",
        "human_turns": "SELECT count(*) FROM human_turns h JOIN sessions s ON s.id = "
        "h.session_id WHERE s.user_id = ANY(%s)",
        "agent_turns": "SELECT count(*) FROM agent_turns a JOIN sessions s ON s.id = "
        "a.session_id WHERE s.user_id = ANY(%s)",
        "steps": "SELECT count(*) FROM steps x JOIN sessions s ON s.id = x.session_id "
        "WHERE s.user_id = ANY(%s)",
    }
    out = {t: conn.execute(sql, (d.user_ids,)).fetchone()[0] for t, sql in q.items()}  # type: ignore[index]
    conn.commit()
    return out


# --------------------------------------------------------------------------------------------
# Comparing read models with Postgres


def differences(cql: Session, d: Dataset, read_models: tuple[str, ...] = READ_MODELS) -> list[str]:
    """Read models vs the SQL oracle (schemas/postgres/0008) on this dataset's users, sessions
    and agent turns (deleted ones too: a resurrected row shows as an extra); [] when equal."""
    return readmodels.differences(cql, d.user_ids, d.session_ids, d.agent_turn_ids, read_models)


def sstable_versions(keyspace: str) -> set[str]:
    """The SSTable versions ("nb", "oa"...) of a keyspace's files on the local stack's node."""
    data = stack.DATA / "cassandra" / "data" / keyspace
    return {p.name.split("-")[0] for p in data.glob("*/*-Data.db")}


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def bf_keyspace() -> Iterator[str]:
    """A keyspace of this module's own: the read-model schema, nothing else writing to it."""
    with own_keyspace("bftest") as ks:
        yield ks


@pytest.fixture(scope="module")
def bf_cql(bf_keyspace: str) -> Iterator[Session]:
    with scylla.session(get_settings().scylla, bf_keyspace) as session:
        yield session


@pytest.fixture()
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = random.randrange(1 << 30)
    print(f"{request.node.name}: seed {seed}")  # shown on failure, to replay the data
    return random.Random(seed)


# --------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize(
    ("method", "workers"),
    [("cql", 1), ("cql", 3), ("sstable", 1), ("sstable", 2)],
    ids=[
        "cql, one process",
        "cql, 3 loader processes",
        "sstable, one process",
        "sstable, 2 loader processes",
    ],
)
def test_backfill_reproduces_the_projection_of_postgres_exactly(
    method: str,
    workers: int,
    bf_keyspace: str,
    bf_cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    d = generate(pg_app, rng, users=60)
    counts = pg_counts(pg_app, d)
    assert counts["sessions"] >= 100 and counts["steps"] > 0

    result = backfill_flow(
        user_ids=d.users,
        chunk_size=97,
        readers=3,
        concurrency=32,
        workers=workers,
        method=method,
        snapshot_root=str(tmp_path),
        keyspace=bf_keyspace,
    )

    # The snapshot holds exactly the filtered rows, chunked by key range into Parquet files.
    manifest = Manifest.read(result["snapshot_dir"])
    assert {t: v["rows"] for t, v in manifest.tables.items()} == counts
    assert all(c.rows <= 97 for c in manifest.chunks)
    assert sum(c.rows for c in manifest.chunks) == sum(counts.values()) == result["rows_read"]
    assert manifest.slot["exists"] and manifest.slot["confirmed_flush_lsn"]
    assert all((Path(result["snapshot_dir"]) / c.file).is_file() for c in manifest.chunks)

    assert differences(bf_cql, d) == []
    if method == "sstable":
        # Streamed files are in the SSTable version the node writes itself: a Cassandra 5 node
        # in its default 4.x compatibility refuses to restart with 5.0 ("oa") files.
        streamed = sstable_versions(bf_keyspace)
        assert streamed and streamed <= sstable_versions("system"), streamed

    # Independent of the projection module: turns per session counted in SQL vs timeline rows,
    # steps per agent turn, and every cell stamped with its source row's version.
    per_session: dict[uuid.UUID, int] = dict(
        pg_app.execute(
            "SELECT session_id, count(*) FROM (SELECT session_id FROM human_turns UNION ALL "
            "SELECT session_id FROM agent_turns) t WHERE session_id = ANY(%s) GROUP BY 1",
            (d.session_ids,),
        ).fetchall()
    )
    for sid in d.session_ids:
        n = bf_cql.execute(
            "SELECT count(*) FROM conversation_timeline WHERE session_id = %s", (sid,)
        ).one()[0]
        assert n == per_session.get(sid, 0), sid
    versions = pg_app.execute(
        "SELECT id, session_id, created_at, content, updated_at FROM agent_turns "
        "WHERE session_id = ANY(%s)",
        (d.session_ids,),
    ).fetchall()
    pg_app.commit()
    for tid, sid, created, content, updated in rng.sample(versions, min(40, len(versions))):
        row = bf_cql.execute(
            "SELECT content, WRITETIME(content) AS wt FROM conversation_timeline WHERE "
            "session_id = %s AND created_at = %s AND created_at_micros = %s AND turn_id = %s",
            (
                sid,
                cql_timestamp(created),
                sub_millis(created.microsecond),
                tid,
            ),
        ).one()
        assert row is not None and row.content == content
        assert row.wt == (updated - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    sessions_per_user: dict[uuid.UUID, int] = dict(
        pg_app.execute(
            "SELECT user_id, count(*) FROM sessions WHERE user_id = ANY(%s) GROUP BY 1",
            (d.user_ids,),
        ).fetchall()
    )
    pg_app.commit()
    for user, n in sessions_per_user.items():
        assert (
            bf_cql.execute(
                "SELECT count(*) FROM recent_conversations WHERE user_id = %s", (user,)
            ).one()[0]
            == n
        )


def test_dry_run_plans_and_counts_without_writing(
    bf_keyspace: str,
    bf_cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    d = generate(pg_app, rng, users=5)
    counts = pg_counts(pg_app, d)
    result = backfill_flow(
        user_ids=d.users,
        chunk_size=7,
        dry_run=True,
        snapshot_root=str(tmp_path),
        keyspace=bf_keyspace,
    )
    assert result["dry_run"] is True
    assert {t: v["rows"] for t, v in result["tables"].items()} == counts
    assert {t: v["chunks"] for t, v in result["tables"].items()} == {
        t: math.ceil(n / 7) for t, n in counts.items()
    }
    assert list(tmp_path.iterdir()) == []  # no snapshot written
    for sid in d.session_ids:  # nothing loaded
        assert (
            bf_cql.execute("SELECT * FROM sessions_by_id WHERE session_id = %s", (sid,)).one()
            is None
        )


def test_created_at_filter_selects_rows_by_their_own_creation_time(
    bf_keyspace: str,
    bf_cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    d = generate(pg_app, rng, users=8, turns=(2, 6))
    start = datetime.now(UTC) - timedelta(days=20)
    end = start + timedelta(days=10)
    result = backfill_flow(
        user_ids=d.users,
        created_from=start.isoformat(),
        created_to=end.isoformat(),
        read_models=["sessions_by_id"],
        snapshot_root=str(tmp_path),
        keyspace=bf_keyspace,
    )
    inside = {
        r[0]
        for r in pg_app.execute(
            "SELECT id FROM sessions WHERE user_id = ANY(%s) AND created_at >= %s AND "
            "created_at < %s",
            (d.user_ids, start, end),
        ).fetchall()
    }
    pg_app.commit()
    assert 0 < len(inside) < len(d.session_ids)  # the window cuts the data (30 days wide)
    loaded = {
        sid
        for sid in d.session_ids
        if bf_cql.execute(
            "SELECT session_id FROM sessions_by_id WHERE session_id = %s", (sid,)
        ).one()
    }
    assert loaded == inside
    assert result["rows_read"] == len(inside)


# --------------------------------------------------------------------------------------------
# Alongside CDC


class Mutator(threading.Thread):
    """Inserts, updates and deletes in Postgres, as the app, until stopped."""

    def __init__(self, d: Dataset, seed: int) -> None:
        super().__init__(name="mutator", daemon=True)
        self.d, self.rng = d, random.Random(seed)
        self.stop = threading.Event()
        self.done: list[tuple[float, str]] = []  # (wall time, op) of ops that changed a row
        self.errors: list[BaseException] = []

    def _op(self, cur: psycopg.Cursor[Any]) -> str | None:
        r, d = self.rng, self.d
        kind = r.choices(
            [
                "human",
                "agent",
                "title",
                "content",
                "payload",
                "del_turn",
                "del_agent",
                "del_session",
                "new_session",
            ],
            weights=[5, 4, 4, 4, 3, 3, 2, 1, 1],
        )[0]
        sid = r.choice(d.session_ids)
        if kind == "human":
            hid = uuid.uuid4()
            cur.execute(
                "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
                (hid, sid, _text(r)),
            )
            d.human_turn_ids.append(hid)
        elif kind == "agent":
            aid = uuid.uuid4()
            cur.execute(
                "INSERT INTO agent_turns (id, session_id, content, model) VALUES "
                "(%s, %s, %s, 'm-3')",
                (aid, sid, _text(r)),
            )
            d.agent_turn_ids.append(aid)
            cur.execute(
                "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
                "VALUES (%s, %s, %s, 'tool', %s)",
                (uuid.uuid4(), aid, sid, Jsonb({"new": True})),
            )
        elif kind == "title":
            cur.execute("UPDATE sessions SET title = %s WHERE id = %s", (_text(r, 1, 3), sid))
        elif kind == "content":
            cur.execute(
                "UPDATE agent_turns SET content = %s WHERE id = %s",
                (_text(r), r.choice(d.agent_turn_ids)),
            )
        elif kind == "payload":
            cur.execute(
                "UPDATE steps SET payload = %s WHERE id = %s",
                (Jsonb({"edited": r.random()}), r.choice(d.step_ids)),
            )
        elif kind == "del_turn":
            cur.execute("DELETE FROM human_turns WHERE id = %s", (r.choice(d.human_turn_ids),))
        elif kind == "del_agent":  # cascades to its steps
            cur.execute("DELETE FROM agent_turns WHERE id = %s", (r.choice(d.agent_turn_ids),))
        elif kind == "del_session":  # cascades to turns and steps
            cur.execute("DELETE FROM sessions WHERE id = %s", (sid,))
        else:
            new = uuid.uuid4()
            cur.execute(
                "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'new')",
                (new, r.choice(d.user_ids)),
            )
            d.session_ids.append(new)
        return kind if cur.rowcount > 0 else None

    def run(self) -> None:
        try:
            with postgres.connect("app", get_settings().postgres) as conn, conn.cursor() as cur:
                while not self.stop.is_set():
                    try:
                        kind = self._op(cur)
                        conn.commit()
                        if kind:
                            self.done.append((time.time(), kind))
                    except psycopg.errors.ForeignKeyViolation:
                        conn.rollback()  # its session or turn was deleted meanwhile
                    time.sleep(0.003)
        except BaseException as exc:
            self.errors.append(exc)


def _run_with_mutator(
    d: Dataset, seed: int, fn: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], Mutator]:
    m = Mutator(d, seed)
    m.start()
    try:
        time.sleep(0.5)  # changes before the snapshot too
        result = fn()
        time.sleep(0.5)
    finally:
        m.stop.set()
        m.join(30)
    assert not m.errors, m.errors
    return result, m


@pytest.mark.parametrize("method", ["cql", "sstable"])
def test_backfill_while_postgres_changes_and_cdc_runs_converges(
    method: str,
    cdc_consumer: object,
    cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    d = generate(pg_app, rng, users=25)
    # Rate-limited so that the load overlaps the changes for a few seconds.
    result, m = _run_with_mutator(
        d,
        rng.randrange(1 << 30),
        lambda: backfill_flow(
            user_ids=d.users,
            chunk_size=60,
            rate_limit_rows_per_s=1500,
            method=method,
            snapshot_root=str(tmp_path),
        ),
    )
    snapshot_at = datetime.fromisoformat(
        Manifest.read(result["snapshot_dir"]).snapshot_time
    ).timestamp()
    kinds_after = {k for t, k in m.done if t > snapshot_at}
    assert {"del_turn", "del_agent", "title", "content"} <= kinds_after, m.done
    assert any(t < snapshot_at for t, _ in m.done)
    assert wait_for(lambda: differences(cql, d) == [], timeout=180, interval=1), differences(cql, d)


@pytest.mark.parametrize("method", ["cql", "sstable"])
def test_loading_an_old_snapshot_never_undoes_newer_changes(
    method: str,
    cdc_consumer: object,
    cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    d = generate(pg_app, rng, users=10, turns=(2, 10))
    first = backfill_flow(user_ids=d.users, chunk_size=50, snapshot_root=str(tmp_path))
    # After the snapshot: delete, update and insert, and let CDC apply it all.
    doomed = rng.sample(d.session_ids, len(d.session_ids) // 3)
    pg_app.execute("DELETE FROM sessions WHERE id = ANY(%s)", (doomed,))
    pg_app.execute(
        "UPDATE sessions SET title = 'renamed after the snapshot' WHERE id = ANY(%s)",
        (d.session_ids,),
    )
    pg_app.execute(
        "DELETE FROM human_turns WHERE id = ANY(%s)",
        (rng.sample(d.human_turn_ids, len(d.human_turn_ids) // 4),),
    )
    pg_app.execute(
        "UPDATE agent_turns SET content = 'edited after the snapshot' WHERE session_id = ANY(%s)",
        (d.session_ids,),
    )
    pg_app.commit()
    assert wait_for(lambda: differences(cql, d) == [], timeout=180, interval=1), differences(cql, d)
    # Replaying the older snapshot writes every row again, older versions all: they lose.
    again = backfill_flow(user_ids=d.users, snapshot_dir=first["snapshot_dir"], method=method)
    assert again["rows_written"] > 0 and again["snapshot_id"] == first["snapshot_id"]
    assert differences(cql, d) == []


@pytest.mark.parametrize("method", ["cql", "sstable"])
def test_rebuild_truncates_then_reloads_while_cdc_keeps_writing(
    method: str,
    bf_keyspace: str,
    bf_cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    """A CDC consumer of this test's own applies changes to the test keyspace throughout the
    truncate, the snapshot and the load."""
    from tasks.cdc.consumer import CdcConsumer, CdcOptions

    d = generate(pg_app, rng, users=10)
    stale_user, stale_session = d.user_ids[0], uuid.uuid4()  # in no Postgres table
    bf_cql.execute(
        "INSERT INTO recent_conversations (user_id, created_at, session_id, title) "
        "VALUES (%s, toTimestamp(now()), %s, 'stale')",
        (stale_user, stale_session),
    )
    settings = get_settings().kafka.model_copy(update={"consumer_group": f"bf-{uuid.uuid4()}"})
    session = scylla.connect(get_settings().scylla, bf_keyspace)
    # From the end of the topics: a new group would start from their beginning and replay the
    # whole history of the stack first (auto.offset.reset does not apply: the consumer picks
    # its start itself). A marker change seen in the keyspace proves the consumer is assigned
    # and positioned before anything this test changes.
    position_group_at_end(settings)
    consumer = CdcConsumer(
        scylla.ScyllaWriter(session, get_settings().scylla, keyspace=bf_keyspace),
        CdcOptions(report_interval_s=5),
        settings,
    )
    thread = threading.Thread(target=consumer.run, daemon=True)

    def marker_seen() -> bool:
        pg_app.execute(
            "UPDATE sessions SET title = %s WHERE id = %s",
            (f"marker {time.time()}", d.session_ids[-1]),
        )
        pg_app.commit()
        return (
            bf_cql.execute(
                "SELECT title FROM sessions_by_id WHERE session_id = %s", (d.session_ids[-1],)
            ).one()
            is not None
        )

    thread.start()
    try:
        assert wait_for(marker_seen, timeout=120, interval=1), "private CDC consumer idle"
        _run_with_mutator(
            d,
            rng.randrange(1 << 30),
            lambda: backfill_flow(
                user_ids=d.users,
                rebuild=True,
                chunk_size=40,
                rate_limit_rows_per_s=2000,
                method=method,
                snapshot_root=str(tmp_path),
                keyspace=bf_keyspace,
            ),
        )
        assert wait_for(lambda: differences(bf_cql, d) == [], timeout=240, interval=1), differences(
            bf_cql, d
        )
    finally:
        consumer.stop()
        thread.join(30)
        scylla.close(session)
    assert (
        bf_cql.execute(
            "SELECT * FROM recent_conversations WHERE user_id = %s AND "
            "session_id = %s ALLOW FILTERING",
            (stale_user, stale_session),
        ).one()
        is None
    )


# --------------------------------------------------------------------------------------------
# Resume, rate limit, parameters


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if proc_stat(entry.name).ppid == pid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def alive(pid: int) -> bool:
    try:  # a zombie has exited: only its entry waits for a reaper
        return proc_stat(pid).state != "Z"
    except OSError:
        return False


def descendants_of(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.parametrize("method", ["cql", "sstable"])
def test_killed_backfill_resumes_without_reloading_finished_chunks(
    method: str,
    bf_keyspace: str,
    bf_cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    d = generate(pg_app, rng, users=40)
    env = {
        **os.environ,
        "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"),
    }
    proc = subprocess.Popen(
        # Two loader processes: killing the flow's process must stop them too (no checkpoint
        # may land after the kill, or the resume would skip a chunk nobody saw finish).
        [
            sys.executable,
            "-m",
            "flows.backfill",
            "--user-ids",
            *d.users,
            "--chunk-size",
            "40",
            "--workers",
            "2",
            "--rate-limit-rows-per-s",
            "800",
            "--snapshot-root",
            str(tmp_path),
            "--keyspace",
            bf_keyspace,
            "--method",
            method,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: any(tmp_path.glob("*/manifest.json")), timeout=120), (
            "the snapshot never completed"
        )
        manifest = Manifest.read(next(tmp_path.glob("*/manifest.json")).parent)
        checkpoints = Checkpoints(bf_cql, get_settings().scylla, bf_keyspace)
        assert wait_for(
            lambda: len(checkpoints.loaded(manifest.snapshot_id, READ_MODELS)) >= 8,
            timeout=120,
            interval=0.05,
        )
        # The loader workers (and the rate limit's manager) are the flow process's children;
        # with the sstable method each worker has its JVM.
        children = descendants_of(proc.pid)
        assert len(children) >= (5 if method == "sstable" else 3), children
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # PR_SET_PDEATHSIG: they die with it, mid-chunk, instead of finishing their queue.
    assert wait_for(lambda: not any(alive(pid) for pid in children), timeout=5, interval=0.1), [
        pid for pid in children if alive(pid)
    ]
    time.sleep(1)  # a checkpoint already sent by the dead process may still land
    before = checkpoints.loaded(manifest.snapshot_id, READ_MODELS)
    time.sleep(2)
    assert checkpoints.loaded(manifest.snapshot_id, READ_MODELS) == before, (
        "a loader worker outlived the killed flow and kept loading"
    )
    assert 8 <= len(before) < len(manifest.chunks), "killed too late to test anything"

    result = backfill_flow(
        user_ids=d.users,
        resume=True,
        snapshot_root=str(tmp_path),
        keyspace=bf_keyspace,
        method=method,
    )

    assert result["snapshot_id"] == manifest.snapshot_id  # found the interrupted snapshot
    assert set(result["chunks_skipped"]) == set(before)
    assert not set(result["chunks_loaded"]) & set(before)
    rows_in = {c.id: c.rows for c in manifest.chunks}
    assert result["rows_read"] == manifest.rows - sum(rows_in[c] for c in before)
    after = checkpoints.loaded(manifest.snapshot_id, READ_MODELS)
    assert set(after) == set(rows_in)
    assert all(after[c] == before[c] for c in before)  # not loaded a second time
    assert differences(bf_cql, d) == []


def test_sstable_writer_killed_mid_load_is_retried_and_resumed(
    monkeypatch: pytest.MonkeyPatch,
    bf_keyspace: str,
    bf_cql: Session,
    pg_app: psycopg.Connection,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    """The JVM that writes and streams SSTables dies (OOM killer, a kill -9): the load task
    fails with a transient error, Prefect retries it, the retry resumes from the chunks
    already checkpointed, and the read models end exact."""
    d = generate(pg_app, rng, users=30)
    me = os.getpid()

    def writer_jvms() -> list[int]:
        out = []
        for pid in descendants_of(me):
            try:
                if b"SSTableBulkWriter" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                continue  # ended meanwhile
        return out

    checkpoints = Checkpoints(bf_cql, get_settings().scylla, bf_keyspace)
    killed: list[int] = []

    def kill_after_some_chunks() -> None:
        manifests = lambda: list(tmp_path.glob("*/manifest.json"))  # noqa: E731
        if not wait_for(lambda: bool(manifests()), timeout=120):
            return
        snapshot_id = Manifest.read(manifests()[0].parent).snapshot_id
        if wait_for(
            lambda: len(checkpoints.loaded(snapshot_id, READ_MODELS)) >= 4,
            timeout=120,
            interval=0.05,
        ):
            for pid in writer_jvms():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    # The retry is what is tested, not its delay: no 10 s pause before it.
    monkeypatch.setattr(
        backfill, "load_snapshot", backfill.load_snapshot.with_options(retry_delay_seconds=0)
    )
    killer = threading.Thread(target=kill_after_some_chunks, daemon=True)
    killer.start()
    result = backfill_flow(
        user_ids=d.users,
        chunk_size=40,
        rate_limit_rows_per_s=1500,
        method="sstable",
        snapshot_root=str(tmp_path),
        keyspace=bf_keyspace,
    )
    killer.join(5)
    assert killed, "the SSTable writer was never seen to kill"
    manifest = Manifest.read(result["snapshot_dir"])
    # The retry skipped what the first attempt had checkpointed, and loaded the rest.
    assert result["chunks_skipped"] and result["chunks_loaded"]
    assert set(result["chunks_skipped"]) | set(result["chunks_loaded"]) == {
        c.id for c in manifest.chunks
    }
    assert differences(bf_cql, d) == []
    assert not writer_jvms()  # the retry's JVM ended with its load


def test_rate_limit_holds(
    bf_keyspace: str, pg_app: psycopg.Connection, tmp_path: Path, rng: random.Random
) -> None:
    # Well under what the loader sustains on a busy 2-core CI machine with the whole stack
    # running, so that the limiter, not the machine, sets the pace (docs/decisions.md).
    limit = 500.0
    d = generate(pg_app, rng, users=20, sessions_per_user=(5, 5), turns=(50, 50), steps=(0, 0))
    result = backfill_flow(
        user_ids=d.users,
        read_models=["conversation_timeline"],
        chunk_size=1000,
        rate_limit_rows_per_s=limit,
        snapshot_root=str(tmp_path),
        keyspace=bf_keyspace,
    )
    assert result["rows_written"] == 5_000  # ~10 s at the limit
    rate = result["rows_written"] / result["load_seconds"]
    print(
        f"rate limit {limit:.0f} rows/s: measured {rate:.0f} rows/s "
        f"({100 * (rate / limit - 1):+.1f} %) over {result['load_seconds']:.2f} s"
    )
    assert abs(rate / limit - 1) <= 0.10


def test_bad_parameters_fail_before_anything_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def touched(*_: object, **__: object) -> None:
        raise AssertionError("a service was used before the parameters were validated")

    monkeypatch.setattr(postgres, "connect", touched)
    monkeypatch.setattr(postgres, "slot_status", touched)
    monkeypatch.setattr(scylla, "connect", touched)
    for params, message in (
        ({"read_models": ["conversation_timeline", "no_such_model"]}, "unknown read model"),
        ({"chunk_size": 0}, "chunk_size: Input should be greater than 0"),
        ({"concurrency": -3}, "concurrency: Input should be greater than 0"),
        ({"rate_limit_rows_per_s": 0}, "rate_limit_rows_per_s: Input should be greater"),
        ({"user_ids": [str(uuid.uuid4()), "42"]}, "user_ids.1: Input should be a valid UUID"),
        ({"method": "bulk"}, "method: Input should be 'cql' or 'sstable'"),
    ):
        with pytest.raises(ConfigurationError, match=message):
            backfill_flow(snapshot_root=str(tmp_path), **params)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_sstable_method_without_its_jars_fails_before_the_snapshot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(get_settings().sstable, "classpath", str(tmp_path / "nothing") + "/*")
    with pytest.raises(ConfigurationError, match=r"no cassandra-all-\*\.jar .*CQRS_SSTABLE"):
        backfill_flow(
            user_ids=[str(uuid.uuid4())],
            method="sstable",
            snapshot_root=str(tmp_path / "snapshots"),
        )
    assert not (tmp_path / "snapshots").exists()


def test_gap_rule_refuses_without_the_cdc_slot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(get_settings().postgres, "slot_name", f"missing_{uuid.uuid4().hex}")
    with pytest.raises(ConfigurationError, match=r"does not exist.*gap"):
        backfill_flow(user_ids=[str(uuid.uuid4())], snapshot_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    # Told there is no CDC, it goes ahead (here: a dry run of nobody's rows).
    result = backfill_flow(
        user_ids=[str(uuid.uuid4())], no_cdc=True, dry_run=True, snapshot_root=str(tmp_path)
    )
    assert all(v["rows"] == 0 for v in result["tables"].values())


def test_manifest_is_self_describing(
    pg_app: psycopg.Connection, tmp_path: Path, rng: random.Random, bf_keyspace: str
) -> None:
    d = generate(pg_app, rng, users=3)
    result = backfill_flow(user_ids=d.users, snapshot_root=str(tmp_path), keyspace=bf_keyspace)
    raw = json.loads((Path(result["snapshot_dir"]) / "manifest.json").read_text())
    assert set(raw["filter"]["user_ids"]) == set(d.users)
    assert {"snapshot_time", "wal_lsn", "slot", "tables", "chunks", "chunk_size"} <= set(raw)

    def lsn(text: str) -> int:
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) + int(lo, 16)

    # The slot had confirmed no further than the snapshot's WAL position: CDC continues from
    # at or before the snapshot, so no commit falls between the two.
    assert lsn(raw["slot"]["confirmed_flush_lsn"]) <= lsn(raw["wal_lsn"])
    for c in raw["chunks"]:
        assert {"table", "lo", "hi", "rows", "file"} <= set(c)
