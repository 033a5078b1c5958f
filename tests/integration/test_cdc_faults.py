"""What must neither stop CDC nor pass silently: a change that decodes but cannot be written,
a systemic write error, offsets deleted by retention, a TRUNCATE, a record near the size
caps, and Scylla or Kafka going away. Each runs the real consumer on the real stack."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from infra import stack
from support.cdc_probe import ChangeTap, LocalCdc, end_offsets
from tasks.adapters import kafka, postgres, scylla
from tasks.cdc.consumer import CdcConsumer, CdcOptions
from tasks.cdc.offsets import OffsetGap
from tasks.core.errors import TerminalError
from tasks.core.metrics import MetricsReport
from tasks.settings import KafkaSettings, get_settings
from tests.integration.readmodels import wait_for

CFG = get_settings()

ROOT = Path(__file__).resolve().parents[2]


def human_turn_event(turn: uuid.UUID, session: uuid.UUID, content: str) -> bytes:
    """A Debezium insert event of a human turn; ``ensure_ascii`` escapes a lone surrogate as
    JSON's \\ud800, which decodes to a Python str the driver cannot encode."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(
        {
            "before": None,
            "after": {
                "id": str(turn),
                "session_id": str(session),
                "content": content,
                "created_at": now,
                "updated_at": now,
            },
            "source": {"table": "human_turns", "ts_us": int(time.time() * 1e6), "lsn": 1},
            "op": "c",
        },
        ensure_ascii=True,
    ).encode()


def new_topic(prefix: str) -> str:
    topic = f"{get_settings().kafka.topic_prefix}.test.{prefix}{uuid.uuid4().hex[:8]}"
    admin = kafka.admin(CFG.kafka)  # held: futures fail if the client is collected first
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result()
    return topic


def produce(topic: str, values: list[bytes]) -> None:
    p = Producer(kafka.producer_config(CFG.kafka))
    for v in values:
        p.produce(topic, key=b"k", value=v)
    assert p.flush(30) == 0


def group_settings(**update: Any) -> KafkaSettings:
    return get_settings().kafka.model_copy(
        update={"consumer_group": f"t-{uuid.uuid4().hex[:8]}", **update}
    )


def dlq_messages(
    since: list[TopicPartition], match: Callable[[Message], bool], count: int, timeout_s: float = 30
) -> list[Message]:
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    c.assign(since)
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is not None and not msg.error() and match(msg):
            got.append(msg)
    c.close()
    return got


def headers_of(m: Message) -> dict[str, str]:
    raw: list[tuple[str, Any]] = list(m.headers() or [])  # type: ignore[arg-type]
    return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw}


@pytest.fixture()
def dlq_end() -> list[TopicPartition]:
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    try:
        return end_offsets(c, [get_settings().kafka.dead_letter_topic])
    finally:
        c.close()


def timeline_contents(cql: Any, session: uuid.UUID) -> dict[uuid.UUID, str]:
    return {
        r.turn_id: r.content
        for r in cql.execute(
            "SELECT turn_id, content FROM conversation_timeline WHERE session_id = %s", (session,)
        )
    }


def test_a_change_that_decodes_but_cannot_be_written_is_dead_lettered(cql: Any, dlq_end) -> None:
    topic, session = new_topic("poison"), uuid.uuid4()
    turns = [uuid.uuid4() for _ in range(3)]
    poison = human_turn_event(turns[1], session, "lone \ud800 surrogate")
    produce(
        topic,
        [
            human_turn_event(turns[0], session, "before"),
            poison,
            human_turn_event(turns[2], session, "after"),
        ],
    )
    with scylla.session(CFG.scylla, CFG.scylla.keyspace) as s:
        consumer = CdcConsumer(
            scylla.ScyllaWriter(s, CFG.scylla), CdcOptions(max_messages=3), group_settings()
        )
        result = consumer.run(topics=[topic])
    assert (result.messages, result.changes, result.dead_lettered) == (3, 2, 1)
    assert timeline_contents(cql, session) == {turns[0]: "before", turns[2]: "after"}
    (dead,) = dlq_messages(dlq_end, lambda m: headers_of(m).get("dlq.source.topic") == topic, 1)
    h = headers_of(dead)
    assert h["dlq.source.offset"] == "1" and h["dlq.error.class"] == "RejectedData"
    assert "surrogate" in h["dlq.error"] or "encode" in h["dlq.error"], h["dlq.error"]
    assert dead.value() == poison  # byte for byte


