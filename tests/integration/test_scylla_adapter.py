"""The Scylla adapter against the real store: what a schema mistake and an unencodable value
raise, and that batches stay under the server's batch-size warning while a row of any size
(1 MiB included) is still written by the CDC, backfill and dual-write paths."""

from __future__ import annotations

import json
import logging
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import Session
from cassandra.query import BatchStatement

from tasks.adapters import scylla
from tasks.adapters.replica_batches import bound_bytes
from tasks.adapters.scylla import ScyllaWriter
from tasks.backfill.cql_writes import PipelinedWriter
from tasks.core.cql import to_cql
from tasks.core.errors import RejectedData, TerminalError, TransientError, is_transient
from tasks.core.projection import Delete, Mutation, Upsert, project_row
from tasks.dual_write.read_model import ScyllaHandle
from tasks.settings import get_settings
from tests.integration.conftest import own_keyspace
from tests.integration.stall_proxy import StallProxy

CFG = get_settings()

BATCH_WARNING = "exceeding specified threshold"


@pytest.fixture(scope="module")
def ks() -> Iterator[str]:
    with own_keyspace("adapter") as name:
        yield name


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    with scylla.session(CFG.scylla) as s:
        yield s


class ServerWarnings(logging.Handler):
    """The server's warnings as the driver logs them (one line per warning of a response)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def server_warnings() -> Iterator[list[str]]:
    handler = ServerWarnings()
    logger = logging.getLogger("cassandra.protocol")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


_T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _turn(content: str, session_id: uuid.UUID | None = None, n: int = 0) -> Upsert:
    return Upsert(
        "conversation_timeline",
        (
            ("session_id", session_id or uuid.uuid4()),
            ("created_at", _T0 + timedelta(milliseconds=n)),
            ("created_at_micros", n),
            ("turn_id", uuid.uuid4()),
        ),
        (("role", "agent"), ("content", content), ("model", "m-" * (n % 7))),
        1_700_000_000_000_000 + n,
    )


def _contents(rng: random.Random, n: int) -> list[str]:
    """Sizes from empty to over the 5 KiB warning, with non-ASCII text (several bytes a
    character in UTF-8) among them."""
    sizes = [0, 1, 10, 100, 400, 1000, 2000, 3000, 3900, 4100, 5000, 5200, 9000]
    out = []
    for i in range(n):
        size = rng.choice(sizes) if i % 3 else rng.randint(0, 1500)
        out.append(("é€😀x"[i % 4]) * size)
    return out


def _mixed(rng: random.Random, n: int) -> list[Mutation]:
    """What CDC and backfill write, for every read model: the projection of sessions, turns
    and steps with text from empty to 9 KB, nulls, and deletes of some of those rows."""
    out: list[Mutation] = []
    sizes = [0, 0, 1, 20, 300, 1000, 3000, 4900, 5200, 9000]
    user = uuid.uuid4()
    for i in range(n):
        u, t = uuid.uuid4(), _T0 + timedelta(seconds=i)
        text = "é" * (rng.choice(sizes) // 2)
        base = {"id": u, "session_id": u, "created_at": t, "updated_at": t + timedelta(1)}
        table, row = rng.choice(
            [
                (
                    "sessions",
                    {
                        **base,
                        "user_id": user,
                        "title": text[:200],
                        "last_message": text,
                        "last_message_at": None if i % 2 else t,
                        "turn_count": i,
                    },
                ),
                ("human_turns", {**base, "content": text}),
                ("agent_turns", {**base, "content": text, "model": "m" * (i % 30)}),
                (
                    "steps",
                    {
                        **base,
                        "agent_turn_id": user,
                        "kind": "tool",
                        "payload": json.dumps({"text": text}),
                    },
                ),
            ]
        )
        for m in project_row(table, row):
            out.append(m)
            if i % 5 == 0:
                out.append(Delete(m.read_model, m.key, m.timestamp_us + 1))
    return out


def _headers(rng: random.Random, n: int) -> list[Upsert]:
    """Session headers as a chat's turns update them (both session read models): small rows,
    mostly fixed-size values, the mix whose batches the old estimate let past 5 KiB."""
    out: list[Upsert] = []
    for i in range(n):
        u, t = uuid.uuid4(), _T0 + timedelta(seconds=i)
        out.extend(
            project_row(
                "sessions",
                {
                    "id": u,
                    "user_id": uuid.uuid4(),
                    "created_at": t,
                    "updated_at": t,
                    "title": "t" * rng.randint(0, 40),
                    "last_message": "m" * rng.randint(0, 150),
                    "last_message_at": t,
                    "turn_count": i,
                },
            )
        )
    return out


def _stored(session: Session, ks: str, m: Upsert) -> str | None:
    key = dict(m.key)
    row = session.execute(
        f"SELECT content FROM {ks}.conversation_timeline WHERE session_id = %s AND "
        f"created_at = %s AND created_at_micros = %s AND turn_id = %s",
        (key["session_id"], key["created_at"], key["created_at_micros"], key["turn_id"]),
    ).one()
    return None if row is None else str(row.content)


# --------------------------------------------------------------------------------------------
# Errors


def test_write_to_an_unconfigured_table_is_terminal_and_names_it(session: Session) -> None:
    bare = f"adapter_bare_{uuid.uuid4().hex[:8]}"  # a keyspace whose migrations never ran
    session.execute(
        f"CREATE KEYSPACE {bare} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    try:
        for call in ("write", "write_batch"):
            writer = ScyllaWriter(session, CFG.scylla, keyspace=bare)
            with pytest.raises(TerminalError, match="conversation_timeline") as info:
                getattr(writer, call)([_turn("a"), _turn("b")])
            assert not is_transient(info.value), info.value
            assert not isinstance(info.value, (TransientError, RejectedData))
            # Cassandra 5 says "table ... does not exist", older ones and Scylla
            # "unconfigured table ...".
            assert re.search(r"unconfigured table|does not exist", str(info.value))
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {bare}", timeout=120)


@pytest.mark.parametrize("call", ["write", "write_batch", "write_with_timeout"])
def test_a_lone_surrogate_is_rejected_data_and_nothing_is_sent(
    session: Session, ks: str, call: str
) -> None:
    writer = ScyllaWriter(session, CFG.scylla, keyspace=ks)
    good, bad = _turn("fine"), _turn("half a pair: \ud800")
    method = writer.write if call == "write_with_timeout" else getattr(writer, call)
    args: tuple[Any, ...] = (5.0,) if call == "write_with_timeout" else ()
    with pytest.raises(RejectedData, match="content") as info:
        method([good, bad], *args)
    assert info.value.index == 1
    assert _stored(session, ks, good) is None  # bound first, so nothing was sent
    assert writer.write([good]) == 1  # the others can be written
    assert _stored(session, ks, good) == "fine"


# --------------------------------------------------------------------------------------------
# Batch sizes


def test_the_estimate_bounds_what_the_server_counts(session: Session, ks: str) -> None:
    """Over-full batches on purpose: every size the server reports in its warning is at most
    what ``bound_bytes`` counted for that batch with the statement's size plan, and close to
    it, for every read model (turns, session headers, deletes)."""
    writer = ScyllaWriter(
        session, CFG.scylla, keyspace=ks, replica_batch_rows=40, batch_max_bytes=40_000
    )
    # The keyspace was made by another session: without its schema the writer would size
    # batches without a plan (every value as a cell), which this test is not about.
    session.cluster.refresh_schema_metadata()
    rng = random.Random(7)
    checked: Counter[str] = Counter()
    sets: dict[str, Callable[[], Sequence[Mutation]]] = {
        "turns": lambda: [_turn(c, n=i) for i, c in enumerate(_contents(rng, 30))],
        "headers": lambda: _headers(rng, 60),
        "mixed": lambda: _mixed(rng, 80),
    }
    for name, make in sets.items():
        for _ in range(6):
            for request in writer.requests(writer.bound(make())):
                if not isinstance(request, BatchStatement):
                    continue
                by_id = {p.query_id: p for p in writer._prepared.values()}
                plans = [
                    writer._size_plan(by_id[q]) for _, q, _ in request._statements_and_parameters
                ]
                assert all(plans), "the writer sizes by the schema it knows"
                estimate = sum(
                    bound_bytes(values, plan)
                    for (_, _, values), plan in zip(
                        request._statements_and_parameters, plans, strict=True
                    )
                )
                future = session.execute_async(request)
                future.result()
                for warning in future.warnings or []:
                    if BATCH_WARNING in warning:
                        server = int(warning.split(" is of size ")[1].split(",")[0])
                        n = len(plans)
                        assert server <= estimate, (name, server, estimate, warning)
                        if name != "mixed":
                            # And tight for upserts: at most 16 bytes a statement above it
                            # (a delete or a null is counted as the largest it could be).
                            assert estimate <= server + 16 * n, (name, server, estimate, n)
                        checked[name] += 1
    # The server did warn about each kind, and they were compared.
    assert min(checked[name] for name in sets) >= 3, checked


# The default, and the largest a backfill may ask for (CQRS_SCYLLA_BATCH_ROWS allows 500).
@pytest.mark.parametrize("batch_rows", [100, 500])
def test_cdc_writes_raise_no_batch_size_warning(
    session: Session, ks: str, batch_rows: int, server_warnings: list[str]
) -> None:
    writer = ScyllaWriter(
        session, CFG.scylla, keyspace=ks, replica_batch_rows=batch_rows
    )  # as the CDC consumer's
    rng = random.Random(11)
    for _ in range(3):
        sid = uuid.uuid4()
        # Several rows of one partition and many partitions, of many sizes.
        turns = [_turn(c, sid if i % 4 == 0 else None, i) for i, c in enumerate(_contents(rng, 60))]
        mutations = turns + _mixed(rng, 150) + _headers(rng, 100)
        assert writer.write(mutations) == len(mutations)
        assert _stored(session, ks, turns[-1]) == dict(turns[-1].values)["content"]
        # A burst of header updates, one read model after the other.
        headers = sorted(_headers(rng, 100), key=lambda m: m.read_model)
        assert writer.write(headers) == len(headers)
    assert not [w for w in server_warnings if BATCH_WARNING in w], server_warnings


@pytest.mark.parametrize("batch_rows", [100, 500])
def test_backfill_writes_raise_no_batch_size_warning(
    session: Session, ks: str, batch_rows: int, server_warnings: list[str]
) -> None:
    pipelined = PipelinedWriter(
        ScyllaWriter(session, CFG.scylla, keyspace=ks, replica_batch_rows=batch_rows)
    )
    rng = random.Random(13)
    turns = [_turn(c, n=i) for i, c in enumerate(_contents(rng, 300))]
    # The backfill writes current rows only: upserts, one statement text at a time.
    mutations = turns + [m for m in _mixed(rng, 400) if isinstance(m, Upsert)] + _headers(rng, 200)
    by_cql: dict[str, list[Sequence[Any]]] = {}
    for m in mutations:
        cql, params = to_cql(m, ks)
        by_cql.setdefault(cql, []).append(params)
    for cql, rows in by_cql.items():
        pipelined.submit_rows(cql, rows)
    pipelined.flush()
    assert _stored(session, ks, turns[0]) == dict(turns[0].values)["content"]
    assert not [w for w in server_warnings if BATCH_WARNING in w], server_warnings


def test_a_1_mib_turn_is_written_by_cdc_backfill_and_dual_write(
    session: Session, ks: str, server_warnings: list[str]
) -> None:
    big = "t" * (1 << 20)
    writer = ScyllaWriter(session, CFG.scylla, keyspace=ks)
    # CDC: among small rows of the same replicas.
    cdc = [_turn("small", n=1), _turn(big, n=2), _turn("small", n=3)]
    writer.write(cdc)
    # Backfill.
    backfill = _turn(big, n=4)
    pipelined = PipelinedWriter(writer)
    cql, params = to_cql(backfill, ks)
    pipelined.submit_rows(cql, [params, to_cql(_turn("x", n=5), ks)[1]])
    pipelined.flush()
    # Dual-write: the handle sends it as separate writes within its deadline.
    dual = _turn(big, n=6)
    handle = ScyllaHandle(CFG.scylla, writer)
    try:
        handle.write([dual, _turn("y", n=7)], deadline_s=10.0)
    finally:
        handle.close()
    for m in (cdc[1], backfill, dual):
        assert _stored(session, ks, m) == big
    assert not [w for w in server_warnings if BATCH_WARNING in w], server_warnings


def test_a_reply_that_never_comes_fails_by_the_request_deadline_then_writes_resume(
    ks: str,
) -> None:
    """A node that holds its replies with every connection open: the consumer's write and
    the audit's reads fail with the driver's request timeout (a TransientError the caller
    retries), never wait for ever, and work again once the replies flow. Before, both went
    through the driver's execute_concurrent, which sends with no deadline at all: the write
    hung until a heartbeat on an idle connection failed, or for ever if heartbeats got
    through (docs/decisions.md, "Every Scylla request has a deadline")."""
    deadline_s = 2.0
    with StallProxy((CFG.scylla.contact_points[0], CFG.scylla.port)) as proxy:
        cfg = CFG.scylla.model_copy(
            update={
                "contact_points": ["127.0.0.1"],
                "port": proxy.port,
                "request_timeout_s": deadline_s,
            }
        )
        with scylla.session(cfg, ks) as through_proxy:
            writer = ScyllaWriter(through_proxy, cfg, keyspace=ks)
            sid = uuid.uuid4()
            before = [_turn("before", sid, n) for n in range(3)]
            assert writer.write(before) == 3

            def write_stalled() -> BaseException | None:
                try:
                    writer.write([_turn("while stalled", sid, n) for n in range(3, 40)])
                except BaseException as exc:
                    return exc
                return None

            stmt = through_proxy.prepare(
                f"SELECT turn_id FROM {ks}.conversation_timeline WHERE session_id = ?"
            )

            def read_stalled() -> BaseException | None:
                try:
                    list(scylla.execute_windowed(through_proxy, [(stmt, (sid,))] * 4, 2))
                except BaseException as exc:
                    return exc
                return None

            proxy.stall()
            try:
                with ThreadPoolExecutor(2) as pool:
                    write, read = pool.submit(write_stalled), pool.submit(read_stalled)
                    # Far below the heartbeat's 30 s idle interval plus 30 s timeout, which
                    # would end a request sent without a deadline.
                    write_error = write.result(timeout=20)
                    read_error = read.result(timeout=20)
            finally:
                proxy.release()
            assert isinstance(write_error, TransientError), repr(write_error)
            assert isinstance(write_error.__cause__, OperationTimedOut), repr(write_error.__cause__)
            assert isinstance(read_error, OperationTimedOut), repr(read_error)

            # The replies flow again: the same session writes and reads.
            after = [_turn("after", sid, n) for n in range(40, 43)]
            assert writer.write(after) == 3
            rows = through_proxy.execute(
                f"SELECT content FROM {ks}.conversation_timeline WHERE session_id = %s", (sid,)
            )
            contents = [r.content for r in rows]
            assert contents.count("before") == 3 and contents.count("after") == 3, contents
