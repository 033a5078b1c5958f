"""The audit's freshness report on the real stack: a healthy report, a consumer group behind by
a real change, thresholds, the latency the CDC flow publishes, and services that are down.

Every test reads through a consumer group of its own (positioned at the topics' end), so the
CDC group of the stack is never disturbed; check_freshness itself writes nothing."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from flows.cdc import cdc_flow, publish_latency
from support.cdc_probe import ChangeTap, position_group_at_end
from tasks.adapters import kafka
from tasks.audit.freshness import FreshnessReport, check_freshness
from tasks.core.metrics import MetricsReport, latency_variable
from tasks.settings import Settings, get_settings
from tests.integration.readmodels import wait_for

# Alone (docs/decisions.md, "How `make test` runs"): a fresh group must read lag 0 on every
# partition, which any other writer to the source tables breaks.
pytestmark = pytest.mark.solo

LOG = logging.getLogger("test_freshness")


def with_kafka(s: Settings, **kafka_fields: Any) -> Settings:
    return s.model_copy(update={"kafka": s.kafka.model_copy(update=kafka_fields)})


def with_limits(s: Settings, **limits: Any) -> Settings:
    return s.model_copy(update={"audit": s.audit.model_copy(update=limits)})


@pytest.fixture()
def settings() -> Iterator[Settings]:
    """The stack's settings with a private consumer group positioned at the topics' end."""
    s = with_kafka(get_settings(), consumer_group=f"audit-freshness-{uuid.uuid4().hex[:12]}")
    position_group_at_end(s.kafka)
    yield s
    admin = AdminClient({"bootstrap.servers": s.kafka.bootstrap_servers})  # alive till done
    admin.delete_consumer_groups([s.kafka.consumer_group])[s.kafka.consumer_group].result(30)


def dead_letters_now(s: Settings) -> int:
    """The dead-letter topic's size, counted independently of the module under test."""
    c = Consumer(kafka.consumer_config(s.kafka, **{"group.id": f"count-{uuid.uuid4()}"}))
    try:
        topic = s.kafka.dead_letter_topic
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        marks = [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts]
        return sum(high - low for low, high in marks)
    finally:
        c.close()


