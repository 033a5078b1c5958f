"""The stack's parts, each used for real: Postgres → Debezium → Kafka, Cassandra through
scylla-driver, a flow on the Prefect server."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import anyio
from confluent_kafka import Consumer
from prefect import flow
from prefect.client.orchestration import get_client

from infra import stack
from support.cdc_probe import end_offsets
from tasks.adapters import kafka, postgres
from tasks.settings import get_settings

CFG = get_settings()


def test_every_service_reports_healthy() -> None:
    assert stack.status(quiet=True)


def test_insert_in_postgres_arrives_as_debezium_event(pg_app) -> None:
    topic = get_settings().kafka.topic("sessions")
    consumer = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    # Start at the current end of every partition, so only events after the insert are read.
    consumer.assign(end_offsets(consumer, [topic]))

    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    pg_app.execute(
        "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s)",
        (session_id, user_id, "stack test"),
    )
    pg_app.commit()

    event = None
    deadline = time.monotonic() + 30
    while event is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        key, value = msg.key(), msg.value()
        if key is not None and value is not None and json.loads(key)["id"] == str(session_id):
            event = json.loads(value)
    consumer.close()
    assert event is not None, "no Debezium event for the inserted session within 30 s"
    assert event["op"] == "c"
    assert event["before"] is None
    assert event["after"]["id"] == str(session_id)
    assert event["after"]["user_id"] == str(user_id)
    assert event["after"]["title"] == "stack test"
    assert event["source"]["table"] == "sessions"
    assert event["source"]["connector"] == "postgresql"
    assert isinstance(event["source"]["ts_us"], int)
    assert isinstance(event["source"]["lsn"], int)


def test_scylla_driver_write_reads_back(cql) -> None:
    session_id, user_id = uuid.uuid4(), uuid.uuid4()
    created = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    cql.execute(
        "INSERT INTO sessions_by_id (session_id, user_id, title, created_at, turn_count) "
        "VALUES (%s, %s, %s, %s, %s) USING TIMESTAMP 1000",
        (session_id, user_id, "hello", created, 3),
    )
    row = cql.execute(
        "SELECT user_id, title, created_at, turn_count, WRITETIME(title) AS wt "
        "FROM sessions_by_id WHERE session_id = %s",
        (session_id,),
    ).one()
    assert row.user_id == user_id
    assert row.title == "hello"
    assert row.created_at.replace(tzinfo=UTC) == created
    assert row.turn_count == 3
    assert row.wt == 1000


def test_flow_runs_on_the_prefect_server() -> None:
    @flow(name="stack-smoke")
    def add(a: int, b: int) -> int:
        return a + b

    state = add(2, 3, return_state=True)
    assert state.result() == 5

    async def read() -> tuple[str, str]:
        async with get_client() as client:
            flow_run_id = state.state_details.flow_run_id
            assert flow_run_id is not None
            run = await client.read_flow_run(flow_run_id)
            assert run.state is not None
            return run.state.type.value, str(client.api_url)

    state_type, api_url = anyio.run(read)
    assert state_type == "COMPLETED"
    assert api_url.startswith("http://127.0.0.1:4200")


def test_slot_exists_and_is_active() -> None:
    deadline = time.monotonic() + 20
    while True:
        slot = postgres.slot_status(CFG.postgres)
        if slot.active or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert slot.exists and slot.active, slot
    assert slot.plugin == "pgoutput"
