"""tasks.audit.freshness without a stack: lag arithmetic, thresholds, the report's rendering,
and the latency record the CDC flow publishes for it (the reading itself is
tests/integration/test_freshness.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Message

from tasks.audit.freshness import (
    ConnectorFreshness,
    ConsumerLag,
    DeadLetterCount,
    FreshnessReport,
    LatencyReading,
    PartitionLag,
    SlotFreshness,
    commit_time_s,
    find_problems,
    slot_lag_s,
)
from tasks.core.metrics import LatencyRecord, MetricsReport, latency_variable
from tasks.settings import AuditSettings

LIMITS = AuditSettings(
    max_slot_lag_bytes=1000,
    max_slot_lag_s=60,
    max_consumer_lag=10,
    max_consumer_lag_s=30,
    max_dead_letters=0,
)
TOPIC = "cqrs.public.sessions"
SLOT = SlotFreshness("cqrs_sync", True, True, retained_bytes=5000, lag_bytes=200, lag_s=4.0)
CONNECTOR = ConnectorFreshness("cqrs-postgres", "http://connect:8083", "RUNNING", ("RUNNING",))
CAUGHT_UP = ConsumerLag(
    "cqrs-sync-cdc", tuple(PartitionLag(TOPIC, p, 50, 10, 50) for p in range(3))
)
DLQ = DeadLetterCount("cqrs.dlq", 0)
RECORD = LatencyRecord("cqrs-sync-cdc", 1_800_000_000.0, 10.0, 120, 18.5, 40.25, 61.0)


LATENCY = LatencyReading(RECORD)


def problems(
    slot: SlotFreshness = SLOT,
    connector: ConnectorFreshness = CONNECTOR,
    consumer: ConsumerLag = CAUGHT_UP,
    latency: LatencyReading = LATENCY,
    dead: DeadLetterCount = DLQ,
) -> tuple[str, ...]:
    return find_problems(slot, connector, consumer, latency, dead, LIMITS)


def report(**parts: Any) -> FreshnessReport:
    base: dict[str, Any] = {
        "slot": SLOT,
        "connector": CONNECTOR,
        "consumer": CAUGHT_UP,
        "latency": LATENCY,
        "dead_letters": DLQ,
    } | parts
    found = find_problems(
        base["slot"],
        base["connector"],
        base["consumer"],
        base["latency"],
        base["dead_letters"],
        LIMITS,
    )
    at = datetime.fromtimestamp(RECORD.measured_at + 12.0, UTC)
    return FreshnessReport(at, **base, limits=LIMITS, problems=found)


# -- lag arithmetic


@pytest.mark.parametrize(
    ("committed", "start", "end", "next_offset", "lag", "gap"),
    [
        (50, 10, 50, 50, 0, False),  # caught up
        (42, 10, 50, 42, 8, False),  # 42..49 unconsumed
        (None, 10, 50, 10, 40, False),  # no commit: the consumer starts at the log's start
        (None, 0, 0, 0, 0, False),  # empty topic, new group
        (5, 10, 50, 5, 45, True),  # retention deleted 5..9 before the group consumed them
        (60, 10, 50, 60, 0, True),  # beyond the end: the topic was recreated
    ],
)
def test_partition_lag_arithmetic(
    committed: int | None, start: int, end: int, next_offset: int, lag: int, gap: bool
) -> None:
    p = PartitionLag(TOPIC, 2, committed, start, end)
    assert (p.next_offset, p.lag, p.gap, p.label) == (next_offset, lag, gap, f"{TOPIC}[2]")


def test_consumer_lag_totals_and_oldest_age() -> None:
    c = ConsumerLag(
        "g",
        (
            PartitionLag(TOPIC, 0, 40, 0, 50, age_s=3.5),
            PartitionLag(TOPIC, 1, 7, 0, 9, age_s=12.25),
            PartitionLag(TOPIC, 2, 9, 0, 9),
            PartitionLag(TOPIC, 3, 1, 0, 4, age_s=None),  # could not be read: not counted
        ),
    )
    assert (c.total, c.age_s) == (10 + 2 + 0 + 3, 12.25)
    assert ConsumerLag("g").age_s == 0.0
    assert report(consumer=c).consumer_lag_age_s == 12.25
    assert report().consumer_lag_age_s == 0.0


@pytest.mark.parametrize(
    ("lag_bytes", "commit_us", "now", "expected"),
    [
        (0, None, 100.0, 0.0),  # confirmed everything: no age, whatever the offset says
        (-8, 90_000_000, 100.0, 0.0),  # confirmed past the current LSN (a race): caught up
        (512, 90_000_000, 100.0, 10.0),
        (512, 101_000_000, 100.0, 0.0),  # the other machine's clock is ahead: never negative
        (512, None, 100.0, None),  # Kafka Connect did not say
        (512, "90000000", 100.0, None),
        (None, 90_000_000, 100.0, None),
    ],
)
def test_slot_lag_age(
    lag_bytes: int | None, commit_us: object, now: float, expected: float | None
) -> None:
    assert slot_lag_s(lag_bytes, commit_us, now) == expected


# -- thresholds and services


def test_a_healthy_report_has_no_problems() -> None:
    assert problems() == ()
    at_limits = ConsumerLag(
        "g", (PartitionLag(TOPIC, 0, 0, 0, 10, age_s=30.0),)
    )  # equal to a limit is not over it
    edge = replace(SLOT, lag_bytes=1000, lag_s=60.0)
    assert problems(slot=edge, consumer=at_limits) == ()
    # No latency published yet is said in the report, not a problem.
    assert problems(latency=LatencyReading(reason="none yet")) == ()


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            {"slot": replace(SLOT, lag_bytes=1001)},
            "replication slot 'cqrs_sync' holds 1,001 bytes of WAL Debezium did not confirm "
            "(limit 1,000)",
        ),
        (
            {"slot": replace(SLOT, lag_s=61.25)},
            "replication slot 'cqrs_sync' is 61.2 s behind (since its last confirmed commit) "
            "(limit 60.0 s)",
        ),
        (
            {
                "consumer": ConsumerLag(
                    "g",
                    (PartitionLag(TOPIC, 0, 0, 0, 4, 1.0), PartitionLag(TOPIC, 1, 3, 0, 10, 2.0)),
                )
            },
            f"consumer group 'g' is 11 changes behind (limit 10), most on {TOPIC}[1] (7)",
        ),
        (
            {
                "consumer": ConsumerLag(
                    "g",
                    (PartitionLag(TOPIC, 0, 0, 0, 1, 2.0), PartitionLag(TOPIC, 2, 0, 0, 1, 31.5)),
                )
            },
            f"consumer group 'g': the oldest unconsumed change, on {TOPIC}[2], is 31.5 s old "
            "(limit 30.0 s)",
        ),
        (
            {"dead": DeadLetterCount("cqrs.dlq", 3)},
            "dead-letter topic 'cqrs.dlq' holds 3 messages (limit 0)",
        ),
    ],
)
def test_each_threshold_passed_is_one_problem(parts: dict[str, Any], expected: str) -> None:
    assert problems(**parts) == (expected,)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            {"slot": SlotFreshness("cqrs_sync", error="PostgreSQL is unavailable: pg:5432")},
            "replication slot 'cqrs_sync' could not be read: PostgreSQL is unavailable: pg:5432",
        ),
        (
            {"slot": SlotFreshness("cqrs_sync")},
            "replication slot 'cqrs_sync' does not exist: changes are not captured",
        ),
        (
            {"slot": replace(SLOT, active=False)},
            "replication slot 'cqrs_sync' is inactive: no connector is streaming from it",
        ),
        ({"slot": replace(SLOT, gap="slot recreated")}, "slot recreated"),
        (
            {"connector": replace(CONNECTOR, state=None, task_states=())},
            "Debezium connector 'cqrs-postgres' is not registered in Kafka Connect at "
            "http://connect:8083",
        ),
        (
            {"connector": replace(CONNECTOR, task_states=("FAILED",), trace="ConnectException")},
            "Debezium connector 'cqrs-postgres' is RUNNING, tasks ['FAILED']: ConnectException",
        ),
        (
            {"connector": replace(CONNECTOR, task_states=())},
            "Debezium connector 'cqrs-postgres' is RUNNING, tasks []",
        ),
        (
            {"connector": replace(CONNECTOR, state="PAUSED", task_states=("PAUSED",))},
            "Debezium connector 'cqrs-postgres' is PAUSED, tasks ['PAUSED']",
        ),
        (
            {"connector": ConnectorFreshness("cqrs-postgres", "u", error="Kafka Connect is down")},
            "Debezium connector 'cqrs-postgres' could not be checked: Kafka Connect is down",
        ),
        (
            {"consumer": ConsumerLag("g", error="Kafka at k:9092 failed")},
            "consumer group 'g' could not be checked: Kafka at k:9092 failed",
        ),
        (
            {"consumer": ConsumerLag("g", missing_topics=(TOPIC,))},
            f"change topic '{TOPIC}' does not exist",
        ),
        (
            {"consumer": ConsumerLag("g", (PartitionLag(TOPIC, 1, 5, 10, 12),))},
            f"consumer group 'g' on {TOPIC}[1]: committed offset 5 is outside the log (10..12)",
        ),
        (
            {"consumer": ConsumerLag("g", (PartitionLag(TOPIC, 1, 5, 0, 8, age_s=None),))},
            f"consumer group 'g' on {TOPIC}[1]: the oldest of 3 changes could not be read",
        ),
        (
            {"latency": LatencyReading(error="the Prefect API at p is unavailable")},
            "the last end-to-end latency could not be read: the Prefect API at p is unavailable",
        ),
        (
            {"dead": DeadLetterCount("cqrs.dlq", error="Kafka at k:9092 failed")},
            "dead-letter topic 'cqrs.dlq' could not be read: Kafka at k:9092 failed",
        ),
    ],
)
def test_each_service_down_or_missing_is_a_problem(parts: dict[str, Any], expected: str) -> None:
    assert problems(**parts) == (expected,)


def test_every_service_down_is_reported_together() -> None:
    found = problems(
        slot=SlotFreshness("cqrs_sync", error="pg down"),
        connector=ConnectorFreshness("c", "u", error="connect down"),
        consumer=ConsumerLag("g", error="kafka down"),
        latency=LatencyReading(error="prefect down"),
        dead=DeadLetterCount("cqrs.dlq", error="kafka down"),
    )
    assert len(found) == 5
    for down in ("pg down", "connect down", "kafka down", "prefect down"):
        assert any(down in p for p in found), down


# -- rendering


def test_table_rows_carry_values_and_limits() -> None:
    lagging = ConsumerLag(
        "g", (PartitionLag(TOPIC, 0, 40, 0, 50, age_s=3.25), PartitionLag(TOPIC, 1, 9, 0, 9))
    )
    rows = {r["measure"]: (r["value"], r["limit"]) for r in report(consumer=lagging).table_rows()}
    assert rows == {
        "slot cqrs_sync exists / active": ("True / True", "True / True"),
        "slot cqrs_sync WAL retained (bytes)": (5000, None),
        "slot cqrs_sync lag (bytes)": (200, 1000),
        "slot cqrs_sync lag (s)": (4.0, 60.0),
        "connector cqrs-postgres / tasks": ("RUNNING / RUNNING", "RUNNING"),
        f"{TOPIC}[0] lag (changes / s)": ("10 / 3.2", None),
        f"{TOPIC}[1] lag (changes / s)": ("0 / 0.0", None),
        "group g lag (changes)": (10, 10),
        "group g oldest unconsumed (s)": (3.2, 30.0),
        "end-to-end latency p50 / p99 / max (ms)": ("18.5 / 40.2 / 61.0", None),
        "end-to-end latency measured (s ago)": (12.0, None),
        "dead letters in cqrs.dlq": (0, 0),
    }
    json.dumps(report().table_rows())  # a Prefect table artifact takes JSON


def test_markdown_lists_problems_then_the_table() -> None:
    text = report(dead_letters=DeadLetterCount("cqrs.dlq", 1234)).markdown()
    assert text.startswith(
        "## Freshness\n\n- dead-letter topic 'cqrs.dlq' holds 1,234 messages (limit 0)\n\n"
    )
    assert "| dead letters in cqrs.dlq | 1,234 | 0 |\n" in text
    assert "| slot cqrs_sync lag (bytes) | 200 | 1,000 |\n" in text


def test_a_slot_past_debeziums_offset_is_a_warning_not_a_problem() -> None:
    # A healthy connector shows this for a while after a restart (docs/decisions.md).
    suspect = "replication slot 'cqrs_sync' starts at 0/9000, past Debezium's last offset"
    fresh = report(slot=replace(SLOT, suspect=suspect))
    assert fresh.problems == ()
    assert fresh.warnings == (suspect,)
    assert f"No problems.\n- warning: {suspect}\n" in fresh.markdown()
    lost = report(slot=replace(SLOT, gap="replication slot 'cqrs_sync' lost WAL it needed"))
    assert lost.problems == ("replication slot 'cqrs_sync' lost WAL it needed",)
    assert lost.warnings == ()


def test_markdown_of_a_healthy_report_and_missing_values() -> None:
    text = report(
        slot=SlotFreshness("cqrs_sync"), latency=LatencyReading(reason="no run has published one")
    ).markdown()
    assert "- replication slot 'cqrs_sync' does not exist" in text
    assert "| slot cqrs_sync lag (bytes) | - | 1,000 |\n" in text
    assert "| end-to-end latency p50 / p99 / max (ms) | - | - |\n" in text
    assert text.endswith("\nEnd-to-end latency: no run has published one\n")
    assert "No problems.\n" in report().markdown()


# -- the oldest unconsumed change's commit time


def change_value(commit_us: int) -> bytes:
    row = {
        "id": "6f1c3c1e-8d1a-4b7e-9d3f-0a1b2c3d4e5f",
        "user_id": "0b8e6a52-3f6d-4c1e-8a7b-2d4c6e8f0a1b",
        "title": "t",
        "created_at": "2026-11-28T07:47:42.123456Z",
        "updated_at": "2026-11-28T07:47:42.123456Z",
        "last_message": "",
        "last_message_at": None,
        "turn_count": 0,
    }
    source = {"ts_us": commit_us, "table": "sessions", "lsn": 1, "txId": 7}
    return json.dumps({"op": "c", "before": None, "after": row, "source": source}).encode()


def message(value: bytes | None, kafka_ms: int | None = 1_800_000_005_000) -> Message:
    stamp = (TIMESTAMP_NOT_AVAILABLE, 0) if kafka_ms is None else (TIMESTAMP_CREATE_TIME, kafka_ms)
    return Message(topic=TOPIC, partition=0, offset=3, key=b"{}", value=value, timestamp=stamp)


def test_commit_time_is_the_source_commit_not_kafka_time() -> None:
    assert commit_time_s(message(change_value(1_800_000_000_250_000))) == 1_800_000_000.25


@pytest.mark.parametrize("value", [None, b"not json"])
def test_tombstones_and_undecodable_events_use_kafka_time(value: bytes | None) -> None:
    assert commit_time_s(message(value)) == 1_800_000_005.0
    assert commit_time_s(message(value, kafka_ms=None)) is None


# -- the latency record the CDC flow publishes (tasks/core/metrics.py)


def metrics(p50: float | None) -> MetricsReport:
    return MetricsReport(10.0, 120, 12.0, p50, p50 and 40.25, p50 and 61.0, 0, 900)


def test_latency_record_round_trips_and_skips_idle_intervals() -> None:
    record = LatencyRecord.of(metrics(18.5), "cqrs-sync-cdc", 1_800_000_000.0)
    assert record == RECORD
    assert LatencyRecord.from_json(json.loads(json.dumps(RECORD.as_json()))) == RECORD
    assert LatencyRecord.of(metrics(None), "cqrs-sync-cdc", 1.0) is None


@pytest.mark.parametrize(
    "value", [None, "x", [], {"consumer_group": "g"}, {**RECORD.as_json(), "events": "many"}]
)
def test_latency_record_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValueError, match="latency record"):
        LatencyRecord.from_json(value)


def test_latency_variable_names_are_valid_prefect_names() -> None:
    assert latency_variable("cqrs-sync-cdc") == "cqrs_cdc_latency__cqrs-sync-cdc"
    name = latency_variable("CQRS-sync-cdc.conversation_timeline")
    assert name == "cqrs_cdc_latency__cqrs-sync-cdc_conversation_timeline"