def test_a_systemic_write_error_stops_the_run_and_names_the_cause() -> None:
    """A keyspace without the read-model tables: "unconfigured table" is not retried."""
    topic = new_topic("systemic")
    produce(topic, [human_turn_event(uuid.uuid4(), uuid.uuid4(), "x")])
    ks = f"empty_{uuid.uuid4().hex[:10]}"
    with scylla.session(CFG.scylla) as s:
        s.execute(
            f"CREATE KEYSPACE {ks} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        settings = group_settings()
        errors: list[BaseException] = []
        consumer = CdcConsumer(
            scylla.ScyllaWriter(s, CFG.scylla, keyspace=ks), CdcOptions(max_messages=1), settings
        )

        def run() -> None:
            try:
                consumer.run(topics=[topic])
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join(60)
        try:
            assert not t.is_alive(), "the consumer kept retrying a terminal error"
            assert len(errors) == 1 and isinstance(errors[0], TerminalError), errors
            assert "conversation_timeline" in str(errors[0])
            # Nothing was committed: the change is still there for a fixed deployment.
            c = Consumer(kafka.consumer_config(settings))
            (tp,) = c.committed([TopicPartition(topic, 0)], timeout=10)
            c.close()
            assert tp.offset < 0
        finally:
            consumer.stop()
            t.join(30)
            s.execute(f"DROP KEYSPACE IF EXISTS {ks}")


def test_offsets_deleted_by_retention_stop_the_run_with_the_missing_range() -> None:
    topic = new_topic("gap")
    produce(topic, [human_turn_event(uuid.uuid4(), uuid.uuid4(), f"m{i}") for i in range(10)])
    settings = group_settings()
    c = Consumer(kafka.consumer_config(settings))
    c.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    c.close()
    # What retention does: the log now starts at offset 6.
    admin = kafka.admin(CFG.kafka)
    (fut,) = admin.delete_records([TopicPartition(topic, 0, 6)]).values()
    fut.result()
    with scylla.session(CFG.scylla, CFG.scylla.keyspace) as s:
        consumer = CdcConsumer(
            scylla.ScyllaWriter(s, CFG.scylla), CdcOptions(max_seconds=30), settings
        )
        with pytest.raises(OffsetGap) as info:
            consumer.run(topics=[topic])
    text = str(info.value)
    assert f"{topic}[0]" in text and "offsets 2..5" in text and "backfill" in text
    # A new group starts at the oldest change still there, without complaint.
    with scylla.session(CFG.scylla, CFG.scylla.keyspace) as s:
        result = CdcConsumer(
            scylla.ScyllaWriter(s, CFG.scylla), CdcOptions(max_messages=4), group_settings()
        ).run(topics=[topic])
    assert result.messages == 4 and result.committed == {f"{topic}[0]": 10}


@pytest.mark.solo  # TRUNCATEs the shared `steps` table and rebuilds `steps_by_turn`
def test_truncate_is_refused_loudly_and_a_rebuild_repairs(
    cdc_consumer: LocalCdc, cql: Any, dlq_end, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cqrs_sync.cdc")
    with postgres.connect("admin", CFG.postgres) as admin:
        admin.autocommit = True
        user, session, turn = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        tap = ChangeTap(CFG.kafka)
        admin.execute("INSERT INTO sessions (id, user_id) VALUES (%s, %s)", (session, user))
        admin.execute("INSERT INTO agent_turns (id, session_id) VALUES (%s, %s)", (turn, session))
        admin.execute(
            "INSERT INTO steps (id, agent_turn_id, session_id, kind) "
            "VALUES (gen_random_uuid(), %s, %s, 'tool')",
            (turn, session),
        )
        inserts = tap.collect(lambda e: e.change is not None and e.change.table == "steps", 1)
        tap.close()
        assert inserts and wait_for(lambda: cdc_consumer.applied(inserts)), cdc_consumer.where()
        admin.execute("TRUNCATE steps")
    (dead,) = dlq_messages(
        dlq_end,
        lambda m: headers_of(m).get("dlq.error.class") == "TruncateNotApplied",
        1,
        timeout_s=60,
    )
    assert "public.steps" in headers_of(dead)["dlq.error"]
    assert any("TRUNCATE of public.steps" in r.getMessage() for r in caplog.records)
    # Refused, not applied: the read model still has the step...
    assert (
        cql.execute("SELECT count(*) FROM steps_by_turn WHERE agent_turn_id = %s", (turn,)).one()[0]
        == 1
    )
    # ...until the rebuild the error names.
    from flows.backfill import backfill_flow

    backfill_flow(read_models=["steps_by_turn"], rebuild=True)
    assert cql.execute("SELECT count(*) FROM steps_by_turn").one()[0] == 0


def test_an_agent_turn_at_the_size_cap_reaches_the_read_model(
    cdc_consumer: LocalCdc, cql: Any, pg_app: psycopg.Connection
) -> None:
    """1 MiB of control characters, which JSON escapes sixfold: its update event carries it
    twice (before and after), 12 MiB, under the 16 MiB caps of Kafka and the consumer."""
    pg_app.autocommit = True
    session, turn = uuid.uuid4(), uuid.uuid4()
    first, second = "\x01" * (1 << 20), "\x02" * (1 << 20)
    tap = ChangeTap(CFG.kafka)
    pg_app.execute("INSERT INTO sessions (id, user_id) VALUES (%s, %s)", (session, uuid.uuid4()))
    pg_app.execute(
        "INSERT INTO agent_turns (id, session_id, content) VALUES (%s, %s, %s)",
        (turn, session, first),
    )
    pg_app.execute("UPDATE agent_turns SET content = %s WHERE id = %s", (second, turn))
    events = tap.collect(
        lambda e: (
            e.change is not None
            and e.change.table == "agent_turns"
            and str((e.change.after or {}).get("id")) == str(turn)
        ),
        2,
        60,
    )
    tap.close()
    assert [e.event.change.op for e in events if e.event.change] == ["c", "u"]
    assert wait_for(lambda: cdc_consumer.applied(events), 120), cdc_consumer.where()
    assert timeline_contents(cql, session) == {turn: second}
    # One byte over the cap is refused by Postgres, naming the constraint.
    with pytest.raises(psycopg.errors.CheckViolation, match="agent_turns_content_size"):
        pg_app.execute(
            "UPDATE agent_turns SET content = %s WHERE id = %s", ("\x03" * ((1 << 20) + 1), turn)
        )


# ------------------------------------------------------------------------ outages


@pytest.fixture()
def reporting_consumer() -> Iterator[tuple[CdcConsumer, list[MetricsReport]]]:
    """The real consumer from the topics' end, reporting every second."""
    settings = group_settings()
    from support.cdc_probe import position_group_at_end

    position_group_at_end(settings)
    with scylla.session(CFG.scylla, CFG.scylla.keyspace) as s:
        consumer = CdcConsumer(
            scylla.ScyllaWriter(s, CFG.scylla), CdcOptions(report_interval_s=1), settings
        )
        reports: list[MetricsReport] = []
        t = threading.Thread(target=lambda: consumer.run(report=reports.append), daemon=True)
        t.start()
        yield consumer, reports
        consumer.stop()
        t.join(60)


def _session(pg: psycopg.Connection) -> uuid.UUID:
    pg.autocommit = True
    session = uuid.uuid4()
    pg.execute("INSERT INTO sessions (id, user_id) VALUES (%s, %s)", (session, uuid.uuid4()))
    return session


def _turn(pg: psycopg.Connection, session: uuid.UUID, content: str) -> uuid.UUID:
    turn = uuid.uuid4()
    pg.execute(
        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
        (turn, session, content),
    )
    return turn


@pytest.mark.solo  # SIGSTOPs Cassandra
def test_a_hung_scylla_is_reported_while_waiting_and_nothing_is_lost(
    reporting_consumer, pg_app: psycopg.Connection, cql: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _consumer, reports = reporting_consumer
    caplog.set_level(logging.WARNING, logger="cqrs_sync.cdc")
    session = _session(pg_app)
    pid = stack.alive_pid("cassandra")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a hung node: requests time out instead of being refused
    try:
        during = _turn(pg_app, session, "written while Scylla hangs")
        assert wait_for(
            lambda: sum(1 for r in reports if r.waiting_for and "Scylla" in r.waiting_for) >= 2, 90
        ), [r.waiting_for for r in reports[-5:]]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert any("waiting for Scylla since" in r.getMessage() for r in caplog.records)
    assert wait_for(lambda: timeline_contents(cql, session).get(during) is not None, 120)
    assert wait_for(lambda: reports[-1].waiting_for is None, 30)


@pytest.mark.solo  # stops Kafka
def test_kafka_down_is_reported_while_waiting_and_consumption_resumes(
    reporting_consumer, pg_app: psycopg.Connection, cql: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _consumer, reports = reporting_consumer
    caplog.set_level(logging.INFO, logger="cqrs_sync.cdc")
    session = _session(pg_app)
    cli = [sys.executable, "-m", "infra.stack"]
    subprocess.run([*cli, "down", "kafka"], cwd=ROOT, check=True, timeout=180)
    try:
        assert wait_for(
            lambda: any(r.waiting_for and "Kafka" in r.waiting_for for r in reports), 60
        ), [r.waiting_for for r in reports[-5:]]
        assert any("waiting for Kafka since" in r.getMessage() for r in caplog.records)
    finally:
        subprocess.run([*cli, "up", "kafka"], cwd=ROOT, check=True, timeout=300)
    assert wait_for(
        lambda: any("Kafka is reachable again" in r.getMessage() for r in caplog.records), 60
    )
    after = _turn(pg_app, session, "written after Kafka came back")
    assert wait_for(lambda: timeline_contents(cql, session).get(after) is not None, 180)
