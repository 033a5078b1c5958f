"""How far behind the read models are: the replication slot, the Debezium connector, the CDC
consumer group's lag per partition, the last end-to-end latency and the dead-letter topic.

Read-only, so it runs from any machine that reaches the services: Postgres as the reader role,
Kafka Connect and the Prefect API with GETs, Kafka without joining or committing for any group.
A service that does not answer is a problem in the report, never an exception; ``problems``
also names each threshold of ``AuditSettings`` passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from tasks.adapters import kafka, postgres
from tasks.adapters.kafka_connect import KafkaConnectClient
from tasks.core.debezium import decode_message
from tasks.core.errors import CqrsSyncError, DecodeError, classify
from tasks.core.metrics import LatencyRecord, latency_variable
from tasks.settings import AuditSettings, Settings

TIMEOUT_S = 5.0  # per call: an audit waits this long for a service, then reports it down
# What a service that is down, or refuses us, raises through the adapters and clients used here.
_SERVICE_ERRORS = (CqrsSyncError, KafkaException, psycopg.Error, httpx.HTTPError)


@dataclass(frozen=True)
class SlotFreshness:
    name: str
    exists: bool = False
    active: bool = False
    retained_bytes: int | None = None  # WAL kept for the slot: current LSN - restart_lsn
    lag_bytes: int | None = None  # WAL not confirmed by Debezium: current - confirmed_flush_lsn
    # Seconds since the commit of the last transaction Debezium confirmed (its source offset's
    # ts_usec; the slot's confirmed_flush_lsn is that offset's lsn), 0 when nothing is
    # unconfirmed: an upper bound of how long the oldest unconfirmed change has waited.
    # Postgres alone cannot date an LSN without reading WAL (pg_walinspect, admin rights);
    # Debezium's heartbeat (5 s) keeps this to a few seconds on an idle database.
    lag_s: float | None = None
    gap: str | None = None  # WAL the slot needed was lost: changes never reached Kafka
    # The slot starts past Debezium's recorded offset: it may have been recreated, but a
    # healthy connector shows the same for a while after a restart (docs/decisions.md, "The
    # CDC run stops on a slot gap"), so it is a warning, not a problem; the key-level diff
    # finds any rows really missed.
    suspect: str | None = None
    error: str | None = None  # Postgres could not be read


@dataclass(frozen=True)
class ConnectorFreshness:
    name: str
    url: str
    state: str | None = None  # RUNNING, PAUSED, FAILED...; None: not registered (or error)
    task_states: tuple[str, ...] = ()
    trace: str | None = None  # the first line of a failure's stack trace
    error: str | None = None  # Kafka Connect did not answer


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # the group's next offset to consume; None: no commit yet
    log_start: int
    log_end: int
    # now - source commit time of the oldest unconsumed change (the message at the next
    # offset): 0 when caught up, None when it could not be read.
    age_s: float | None = 0.0

    @property
    def next_offset(self) -> int:
        # Without a commit the consumer starts at the log's start (tasks/cdc/offsets.py).
        return self.log_start if self.committed is None else self.committed

    @property
    def lag(self) -> int:
        return max(0, self.log_end - self.next_offset)

    @property
    def gap(self) -> bool:
        """Retention deleted changes the group never consumed, or the topic was recreated."""
        return not self.log_start <= self.next_offset <= self.log_end

    @property
    def label(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass(frozen=True)
class ConsumerLag:
    group: str
    partitions: tuple[PartitionLag, ...] = ()
    missing_topics: tuple[str, ...] = ()
    error: str | None = None  # Kafka could not be read

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def age_s(self) -> float:
        return max((p.age_s or 0.0 for p in self.partitions), default=0.0)


@dataclass(frozen=True)
class LatencyReading:
    record: LatencyRecord | None = None  # the last one a CDC flow run of the group published
    reason: str | None = None  # why there is none (not a problem by itself)
    error: str | None = None  # the Prefect API did not answer


@dataclass(frozen=True)
class DeadLetterCount:
    topic: str
    retained: int | None = None  # end - start offsets, summed over the partitions
    error: str | None = None


@dataclass(frozen=True)
class FreshnessReport:
    checked_at: datetime
    slot: SlotFreshness
    connector: ConnectorFreshness
    consumer: ConsumerLag
    latency: LatencyReading
    dead_letters: DeadLetterCount
    limits: AuditSettings  # the thresholds the problems were found with
    problems: tuple[str, ...]

    @property
    def warnings(self) -> tuple[str, ...]:
        """What an operator should look at that does not fail the audit."""
        return () if self.slot.suspect is None else (self.slot.suspect,)

    @property
    def consumer_lag_age_s(self) -> float:
        """The oldest unconsumed change's age over the partitions (0 if caught up)."""
        return self.consumer.age_s

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per measure, for a Prefect table artifact (limit None: none applies)."""
        s, c, lim, rec = self.slot, self.consumer, self.limits, self.latency.record
        con, dlq = self.connector, self.dead_letters
        tasks = con.state and f"{con.state} / {', '.join(con.task_states) or 'no tasks'}"
        latency = rec and f"{rec.p50_ms:.1f} / {rec.p99_ms:.1f} / {rec.max_ms:.1f}"
        ago = rec and _round(self.checked_at.timestamp() - rec.measured_at)
        rows: list[tuple[str, Any, Any]] = [
            (f"slot {s.name} exists / active", f"{s.exists} / {s.active}", "True / True"),
            (f"slot {s.name} WAL retained (bytes)", s.retained_bytes, None),
            (f"slot {s.name} lag (bytes)", s.lag_bytes, lim.max_slot_lag_bytes),
            (f"slot {s.name} lag (s)", _round(s.lag_s), lim.max_slot_lag_s),
            (f"connector {con.name} / tasks", tasks, "RUNNING"),
            *(
                (f"{p.label} lag (changes / s)", f"{p.lag} / {_round(p.age_s)}", None)
                for p in c.partitions
            ),
            (f"group {c.group} lag (changes)", c.total, lim.max_consumer_lag),
            (f"group {c.group} oldest unconsumed (s)", _round(c.age_s), lim.max_consumer_lag_s),
            ("end-to-end latency p50 / p99 / max (ms)", latency, None),
            ("end-to-end latency measured (s ago)", ago, None),
            (f"dead letters in {dlq.topic}", dlq.retained, lim.max_dead_letters),
        ]
        return [{"measure": m, "value": v, "limit": limit} for m, v, limit in rows]

    def markdown(self) -> str:
        problems = "".join(f"- {p}\n" for p in self.problems) or "No problems.\n"
        problems += "".join(f"- warning: {w}\n" for w in self.warnings)
        table = "".join(
            f"| {r['measure']} | {_cell(r['value'])} | {_cell(r['limit'])} |\n"
            for r in self.table_rows()
        )
        why = self.latency.reason  # an error is one of the problems already
        note = f"\nEnd-to-end latency: {why}\n" if why else ""
        return (
            f"## Freshness\n\n{problems}\n| measure | value | limit |\n|---|---|---|\n{table}{note}"
        )


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


# -- problems (pure)


def find_problems(
    slot: SlotFreshness,
    connector: ConnectorFreshness,
    consumer: ConsumerLag,
    latency: LatencyReading,
    dead: DeadLetterCount,
    limits: AuditSettings,
) -> tuple[str, ...]:
    """Each service down, missing or not running, and each threshold passed, as a sentence."""
    found = [*_slot_problems(slot, limits), *_consumer_problems(consumer, limits)]
    c = connector
    if c.error:
        found.append(f"Debezium connector {c.name!r} could not be checked: {c.error}")
    elif c.state is None:
        found.append(f"Debezium connector {c.name!r} is not registered in Kafka Connect at {c.url}")
    elif c.state != "RUNNING" or not c.task_states or set(c.task_states) != {"RUNNING"}:
        why = f": {c.trace}" if c.trace else ""
        found.append(
            f"Debezium connector {c.name!r} is {c.state}, tasks {list(c.task_states)}{why}"
        )
    if latency.error:
        found.append(f"the last end-to-end latency could not be read: {latency.error}")
    if dead.error:
        found.append(f"dead-letter topic {dead.topic!r} could not be read: {dead.error}")
    elif dead.retained is not None and dead.retained > limits.max_dead_letters:
        limit = f"(limit {limits.max_dead_letters:,})"
        found.append(f"dead-letter topic {dead.topic!r} holds {dead.retained:,} messages {limit}")
    return tuple(found)


def _slot_problems(s: SlotFreshness, limits: AuditSettings) -> list[str]:
    slot = f"replication slot {s.name!r}"
    if s.error:
        return [f"{slot} could not be read: {s.error}"]
    if not s.exists:
        return [f"{slot} does not exist: changes are not captured"]
    found = [] if s.active else [f"{slot} is inactive: no connector is streaming from it"]
    found += [s.gap] if s.gap else []
    if s.lag_bytes is not None and s.lag_bytes > limits.max_slot_lag_bytes:
        limit = f"(limit {limits.max_slot_lag_bytes:,})"
        found.append(f"{slot} holds {s.lag_bytes:,} bytes of WAL Debezium did not confirm {limit}")
    if s.lag_s is not None and s.lag_s > limits.max_slot_lag_s:
        limit = f"(limit {limits.max_slot_lag_s:,.1f} s)"
        found.append(f"{slot} is {s.lag_s:,.1f} s behind (since its last confirmed commit) {limit}")
    return found


def _consumer_problems(c: ConsumerLag, limits: AuditSettings) -> list[str]:
    group = f"consumer group {c.group!r}"
    if c.error:
        return [f"{group} could not be checked: {c.error}"]
    found = [f"change topic {t!r} does not exist" for t in c.missing_topics]
    for p in c.partitions:
        if p.gap:
            log = f"the log ({p.log_start}..{p.log_end})"
            found.append(f"{group} on {p.label}: committed offset {p.committed} is outside {log}")
        elif p.age_s is None and p.lag:
            found.append(f"{group} on {p.label}: the oldest of {p.lag:,} changes could not be read")
    if c.total > limits.max_consumer_lag:
        worst = max(c.partitions, key=lambda p: p.lag)
        limit, most = f"(limit {limits.max_consumer_lag:,})", f"{worst.label} ({worst.lag:,})"
        found.append(f"{group} is {c.total:,} changes behind {limit}, most on {most}")
    if c.age_s > limits.max_consumer_lag_s:
        oldest = max(c.partitions, key=lambda p: p.age_s or 0.0)
        age, limit = f"{c.age_s:,.1f} s", f"(limit {limits.max_consumer_lag_s:,.1f} s)"
        found.append(
            f"{group}: the oldest unconsumed change, on {oldest.label}, is {age} old {limit}"
        )
    return found


def slot_lag_s(lag_bytes: int | None, confirmed_commit_us: object, now: float) -> float | None:
    """See ``SlotFreshness.lag_s``: 0 when the slot confirmed everything, None when unknown."""
    if lag_bytes is not None and lag_bytes <= 0:
        return 0.0
    if lag_bytes is None or not isinstance(confirmed_commit_us, int):
        return None
    return max(0.0, now - confirmed_commit_us / 1e6)  # two machines' clocks: never below 0


def commit_time_s(msg: Message) -> float | None:
    """The source commit time of a change event; for a delete's tombstone or an undecodable
    event (which the consumer dead-letters), the time Kafka stamped on it, just after."""
    try:
        ts_us = decode_message(msg.topic() or "", msg.key(), msg.value()).commit_ts_us
    except DecodeError:
        ts_us = None
    if ts_us is not None:
        return ts_us / 1e6
    kind, ms = msg.timestamp()
    return ms / 1000 if kind != 0 else None  # 0: TIMESTAMP_NOT_AVAILABLE


# -- reading (read-only)


def check_freshness(settings: Settings) -> FreshnessReport:
    """How fresh the read models are now; a service that is down is one of the problems."""
    offset, connector = _connector(settings)
    slot = _slot(settings, offset)
    consumer, dead = _kafka(settings)
    latency = _latency(settings)
    problems = find_problems(slot, connector, consumer, latency, dead, settings.audit)
    now = datetime.now(UTC)
    return FreshnessReport(now, slot, connector, consumer, latency, dead, settings.audit, problems)


def _why(exc: BaseException, what: str) -> str:
    return str(classify(exc, what))  # ServiceUnavailable names the service and its address


def _connector(s: Settings) -> tuple[dict[str, Any] | None, ConnectorFreshness]:
    name, url = s.kafka.connector_name, s.kafka.connect_url
    client = KafkaConnectClient(url, timeout=TIMEOUT_S)
    try:
        state = client.status(name)
        offset = client.source_offset(name) if state is not None else None
    except _SERVICE_ERRORS as exc:
        return None, ConnectorFreshness(name, url, error=_why(exc, f"Kafka Connect at {url}"))
    finally:
        client.http.close()
    if state is None:
        return None, ConnectorFreshness(name, url)
    trace = (state.trace or "").strip().splitlines()[:1]
    states = tuple(state.task_states)
    return offset, ConnectorFreshness(name, url, state.connector_state, states, *trace)


# pg_replication_slots and pg_current_wal_lsn() are open to every role: the reader suffices.
_SLOT_SQL = """SELECT active, plugin, wal_status, confirmed_flush_lsn::text,
                      pg_current_wal_lsn()::text,
                      pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                      pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
                 FROM pg_replication_slots WHERE slot_name = %s"""


def _slot(s: Settings, offset: dict[str, Any] | None) -> SlotFreshness:
    pg, name = s.postgres, s.postgres.slot_name
    try:
        with postgres.connect("reader", pg, autocommit=True) as conn:
            row = conn.execute(_SLOT_SQL, (name,)).fetchone()
    except _SERVICE_ERRORS as exc:
        return SlotFreshness(name, error=_why(exc, f"PostgreSQL at {pg.host}:{pg.port}"))
    if row is None:
        return SlotFreshness(name)
    active, plugin, wal_status, flush, current, retained, lag = row
    status = postgres.SlotStatus(name, True, bool(active), plugin, wal_status, lag, flush, current)
    lsn, ts_usec = (offset.get("lsn"), offset.get("ts_usec")) if offset else (None, None)
    gap, suspect = postgres.slot_gap_or_suspect(status, lsn if isinstance(lsn, int) else None)
    if suspect is not None:
        suspect += " (or Debezium confirmed past its recorded offset, as after a restart)"
    lag_s = slot_lag_s(lag, ts_usec, time.time())
    return SlotFreshness(name, True, bool(active), retained, lag, lag_s, gap, suspect)


def _kafka(s: Settings) -> tuple[ConsumerLag, DeadLetterCount]:
    k = s.kafka
    # In the CDC group only to read its commits: assign() never joins the group, and nothing
    # is committed (auto commit is off, and offsets are not even stored). A broker that is
    # down is a problem in the report: librdkafka would also log each reconnect (level 3).
    config = {"enable.auto.offset.store": False, "auto.offset.reset": "error", "log_level": 2}
    consumer = Consumer(kafka.consumer_config(k, **config, error_cb=lambda _e: None))
    try:
        try:
            topics = consumer.list_topics(timeout=TIMEOUT_S).topics
            lag = _consumer_lag(consumer, k.consumer_group, kafka.change_topics(k), topics)
        except _SERVICE_ERRORS as exc:
            error = _why(exc, f"Kafka at {k.bootstrap_servers}")
            return ConsumerLag(k.consumer_group, error=error), DeadLetterCount(
                k.dead_letter_topic, error=error
            )
        return lag, _dead_letters(consumer, k.dead_letter_topic, topics)
    finally:
        consumer.close()


def _marks(consumer: Consumer, topic: str, partitions: Any) -> dict[int, tuple[int, int]]:
    tps = (TopicPartition(topic, p) for p in sorted(partitions))
    return {tp.partition: consumer.get_watermark_offsets(tp, TIMEOUT_S, cached=False) for tp in tps}


def _consumer_lag(
    consumer: Consumer, group: str, wanted: list[str], topics: dict[str, Any]
) -> ConsumerLag:
    marks = {
        (t, p): m
        for t in wanted
        if t in topics
        for p, m in _marks(consumer, t, topics[t].partitions).items()
    }
    committed = consumer.committed([TopicPartition(t, p) for t, p in marks], timeout=TIMEOUT_S)
    lags = [
        PartitionLag(
            tp.topic,
            tp.partition,
            None if tp.offset < 0 else tp.offset,
            *marks[(tp.topic, tp.partition)],
        )
        for tp in committed
    ]
    behind = [p for p in lags if p.lag and not p.gap]
    ages = _oldest_ages(consumer, behind)
    dated = [
        p if p not in behind else replace(p, age_s=ages.get((p.topic, p.partition))) for p in lags
    ]
    return ConsumerLag(group, tuple(dated), tuple(t for t in wanted if t not in topics))


def _oldest_ages(consumer: Consumer, behind: list[PartitionLag]) -> dict[tuple[str, int], float]:
    """now - commit time of the first message at each partition's next offset."""
    if not behind:
        return {}
    consumer.assign([TopicPartition(p.topic, p.partition, p.next_offset) for p in behind])
    wanted, ages = {(p.topic, p.partition) for p in behind}, {}
    deadline = time.monotonic() + TIMEOUT_S
    while wanted and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        where = None if msg is None or msg.error() else (msg.topic(), msg.partition())
        if msg is not None and where in wanted:
            wanted.discard(where)  # only the first message: later ones are younger
            at = commit_time_s(msg)
            if at is not None:
                ages[where] = max(0.0, time.time() - at)
    consumer.unassign()
    return ages


