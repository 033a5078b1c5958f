"""CDC on the real stack: Postgres → Debezium → Kafka → CDC consumer → Cassandra."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from support.cdc_probe import position_group_at_end
from tasks.adapters import kafka, postgres, scylla
from tasks.cdc.consumer import CdcConsumer, CdcOptions
from tasks.settings import get_settings
from tests.integration.readmodels import agree, differences, wait_for

CFG = get_settings()
ROOT = Path(__file__).resolve().parents[2]


def assert_converged(
    cql: Any,
    session_ids: list[uuid.UUID],
    user_ids: list[uuid.UUID],
    timeout: float = 60,
    agent_turns: tuple[uuid.UUID, ...] = (),
) -> None:
    """The read models of these sessions and users (and of these agent turns' steps) equal
    the SQL oracle, within timeout."""
    if wait_for(lambda: agree(cql, user_ids, session_ids, agent_turns), timeout):
        return
    assert differences(cql, user_ids, session_ids, agent_turns) == [], f"after {timeout}s"


def test_every_table_insert_update_delete_reaches_read_models(cdc_consumer, pg_app, cql) -> None:
    user, other_user = uuid.uuid4(), uuid.uuid4()
    s1, s2 = uuid.uuid4(), uuid.uuid4()
    h1, h2, a1 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    st1, st2 = uuid.uuid4(), uuid.uuid4()
    # Incompressible and over 2 kB: stored out of line (TOAST), so an update that leaves it
    # unchanged reaches Debezium as the unavailable-value placeholder.
    big = secrets.token_hex(10_000)
    with pg_app.transaction():
        pg_app.execute(
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'one'), (%s, %s, 'two')",
            (s1, user, s2, user),
        )
    pg_app.execute(
        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, 'hi')", (h1, s1)
    )
    pg_app.execute(
        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, 'bye')", (h2, s1)
    )
    pg_app.execute(
        "INSERT INTO agent_turns (id, session_id, content, model) VALUES (%s, %s, %s, 'm1')",
        (a1, s1, big),
    )
    pg_app.execute(
        "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) VALUES "
        "(%s, %s, %s, 'tool_call', '{\"b\": 2, \"a\": [1, 2]}'), "
        "(%s, %s, %s, 'answer', '{}')",
        (st1, a1, s1, st2, a1, s1),
    )
    pg_app.commit()
    # Updates, including an unchanged TOASTed column (Debezium may send the placeholder)...
    pg_app.execute("UPDATE agent_turns SET model = 'm2' WHERE id = %s", (a1,))
    pg_app.execute("UPDATE sessions SET title = 'renamed' WHERE id = %s", (s1,))
    pg_app.execute("UPDATE steps SET payload = '{\"done\": true}' WHERE id = %s", (st1,))
    # ...key changes (the read-model row moves: delete + create)...
    pg_app.execute(
        "UPDATE human_turns SET created_at = created_at - interval '1 hour' WHERE id = %s", (h2,)
    )
    pg_app.execute("UPDATE sessions SET user_id = %s WHERE id = %s", (other_user, s2))
    pg_app.commit()
    # ...and deletes, direct and cascaded.
    pg_app.execute("DELETE FROM human_turns WHERE id = %s", (h1,))
    pg_app.execute("DELETE FROM steps WHERE id = %s", (st2,))
    pg_app.commit()
    assert_converged(cql, [s1, s2], [user, other_user], agent_turns=(a1,))

    timeline = {
        r.turn_id: r
        for r in cql.execute("SELECT * FROM conversation_timeline WHERE session_id = %s", (s1,))
    }
    assert set(timeline) == {h2, a1}
    assert timeline[a1].content == big and timeline[a1].model == "m2"
    header = cql.execute("SELECT * FROM sessions_by_id WHERE session_id = %s", (s1,)).one()
    assert (header.title, header.turn_count) == ("renamed", 2)
    assert not list(
        cql.execute(
            "SELECT * FROM recent_conversations WHERE user_id = %s "
            "AND created_at > '2000-01-01' AND session_id = %s ALLOW FILTERING",
            (user, s2),
        )
    )
    steps = {
        r.step_id: r
        for r in cql.execute("SELECT * FROM steps_by_turn WHERE agent_turn_id = %s", (a1,))
    }
    assert set(steps) == {st1} and json.loads(steps[st1].payload) == {"done": True}

    pg_app.execute("DELETE FROM sessions WHERE id = %s", (s1,))
    pg_app.commit()
    assert_converged(cql, [s1, s2], [user, other_user], agent_turns=(a1,))
    assert cql.execute("SELECT * FROM sessions_by_id WHERE session_id = %s", (s1,)).one() is None
    assert not list(cql.execute("SELECT * FROM conversation_timeline WHERE session_id = %s", (s1,)))
    assert not list(cql.execute("SELECT * FROM steps_by_turn WHERE agent_turn_id = %s", (a1,)))


# ------------------------------------------------------------------------ poison messages


def _real_event() -> tuple[bytes, bytes]:
    """One genuine Debezium message from the sessions topic, to replay into a test topic."""
    topic = get_settings().kafka.topic("sessions")
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    c.assign(
        [
            TopicPartition(topic, p, 0)
            for p in c.list_topics(topic, timeout=10).topics[topic].partitions
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            key, value = msg.key(), msg.value()
            if key is not None and value is not None and json.loads(value).get("op") == "c":
                return key, value
    finally:
        c.close()
    raise AssertionError("no real Debezium event found on the sessions topic")


def test_poison_messages_go_to_dead_letter_topic_and_consumption_goes_on(cql) -> None:
    settings = get_settings()
    suffix = uuid.uuid4().hex[:8]
    topic = f"{settings.kafka.topic_prefix}.public.poison{suffix}"
    dlq = f"test-dlq-{suffix}"
    admin = kafka.admin(CFG.kafka)
    for fut in admin.create_topics([NewTopic(topic, 1, 1), NewTopic(dlq, 1, 1)]).values():
        fut.result()
    key, value = _real_event()
    real = json.loads(value)
    real["source"]["table"] = "sessions"
    # A row of its own: the replayed event's row may have been deleted since, and its
    # tombstone would rightly shadow the replay.
    real["after"]["id"] = str(uuid.uuid4())
    wrong_type = json.loads(value)
    wrong_type["after"]["user_id"] = 12345
    unknown_op = json.loads(value)
    unknown_op["op"] = "x"
    poison = [
        b"{not json",
        json.dumps(wrong_type).encode(),
        json.dumps(unknown_op).encode(),
        # Over the consumer's 16 MiB cap (which no change within the write model's caps
        # reaches), within the broker's 17 MiB.
        b'{"after": {"id": "' + b"a" * (16 * 1024 * 1024 + 1024) + b'"}}',
    ]
    p = Producer(kafka.producer_config(CFG.kafka, **{"message.max.bytes": 17 * 1024 * 1024}))
    for v in poison:
        p.produce(topic, key=key, value=v)
    p.produce(topic, key=key, value=json.dumps(real).encode())
    assert p.flush(30) == 0

    ks = settings.kafka.model_copy(
        update={"consumer_group": f"t-{suffix}", "dead_letter_topic": dlq}
    )
    with scylla.session(CFG.scylla, CFG.scylla.keyspace) as session:
        consumer = CdcConsumer(
            scylla.ScyllaWriter(session, CFG.scylla), CdcOptions(max_messages=5), ks
        )
        result = consumer.run(topics=[topic])
    assert result.messages == 5 and result.dead_lettered == 4 and result.changes == 1

    # The valid event after the poison was applied.
    row_id = uuid.UUID(real["after"]["id"])
    assert (
        cql.execute("SELECT title FROM sessions_by_id WHERE session_id = %s", (row_id,)).one()
        is not None
    )
    # Every poison message is in the DLQ, byte for byte, with the error and its origin.
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    c.assign([TopicPartition(dlq, 0, 0)])
    got: list[Message] = []
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is not None and not msg.error():
            got.append(msg)
    c.close()
    assert [m.value() for m in got] == poison

    def headers_of(m: Message) -> dict[str, str]:
        raw = m.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in pairs}

    for offset, m in enumerate(got):
        headers = headers_of(m)
        assert headers["dlq.source.topic"] == topic
        assert headers["dlq.source.partition"] == "0"
        assert headers["dlq.source.offset"] == str(offset)
        assert headers["dlq.error"]
    errors = [headers_of(m)["dlq.error"].lower() for m in got]
    assert "json" in errors[0]
    assert "user_id" in errors[1]
    assert "op" in errors[2]
    assert "large" in errors[3] or "bytes" in errors[3]


# ------------------------------------------------------------------------ crash and restart


def start_group_at_end(group: str) -> None:
    position_group_at_end(get_settings().kafka.model_copy(update={"consumer_group": group}))


def group_lag(group: str) -> int:
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": group}))
    lag = 0
    try:
        for topic in kafka.change_topics(CFG.kafka):
            parts = [
                TopicPartition(topic, p)
                for p in c.list_topics(topic, timeout=10).topics[topic].partitions
            ]
            for tp in c.committed(parts, timeout=10):
                _low, high = c.get_watermark_offsets(tp, timeout=10)
                lag += high - max(tp.offset, 0)
    finally:
        c.close()
    return lag


def spawn_cdc(group: str, log: Path) -> subprocess.Popen[bytes]:
    # A killed member's partitions move after the session timeout: the smallest the broker
    # accepts, rather than the default 45 s of waiting.
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO", "CQRS_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cdc",
            "--consumer-group",
            group,
            "--batch-size",
            "500",
            "--report-interval-s",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def write_changes(n_changes: int, users: list[uuid.UUID]) -> list[uuid.UUID]:
    """Write about n_changes row changes (inserts, updates, deletes over all four tables)."""
    import random

    rnd = random.Random(7)
    sessions: list[uuid.UUID] = []
    every_session: list[uuid.UUID] = []  # deleted ones too: they must be gone from Scylla
    turns: dict[uuid.UUID, list[uuid.UUID]] = {}
    done = 0
    with postgres.connect("app", CFG.postgres) as conn:
        while done < n_changes:
            # Pipeline mode: one round trip per transaction instead of one per statement.
            with conn.pipeline(), conn.transaction():
                for _ in range(25):
                    r = rnd.random()
                    if r < 0.15 or not sessions:
                        sid = uuid.uuid4()
                        conn.execute(
                            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s)",
                            (sid, rnd.choice(users), f"s{done}"),
                        )
                        sessions.append(sid)
                        every_session.append(sid)
                        turns[sid] = []
                        done += 1
                    elif r < 0.55:
                        sid = rnd.choice(sessions)
                        tid = uuid.uuid4()
                        table = rnd.choice(["human_turns", "agent_turns"])
                        conn.execute(
                            f"INSERT INTO {table} (id, session_id, content) VALUES (%s, %s, %s)",
                            (tid, sid, f"turn {done}"),
                        )
                        if table == "agent_turns":
                            turns[sid].append(tid)
                        done += 2  # the turn and the session header it updates
                    elif r < 0.75:
                        sid = rnd.choice(sessions)
                        if turns[sid]:
                            conn.execute(
                                "INSERT INTO steps (id, agent_turn_id, session_id, "
                                "kind, payload) VALUES (%s, %s, %s, 'tool', %s)",
                                (
                                    uuid.uuid4(),
                                    rnd.choice(turns[sid]),
                                    sid,
                                    json.dumps({"n": done}),
                                ),
                            )
                            done += 1
                    elif r < 0.95:
                        sid = rnd.choice(sessions)
                        conn.execute(
                            "UPDATE sessions SET title = %s WHERE id = %s", (f"t{done}", sid)
                        )
                        done += 1
                    else:
                        sid = sessions.pop(rnd.randrange(len(sessions)))
                        conn.execute("DELETE FROM sessions WHERE id = %s", (sid,))
                        done += 1 + len(turns.pop(sid))
    return every_session


def independent_mismatches(
    pg: psycopg.Connection, cql: Any, session_ids: list[uuid.UUID]
) -> list[str]:
    """Compare Postgres and Cassandra with plain queries, without the projection module."""
    problems = []
    for sid in session_ids:
        srow = pg.execute(
            "SELECT user_id, title, turn_count FROM sessions WHERE id = %s", (sid,)
        ).fetchone()
        header = cql.execute(
            "SELECT user_id, title, turn_count FROM sessions_by_id WHERE session_id = %s", (sid,)
        ).one()
        if srow is None:
            if header is not None:
                problems.append(f"session {sid} deleted in Postgres but in sessions_by_id")
        elif header is None or tuple(header) != tuple(srow):
            problems.append(f"session {sid}: Postgres {srow} vs sessions_by_id {header}")
        pg_turns = set(
            pg.execute(
                "SELECT id, content FROM human_turns WHERE session_id = %(s)s UNION ALL "
                "SELECT id, content FROM agent_turns WHERE session_id = %(s)s",
                {"s": sid},
            )
        )
        cql_turns = {
            (r.turn_id, r.content)
            for r in cql.execute(
                "SELECT turn_id, content FROM conversation_timeline WHERE session_id = %s", (sid,)
            )
        }
        if pg_turns != cql_turns:
            problems.append(
                f"session {sid}: {len(pg_turns)} turns in Postgres, "
                f"{len(cql_turns)} in the timeline"
            )
        for (tid,) in pg.execute("SELECT id FROM agent_turns WHERE session_id = %s", (sid,)):
            pg_steps = {
                r[0] for r in pg.execute("SELECT id FROM steps WHERE agent_turn_id = %s", (tid,))
            }
            cql_steps = {
                r.step_id
                for r in cql.execute(
                    "SELECT step_id FROM steps_by_turn WHERE agent_turn_id = %s", (tid,)
                )
            }
            if pg_steps != cql_steps:
                problems.append(f"turn {tid}: steps differ")
    pg.commit()
    return problems


def test_sigkill_mid_stream_then_restart_converges(pg_app, cql, tmp_path) -> None:
    group = f"t-kill-{uuid.uuid4().hex[:8]}"
    start_group_at_end(group)
    users = [uuid.uuid4() for _ in range(20)]
    log = tmp_path / "cdc.log"
    proc = spawn_cdc(group, log)
    # The stream starts once the flow consumes: changes written while it starts up would
    # only add volume to apply and check, not another case.
    assert wait_for(lambda: "consuming" in log.read_text(), 120, 0.2), log.read_text()[-3000:]
    written: list[uuid.UUID] = []
    killed = threading.Event()

    def write_around_the_kill() -> None:
        # Changes keep coming until the kill, whatever the machine's speed (so the kill is
        # mid-stream), and more after it for the restarted consumer.
        while not killed.is_set():
            written.extend(write_changes(500, users))
        written.extend(write_changes(1000, users))

    writer = threading.Thread(target=write_around_the_kill)
    writer.start()
    try:
        # Kill -9 once the consumer has committed some, but not all, of the stream.
        assert wait_for(lambda: group_lag(group) > 0 and _committed_any(group), 120, 0.5), (
            f"consumer made no progress; log:\n{log.read_text()[-3000:]}"
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        killed.set()
        lag_at_kill = group_lag(group)
        proc = spawn_cdc(group, log)
        writer.join(300)
        assert not writer.is_alive()
        assert wait_for(lambda: group_lag(group) == 0, 240, 1), (
            f"consumer did not catch up; log:\n{log.read_text()[-3000:]}"
        )
    finally:
        killed.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        writer.join(300)
    # The restarted consumer, stopped by SIGTERM, ends cleanly.
    assert proc.returncode == 0, f"exit status {proc.returncode}; log:\n{log.read_text()[-3000:]}"
    assert lag_at_kill > 0
    assert independent_mismatches(pg_app, cql, written) == []
    assert_converged(cql, written, users, timeout=10)


def _committed_any(group: str) -> bool:
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": group}))
    try:
        base = {}
        for topic in kafka.change_topics(CFG.kafka):
            parts = [
                TopicPartition(topic, p)
                for p in c.list_topics(topic, timeout=10).topics[topic].partitions
            ]
            for tp in c.committed(parts, timeout=10):
                base[(tp.topic, tp.partition)] = tp.offset
        start = _START.setdefault(group, base)
        return (
            any(base[k] > start[k] for k in base) and sum(base[k] - start[k] for k in base) >= 2000
        )
    finally:
        c.close()


_START: dict[str, dict[tuple[str, int], int]] = {}


# ------------------------------------------------------------------------ cancellation


def test_sigterm_commits_what_was_applied_and_ends_cancelled(pg_app, tmp_path) -> None:
    group = f"t-term-{uuid.uuid4().hex[:8]}"
    start_group_at_end(group)
    log = tmp_path / "cdc.log"
    proc = spawn_cdc(group, log)
    users = [uuid.uuid4()]
    write_changes(500, users)
    assert wait_for(lambda: group_lag(group) == 0, 120, 0.5), log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    # A stop asked for is a clean end: exit status 0, not merely "it ended".
    assert proc.wait(60) == 0, f"exit status {proc.returncode}; log:\n{log.read_text()[-3000:]}"
    text = log.read_text()
    assert "received SIGTERM" in text, text[-3000:]
    assert "Cancelled" in text, text[-3000:]
    assert group_lag(group) == 0


# ------------------------------------------------------------------------ scale out


@pytest.mark.parametrize("members", [2])
def test_two_consumers_in_one_group_share_partitions_and_converge(pg_app, cql, members) -> None:
    group = f"t-group-{uuid.uuid4().hex[:8]}"
    start_group_at_end(group)
    ks = CFG.kafka.model_copy(update={"consumer_group": group})
    consumers, threads = [], []
    assigned: list[set[str]] = []
    sessions = contextlib.ExitStack()
    for _ in range(members):
        s = sessions.enter_context(scylla.session(CFG.scylla, CFG.scylla.keyspace))
        c = CdcConsumer(scylla.ScyllaWriter(s, CFG.scylla), CdcOptions(report_interval_s=1), ks)
        seen: set[str] = set()
        assigned.append(seen)
        consumers.append(c)

        def report(rep: Any, seen: set[str] = seen) -> None:
            seen.update(rep.lag)

        threads.append(threading.Thread(target=c.run, kwargs={"report": report}, daemon=True))
    for t in threads:
        t.start()
    users = [uuid.uuid4() for _ in range(5)]
    try:
        # Both members hold partitions before the changes arrive: one member alone drains
        # 3,000 changes in well under a second, before a late joiner's rebalance finishes.
        assert wait_for(lambda: all(assigned), 90, 0.5), (
            f"a member never got a partition: {assigned}"
        )
        written = write_changes(3000, users)
        assert wait_for(lambda: group_lag(group) == 0, 120, 0.5)
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(30)
        sessions.close()
    assert independent_mismatches(pg_app, cql, written) == []


# ------------------------------------------------------------------------ rebalances in flight


class _MemberLog(logging.Handler):
    """The CDC consumers' log lines, with the thread (the group member) that logged them: the
    rebalance callbacks run inside poll/consume/close, on the member's own thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.threadName or "", record.getMessage()))

    def of(self, member: str, text: str) -> list[str]:
        return [m for t, m in list(self.lines) if t == member and text in m]


class _StallingWriter(scylla.ScyllaWriter):
    """Holds one batch, once armed, for longer than the group waits between two polls of a
    member: the group moves the member's partitions away while the batch is in flight."""

    stall_s = 12.0

    def __init__(self, session: Any, keyspace: str | None = None) -> None:
        super().__init__(session, CFG.scylla, keyspace=keyspace)
        self.armed = threading.Event()
        self.stalled = threading.Event()
        self.batches = 0

    def write(self, mutations: Any, timeout: float | None = None) -> int:
        if mutations:
            self.batches += 1
            if self.armed.is_set():
                self.armed.clear()
                self.stalled.set()
                time.sleep(self.stall_s)
        return super().write(mutations, timeout)


class _RefusingCommits:
    """A member's consumer whose offset commits the group refuses, while ``refuse`` is set, as
    it does during a rebalance (REBALANCE_IN_PROGRESS): the member must keep the offsets and
    commit them later, at the latest when the partitions are revoked. Everything else goes to
    the real consumer."""

    def __init__(self, inner: Consumer) -> None:
        self._inner = inner
        self.refuse = threading.Event()
        self.refused = 0

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.refuse.is_set():
            self.refused += 1
            raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
        return self._inner.commit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _committed_total(group: str) -> int:
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": group}))
    try:
        total = 0
        for topic in kafka.change_topics(CFG.kafka):
            parts = [
                TopicPartition(topic, p)
                for p in c.list_topics(topic, timeout=10).topics[topic].partitions
            ]
            total += sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10))
        return total
    finally:
        c.close()