def committed(s: Settings) -> dict[tuple[str, int], int]:
    c = Consumer(kafka.consumer_config(s.kafka))
    try:
        tps = [
            TopicPartition(t, p)
            for t in kafka.change_topics(s.kafka)
            for p in c.list_topics(t, timeout=10).topics[t].partitions
        ]
        return {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


def delete_variable(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_variable_by_name(name)


def test_a_healthy_stack_gives_a_report_without_problems(settings: Settings) -> None:
    group = settings.kafka.consumer_group
    measured = MetricsReport(10.0, 42, 4.2, 12.5, 30.0, 31.5, 0, 42)
    publish_latency(LOG, measured, group)
    # An interval that applied nothing leaves the last measured value in place.
    publish_latency(LOG, MetricsReport(10.0, 0, 0.0, None, None, None, 0, 42), group)
    try:
        dead = dead_letters_now(settings)
        report = check_freshness(with_limits(settings, max_dead_letters=dead))
    finally:
        delete_variable(latency_variable(group))

    assert report.problems == (), report.markdown()
    slot = report.slot
    assert (slot.name, slot.exists, slot.active, slot.gap, slot.error) == (
        "cqrs_sync",
        True,
        True,
        None,
        None,
    )
    assert slot.lag_bytes is not None and slot.retained_bytes is not None
    assert 0 <= slot.lag_bytes <= slot.retained_bytes  # restart_lsn <= confirmed_flush_lsn
    # Heartbeats every 5 s and offsets flushed every second keep it to seconds.
    assert slot.lag_s is not None and 0 <= slot.lag_s < 60, slot
    assert (report.connector.state, report.connector.task_states) == ("RUNNING", ("RUNNING",))
    partitions = {(p.topic, p.partition) for p in report.consumer.partitions}
    assert {t for t, _ in partitions} == set(kafka.change_topics(settings.kafka))
    assert all(p.lag == 0 and p.age_s == 0.0 for p in report.consumer.partitions)
    assert report.consumer_lag_age_s == 0.0 and report.consumer.total == 0
    assert report.dead_letters.retained == dead
    record = report.latency.record
    assert record is not None, report.latency
    assert (record.consumer_group, record.events, record.p50_ms, record.max_ms) == (
        group,
        42,
        12.5,
        31.5,
    )
    assert time.time() - 60 < record.measured_at <= time.time()
    assert "No problems." in report.markdown()
    assert len(report.table_rows()) == 10 + len(partitions)


def test_an_unconsumed_change_shows_lag_and_its_age(settings: Settings, pg_app: Any) -> None:
    """Two changes of one row (one key, so one partition), 1.5 s apart: the partition is two
    changes behind, and its age is the first one's, the oldest unconsumed."""
    group, sid = settings.kafka.consumer_group, uuid.uuid4()
    tap = ChangeTap(settings.kafka)
    before_insert = time.time()
    try:
        pg_app.execute(
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'freshness')",
            (sid, uuid.uuid4()),
        )
        pg_app.commit()
        inserted = time.time()
        time.sleep(1.5)
        pg_app.execute("UPDATE sessions SET title = 'fresher' WHERE id = %s", (sid,))
        pg_app.commit()
        first, second = tap.collect(
            lambda e: e.change is not None and (e.change.after or {}).get("id") in (sid, str(sid)),
            2,
            30,
        )
    finally:
        tap.close()
    assert (second.topic, second.partition) == (first.topic, first.partition)
    before = committed(settings)

    checked = time.time()
    report = check_freshness(settings)

    lagging = {(p.topic, p.partition): p for p in report.consumer.partitions if p.lag}
    part = lagging.get((first.topic, first.partition))
    assert part is not None, report.markdown()
    # The group was positioned at the end just before: its next change is the insert.
    assert part.committed == first.offset and part.lag >= 2
    # At least as old as the insert (the update is 1.5 s younger), at most since before it.
    assert part.age_s is not None
    assert checked - inserted <= part.age_s <= time.time() - before_insert + 0.5
    assert part.age_s >= 1.5
    assert report.consumer_lag_age_s >= part.age_s
    assert not [p for p in report.problems if group in p], report.problems  # within limits
    assert committed(settings) == before  # the audit committed nothing for the group

    over = check_freshness(with_limits(settings, max_consumer_lag=0, max_consumer_lag_s=1.0))
    mine = [p for p in over.problems if f"consumer group {group!r}" in p]
    total, age = over.consumer.total, over.consumer.age_s
    assert mine == [
        f"consumer group {group!r} is {total:,} changes behind (limit 0), most on "
        f"{max(over.consumer.partitions, key=lambda p: p.lag).label} "
        f"({max(p.lag for p in over.consumer.partitions):,})",
        f"consumer group {group!r}: the oldest unconsumed change, on "
        f"{max(over.consumer.partitions, key=lambda p: p.age_s or 0).label}, is {age:,.1f} s "
        f"old (limit 1.0 s)",
    ], over.problems


def test_the_cdc_flow_publishes_the_latency_the_audit_reads(
    settings: Settings, pg_app: Any
) -> None:
    group = settings.kafka.consumer_group
    pg_app.execute(
        "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, 'latency')",
        (uuid.uuid4(), uuid.uuid4()),
    )
    pg_app.commit()
    started = time.time()
    try:
        state = cdc_flow(
            max_seconds=6, report_interval_s=1, consumer_group=group, return_state=True
        )
        assert state.is_completed(), state
        report = check_freshness(settings)
    finally:
        delete_variable(latency_variable(group))

    record = report.latency.record
    assert record is not None, report.latency
    assert record.consumer_group == group and record.events >= 1
    assert 0 < record.p50_ms <= record.p99_ms <= record.max_ms < 30_000
    assert started < record.measured_at <= time.time()
    assert report.consumer.total == 0, report.markdown()  # applied and committed


def test_slot_thresholds_are_problems(settings: Settings) -> None:
    # Any byte of WAL after the slot's confirmed position, and its age, pass a zero limit.
    reports: list[FreshnessReport] = []

    def breached() -> bool:
        r = check_freshness(with_limits(settings, max_slot_lag_bytes=0, max_slot_lag_s=0.0))
        reports.append(r)
        return bool(r.slot.lag_bytes and r.slot.lag_s)

    assert wait_for(breached, timeout=30), f"the slot never lagged: {reports[-1].slot}"
    report = reports[-1]
    slot = report.slot
    assert f"replication slot 'cqrs_sync' holds {slot.lag_bytes:,} bytes" in "\n".join(
        report.problems
    )
    assert f"replication slot 'cqrs_sync' is {slot.lag_s:,.1f} s behind" in "\n".join(
        report.problems
    )


def test_missing_slot_and_connector_are_problems(settings: Settings) -> None:
    s = with_kafka(settings, connector_name="no-such-connector")
    s = s.model_copy(update={"postgres": s.postgres.model_copy(update={"slot_name": "no_slot"})})
    report = check_freshness(s)
    assert "replication slot 'no_slot' does not exist: changes are not captured" in report.problems
    assert (
        "Debezium connector 'no-such-connector' is not registered in Kafka Connect at "
        f"{s.kafka.connect_url}" in report.problems
    )


@pytest.mark.parametrize(
    ("service", "named"),
    [
        ("connect", "Kafka Connect is unavailable: http://127.0.0.1:1"),
        ("kafka", "Kafka at 127.0.0.1:1 failed"),
        ("postgres", "PostgreSQL is unavailable: 127.0.0.1:1"),
        ("prefect", "the Prefect API at http://127.0.0.1:1/api is unavailable"),
    ],
)
def test_a_service_down_is_a_problem_naming_it(
    settings: Settings, service: str, named: str
) -> None:
    s = settings
    if service == "connect":
        s = with_kafka(s, connect_url="http://127.0.0.1:1")
    elif service == "kafka":
        s = with_kafka(s, bootstrap_servers="127.0.0.1:1")
    elif service == "postgres":
        s = s.model_copy(update={"postgres": s.postgres.model_copy(update={"port": 1})})
    else:
        s = s.model_copy(update={"prefect_api_url": "http://127.0.0.1:1/api"})
    s = with_limits(s, max_dead_letters=10**9)

    report = check_freshness(s)  # no exception

    down = [p for p in report.problems if named in p]
    assert down, report.problems
    assert len(down) == (2 if service == "kafka" else 1)  # the group and the dead letters
    assert set(report.problems) == set(down), report.problems  # the other services are fine
    assert report.markdown().count(named) == len(down)