def _dead_letters(consumer: Consumer, topic: str, topics: dict[str, Any]) -> DeadLetterCount:
    if topic not in topics:
        return DeadLetterCount(topic, error="the topic does not exist")
    try:
        marks = _marks(consumer, topic, topics[topic].partitions)
    except _SERVICE_ERRORS as exc:
        return DeadLetterCount(topic, error=_why(exc, f"reading the offsets of {topic}"))
    return DeadLetterCount(topic, sum(high - low for low, high in marks.values()))


def _latency(s: Settings) -> LatencyReading:
    """The CDC flow's last published latency (flows/cdc.py, publish_latency)."""
    group, url = s.kafka.consumer_group, s.prefect_api_url.rstrip("/")
    name = latency_variable(group)
    try:
        resp = httpx.get(f"{url}/variables/name/{name}", timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return LatencyReading(error=f"the Prefect API at {url} is unavailable: {exc}")
    if resp.status_code == 404:
        why = f"no CDC flow run of group {group!r} has published one (Prefect variable {name!r})"
        return LatencyReading(reason=why)
    if resp.status_code >= 400:
        return LatencyReading(error=f"the Prefect API at {url} answered {resp.status_code}")
    try:
        return LatencyReading(LatencyRecord.from_json(resp.json().get("value")))
    except ValueError as exc:
        return LatencyReading(reason=f"Prefect variable {name!r} holds no latency record: {exc}")