def test_rebalances_with_changes_in_flight_converge(pg_app, cql) -> None:
    """Two members of one group while changes stream in: B joins mid-stream (A gives up
    partitions: on_revoke), B's batch outlasts max.poll.interval.ms so the group takes its
    partitions while it writes (its commit is refused and deferred; on_lost), B rejoins and
    finally leaves mid-stream (on_revoke on close). The group ends with lag 0 and the read
    models equal to the SQL oracle."""
    group = f"t-rebal-{uuid.uuid4().hex[:8]}"
    start_group_at_end(group)
    settings = get_settings()
    ks = settings.kafka.model_copy(update={"consumer_group": group})
    lines = _MemberLog()
    cdc_log = logging.getLogger("cqrs_sync.cdc")
    level = cdc_log.level
    cdc_log.addHandler(lines)
    cdc_log.setLevel(logging.INFO)
    errors: list[BaseException] = []
    sessions = contextlib.ExitStack()

    def member(writer: scylla.ScyllaWriter, overrides: dict[str, Any] | None = None) -> CdcConsumer:
        return CdcConsumer(
            writer,
            CdcOptions(batch_size=200, report_interval_s=1),
            ks,
            consumer_overrides=overrides,
        )

    def start(name: str, consumer: CdcConsumer) -> threading.Thread:
        def run() -> None:
            try:
                consumer.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def session() -> Any:
        return sessions.enter_context(scylla.session(CFG.scylla, CFG.scylla.keyspace))

    users = [uuid.uuid4() for _ in range(10)]
    written: list[uuid.UUID] = []
    stop_writing = threading.Event()

    def write_until_stopped() -> None:
        try:
            while not stop_writing.is_set():
                written.extend(write_changes(100, users))
                # A steady trickle keeps changes in flight through every rebalance; more
                # would only lengthen the catch-up and the check at the end.
                stop_writing.wait(0.4)
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write_until_stopped, daemon=True)
    a = member(scylla.ScyllaWriter(session(), CFG.scylla))
    # A's commits are refused from just before B joins until A gives partitions up: the
    # offsets A applied meanwhile are pending when the revoke comes, and must be committed
    # there, before the partitions move (the new owner then starts after them).
    refusing = _RefusingCommits(a.consumer)
    a.consumer = cast(Consumer, refusing)
    pending_at_revoke: list[dict[tuple[str, int], int]] = []
    on_revoke = a._on_revoke

    def observed_revoke(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        pending_at_revoke.append({k: o for k, o in a._uncommitted.items() if k in revoked})
        refusing.refuse.clear()
        on_revoke(consumer, partitions)

    a._on_revoke = observed_revoke  # type: ignore[method-assign]  # before run() subscribes
    a_thread = start("member-a", a)
    b_writer = _StallingWriter(session())
    b: CdcConsumer | None = None
    b_thread: threading.Thread | None = None
    try:
        writer.start()
        assert wait_for(lambda: _committed_total(group) > 0, 90, 0.5), "A applied nothing"
        base = _committed_total(group)

        # B joins while changes are in flight: A gives some partitions up.
        refusing.refuse.set()
        assert wait_for(lambda: refusing.refused > 0, 60, 0.1), "A committed nothing more"
        b = member(b_writer, {"session.timeout.ms": 6000, "max.poll.interval.ms": 7000})
        b_thread = start("member-b", b)
        assert wait_for(lambda: bool(lines.of("member-a", "partitions revoked")), 90, 0.2), (
            lines.lines[-20:]
        )
        assert wait_for(lambda: b_writer.batches > 0, 90, 0.2), "B never applied a batch"

        # B's next batch outlasts max.poll.interval.ms: the group takes its partitions while
        # the batch is written, the commit after it is refused, and B's partitions are lost.
        b_writer.armed.set()
        assert wait_for(b_writer.stalled.is_set, 60, 0.2), "B got no batch to stall"
        assert wait_for(lambda: bool(lines.of("member-b", "partitions lost")), 90, 0.5), (
            lines.lines[-20:]
        )
        # B rejoins, takes partitions again and works, then leaves mid-stream.
        b_batches = b_writer.batches
        assert wait_for(lambda: b_writer.batches > b_batches, 90, 0.2), (
            f"B did not work again after it rejoined: {lines.lines[-20:]}"
        )
        b.stop()
        b_thread.join(60)
        assert not b_thread.is_alive()
        assert _committed_total(group) > base  # all of this happened with changes in flight
        stop_writing.set()
        writer.join(120)
        assert wait_for(lambda: group_lag(group) == 0, 180, 1), (
            f"the group did not catch up: {lines.lines[-20:]}"
        )
    finally:
        stop_writing.set()
        writer.join(120)
        a.stop()
        if b is not None:
            b.stop()
        for t in (a_thread, b_thread):
            if t is not None:
                t.join(60)
        sessions.close()
        cdc_log.removeHandler(lines)
        cdc_log.setLevel(level)
    assert errors == []
    # Every rebalance path ran: incremental revokes on A, the lost assignment and the revoke
    # on close on B, and the commit the rebalance refused was deferred, not retried blindly.
    assert lines.of("member-a", "partitions revoked")
    assert lines.of("member-a", "commit deferred by a rebalance")
    assert any(pending_at_revoke), f"no revoke of A found pending offsets: {pending_at_revoke}"
    assert not [m for _, m in lines.lines if "could not commit revoked partitions" in m]
    assert lines.of("member-b", "partitions lost")
    assert lines.of("member-b", "commit deferred by a rebalance"), [
        m for _, m in lines.lines if "commit" in m
    ]
    assert lines.of("member-b", "partitions revoked")
    assert not [m for _, m in lines.lines if "commit kept failing" in m]
    assert written and independent_mismatches(pg_app, cql, written) == []
    assert_converged(cql, written, users, timeout=30)
