"""The CDC consumer: Kafka (Debezium change events) → projection → Scylla read models.

Effectively once = at-least-once delivery + idempotent writes: a batch is decoded, projected
and written (concurrently, every cell with ``USING TIMESTAMP`` = source version), messages it
cannot decode go to the dead-letter topic, and only then are the batch's offsets committed.
A crash anywhere before the commit re-delivers the batch, and re-applying it is a no-op.

Plain code, usable without Prefect; ``flows/cdc.py`` wraps it as a long-lived flow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from tasks import kafka
from tasks.debezium import decode_message
from tasks.errors import ConfigurationError, DecodeError, TransientError
from tasks.metrics import CdcMetrics, MetricsReport
from tasks.projection import READ_MODELS, Mutation, compact, project
from tasks.scylla import ScyllaWriter
from tasks.settings import KafkaSettings, get_settings

log = logging.getLogger("cqrs_sync.cdc")


@dataclass(frozen=True)
class CdcOptions:
    """What a CDC run does; validated before any work (a bad value names itself)."""

    batch_size: int = 2000
    # How long one poll waits for the first message of a batch (bounds the stop latency).
    batch_timeout_s: float = 0.1
    max_messages: int | None = None
    max_seconds: float | None = None
    report_interval_s: float = 10.0
    read_models: tuple[str, ...] = READ_MODELS
    # Backoff while Scylla or Kafka is down: the batch is retried, never skipped.
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    # Stop after this long without any message (None: run until stopped).
    idle_exit_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigurationError(f"batch_size must be > 0, got {self.batch_size}")
        if self.batch_timeout_s <= 0:
            raise ConfigurationError(f"batch_timeout_s must be > 0, got {self.batch_timeout_s}")
        if self.max_messages is not None and self.max_messages <= 0:
            raise ConfigurationError(f"max_messages must be > 0, got {self.max_messages}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigurationError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.report_interval_s <= 0:
            raise ConfigurationError("report_interval_s must be > 0")
        unknown = set(self.read_models) - set(READ_MODELS)
        if unknown or not self.read_models:
            raise ConfigurationError(f"unknown read model(s) {sorted(unknown)}; known: "
                                     f"{list(READ_MODELS)}")


@dataclass
class RunResult:
    messages: int = 0
    changes: int = 0
    mutations: int = 0
    dead_lettered: int = 0
    batches: int = 0
    stopped_by: str = "limit"
    committed: dict[str, int] = field(default_factory=dict)


@dataclass
class _Batch:
    mutations: list[Mutation] = field(default_factory=list)
    dead: list[tuple[Message, DecodeError]] = field(default_factory=list)
    commit_ts_us: list[int] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    changes: int = 0


def dead_letter_headers(msg: Message, error: Exception) -> list[tuple[str, str | bytes | None]]:
    return [
        ("dlq.error", str(error)[:4000].encode()),
        ("dlq.error.class", type(error).__name__.encode()),
        ("dlq.source.topic", (msg.topic() or "").encode()),
        ("dlq.source.partition", str(msg.partition()).encode()),
        ("dlq.source.offset", str(msg.offset()).encode()),
    ]


class CdcConsumer:
    """One member of the CDC consumer group. Several processes (flow runs) with the same group
    share the partitions; a rebalance only moves partitions whose batches are committed."""

    def __init__(self, writer: ScyllaWriter, options: CdcOptions | None = None,
                 settings: KafkaSettings | None = None,
                 consumer_overrides: dict[str, Any] | None = None) -> None:
        self.options = options or CdcOptions()
        self.settings = settings or get_settings().kafka
        self.writer = writer
        self.metrics = CdcMetrics()
        self.stop_event = threading.Event()
        self.consumer = Consumer(kafka.consumer_config(
            self.settings, **{"statistics.interval.ms": 0, **(consumer_overrides or {})}))
        self.producer = Producer(kafka.producer_config(
            self.settings, **{"message.max.bytes": 16 * 1024 * 1024}))
        self._dlq_errors: list[str] = []
        # Offsets of applied batches whose commit a rebalance interrupted: retried on the
        # next loop turn, or committed in on_revoke before the partition is given up.
        self._uncommitted: dict[tuple[str, int], int] = {}

    # -- lifecycle

    def stop(self) -> None:
        """Ask the loop to stop after the batch in flight (safe from a signal handler)."""
        self.stop_event.set()

    def run(self, topics: Sequence[str] | None = None,
            report: Callable[[MetricsReport], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult:
        o, result = self.options, RunResult()
        self.consumer.subscribe(list(topics or kafka.change_topics(self.settings)),
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        started = last_report = last_message = time.monotonic()
        try:
            while True:
                if self.stop_event.is_set():
                    result.stopped_by = "signal"
                    break
                now = time.monotonic()
                if o.max_seconds is not None and now - started >= o.max_seconds:
                    result.stopped_by = "max_seconds"
                    break
                if o.max_messages is not None and result.messages >= o.max_messages:
                    result.stopped_by = "max_messages"
                    break
                if o.idle_exit_s is not None and now - last_message >= o.idle_exit_s:
                    result.stopped_by = "idle"
                    break
                if now - last_report >= o.report_interval_s:
                    last_report = now
                    rep = self.metrics.report(self.consumer)
                    if report:
                        report(rep)
                    if should_stop and should_stop():
                        result.stopped_by = "cancelled"
                        break
                want = o.batch_size
                if o.max_messages is not None:
                    want = min(want, o.max_messages - result.messages)
                msgs = self._next_batch(want)
                if not msgs:
                    if self._uncommitted:
                        self._commit({})
                    continue
                last_message = time.monotonic()
                batch = self._prepare(msgs)
                if not self._apply(batch):
                    result.stopped_by = "signal"  # abandoned in flight: nothing committed
                    break
                self._commit(batch.offsets)
                result.messages += len(msgs)
                result.changes += batch.changes
                result.mutations += len(batch.mutations)
                result.dead_lettered += len(batch.dead)
                result.batches += 1
                for (topic, part), off in batch.offsets.items():
                    result.committed[f"{topic}[{part}]"] = off
                self.metrics.record_batch(len(msgs), batch.changes, len(batch.dead),
                                          batch.commit_ts_us)
        finally:
            if report:
                report(self.metrics.report(self.consumer))
            self.close()
        return result

    def close(self) -> None:
        try:
            self.producer.flush(10)
        finally:
            self.consumer.close()  # leaves the group: its partitions move to the others now

    # -- one batch

    def _next_batch(self, want: int) -> list[Message]:
        """Wait for the first message only, then take whatever else is already fetched:
        consume(n, timeout) would hold a half-full batch for the whole timeout, and that
        wait would be added to every event's latency at low rates."""
        first = self.consumer.poll(self.options.batch_timeout_s)
        if first is None:
            return []
        return [first, *self.consumer.consume(num_messages=want - 1, timeout=0)] \
            if want > 1 else [first]

    def _prepare(self, msgs: list[Message]) -> _Batch:
        batch = _Batch()
        read_models = self.options.read_models
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("Kafka consumer error (librdkafka retries): %s", err)
                continue
            topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
            batch.offsets[(topic, partition)] = offset + 1
            try:
                event = decode_message(topic, msg.key(), msg.value())
                if event.kind != "change" or event.change is None:
                    continue
                batch.mutations.extend(project(event.change, read_models))
                batch.changes += 1
                if event.commit_ts_us is not None:
                    batch.commit_ts_us.append(event.commit_ts_us)
            except DecodeError as exc:
                batch.dead.append((msg, exc))
        batch.mutations = compact(batch.mutations)
        return batch

    def _apply(self, batch: _Batch) -> bool:
        """Write the batch's mutations and dead letters, retrying transient failures with
        backoff until they succeed. False if a stop was asked while retrying (the batch is
        abandoned uncommitted and will be re-delivered)."""
        delay = self.options.retry_initial_s
        while True:
            try:
                self.writer.write(batch.mutations)
                self._dead_letter(batch.dead)
                return True
            except TransientError as exc:
                log.warning("batch of %d mutations not applied, retrying in %.1fs: %s",
                            len(batch.mutations), delay, exc)
            if self.stop_event.wait(delay):
                return False
            delay = min(delay * 2, self.options.retry_max_s)

    def _dead_letter(self, dead: list[tuple[Message, DecodeError]]) -> None:
        if not dead:
            return
        self._dlq_errors.clear()
        for msg, exc in dead:
            log.warning("dead-lettering %s[%d]@%d: %s", msg.topic(), msg.partition(),
                        msg.offset(), exc)
            self.producer.produce(self.settings.dead_letter_topic, key=msg.key(),
                                  value=msg.value(), headers=dead_letter_headers(msg, exc),
                                  on_delivery=self._dlq_delivered)
        # The offsets of dead-lettered messages are committed only once the DLQ has them.
        remaining = self.producer.flush(30)
        if remaining or self._dlq_errors:
            raise TransientError(f"dead-letter topic did not take {remaining} message(s): "
                                 f"{self._dlq_errors[:1]}")

    def _dlq_delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._dlq_errors.append(str(err))

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        self._uncommitted.update(offsets)
        if not self._uncommitted:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items()]
        delay = self.options.retry_initial_s
        for _attempt in range(8):
            try:
                self.consumer.commit(offsets=tps, asynchronous=False)
                self._uncommitted.clear()
                return
            except KafkaException as exc:
                code = exc.args[0].code() if exc.args else None
                if code in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                            KafkaError.UNKNOWN_MEMBER_ID, KafkaError._NO_OFFSET):
                    # Kept in _uncommitted: retried on the next loop turn, or committed in
                    # on_revoke. A partition that moved on is re-read by its new owner from
                    # the last commit, and re-applying is idempotent.
                    log.info("commit deferred by a rebalance: %s", exc)
                    return
                log.warning("offset commit failed, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, self.options.retry_max_s)
        # Not committing loses nothing: the batch is re-delivered and re-applied.
        log.error("offset commit kept failing; the batch will be re-delivered after a restart")

    # -- rebalances

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Revocation is served inside poll/consume, between batches: what is applied but not
        # committed yet (a commit a rebalance interrupted) is committed before giving it up.
        log.info("partitions revoked: %s", [f"{p.topic}[{p.partition}]" for p in partitions])
        revoked = {(p.topic, p.partition) for p in partitions}
        pending = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items()
                   if (t, p) in revoked]
        if pending:
            try:
                consumer.commit(offsets=pending, asynchronous=False)
            except KafkaException as exc:
                log.warning("could not commit revoked partitions (re-applied by their next "
                            "owner, idempotently): %s", exc)
        for key in revoked:
            self._uncommitted.pop(key, None)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost: %s", [f"{p.topic}[{p.partition}]" for p in partitions])
        for p in partitions:
            self._uncommitted.pop((p.topic, p.partition), None)

