"""The CDC consumer: Kafka (Debezium change events) → projection → Scylla read models.

Effectively once = at-least-once delivery + idempotent writes: a batch is decoded, projected
and written (every cell with ``USING TIMESTAMP`` = source version), changes that cannot be
applied go to the dead-letter topic, and only then are the batch's offsets committed. A crash
anywhere before the commit re-delivers the batch, and re-applying it is a no-op.

What stops it and what does not (docs/architecture.md, "Error classes"):
- a service down (TransientError): the batch is retried with capped backoff, never skipped,
  while metrics and a "waiting for X since T" line keep being reported;
- one change that cannot be decoded, projected or written (any other error about that
  change): the change goes to the dead-letter topic with the error, the rest goes on;
- a systemic problem (TerminalError: schema, permissions, an offset gap): the run stops
  with an error that names the cause, committing nothing it did not apply.

Plain code, usable without Prefect; ``flows/cdc.py`` wraps it as a long-lived flow. This
module is the consumer loop, its commits and its part in the group's rebalances;
``tasks/cdc/batch.py`` decodes and projects a batch, ``tasks/cdc/apply.py`` applies it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tasks.adapters import kafka
from tasks.adapters.scylla import ScyllaWriter
from tasks.cdc.apply import BatchApplier, Waiting
from tasks.cdc.batch import ChangeBatch, TruncateNotApplied
from tasks.cdc.dead_letters import DeadLetters
from tasks.cdc.offsets import Gap, OffsetGap, start_positions
from tasks.cdc.options import CdcOptions
from tasks.core.errors import CqrsSyncError, TerminalError, TransientError, classify
from tasks.core.metrics import CdcMetrics, MetricsReport
from tasks.settings import KafkaSettings

__all__ = ["CdcConsumer", "CdcOptions", "RunResult"]

log = logging.getLogger("cqrs_sync.cdc")

COMMIT_RESEND_S = 10.0  # an offset commit unanswered this long is sent again
COMMIT_FLUSH_S = 10.0  # how long a stopping consumer tries to commit what it applied


@dataclass
class RunResult:
    messages: int = 0
    changes: int = 0
    mutations: int = 0
    dead_lettered: int = 0
    batches: int = 0
    stopped_by: str = "limit"
    committed: dict[str, int] = field(default_factory=dict)


Event = Callable[[str, dict[str, Any]], None]


class CdcConsumer:
    """One member of the CDC consumer group. Several processes (flow runs) with the same group
    share the partitions; a rebalance only moves partitions whose batches are committed."""

    def __init__(
        self,
        writer: ScyllaWriter,
        options: CdcOptions,
        settings: KafkaSettings,
        consumer_overrides: dict[str, Any] | None = None,
        emit: Event | None = None,
    ) -> None:
        self.options = options
        self.settings = settings
        self.metrics = CdcMetrics()
        self.stop_event = threading.Event()
        # Every failure to reach Kafka is reported by librdkafka here, not by poll().
        self.consumer = Consumer(
            kafka.consumer_config(
                self.settings,
                **{
                    "statistics.interval.ms": 0,
                    "auto.offset.reset": "error",
                    "error_cb": self._on_kafka_error,
                    "on_commit": self._on_commit,
                    **(consumer_overrides or {}),
                },
            )
        )
        self.applier = BatchApplier(
            writer, DeadLetters(self.settings), self.options, self.stop_event
        )
        # Named events for what a person must act on (a Prefect event in the flow).
        self.emit: Event = emit or (lambda _name, _payload: None)
        # Offsets of applied batches not yet known committed: sent on the next loop turn
        # (or in on_revoke before the partition is given up), cleared by ``_on_commit``.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._commit_sent: float | None = None  # when the commit in flight was sent
        self._fatal: CqrsSyncError | None = None
        self._kafka_down: Waiting | None = None
        self._report: Callable[[MetricsReport], None] | None = None
        self._should_stop: Callable[[], bool] | None = None
        self._last_report = time.monotonic()

    # -- lifecycle

    def stop(self) -> None:
        """Ask the loop to stop after the batch in flight (safe from a signal handler)."""
        self.stop_event.set()

    def run(
        self,
        topics: Sequence[str] | None = None,
        report: Callable[[MetricsReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RunResult:
        o, result = self.options, RunResult()
        self._report, self._should_stop = report, should_stop
        self.consumer.subscribe(
            list(topics or kafka.change_topics(self.settings)),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        started = last_message = self._last_report = time.monotonic()
        try:
            while True:
                if self._fatal is not None:
                    raise self._fatal
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
                if self._report_due():
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
                self.metrics.record_batch(
                    len(msgs), batch.changes, len(batch.dead), batch.commit_ts_us
                )
        finally:
            try:
                self._flush_commits()
                self._publish()
            finally:
                self.close()
        return result

    def close(self) -> None:
        try:
            self.applier.dead_letters.close()
        finally:
            self.consumer.close()  # leaves the group: its partitions move to the others now

    # -- reporting, also while waiting for a service

    def _metrics_report(self) -> MetricsReport:
        waiting = self.applier.waiting or self._kafka_down
        # Lag needs the brokers; while they are down asking would block the loop.
        return self.metrics.report(
            None if self._kafka_down else self.consumer,
            waiting_for=waiting.line() if waiting else None,
        )

    def _report_due(self) -> bool:
        """Report if the interval has passed; True if the run should stop (cancelled)."""
        now = time.monotonic()
        if now - self._last_report < self.options.report_interval_s:
            return False
        self._last_report = now
        if self._kafka_down is not None:
            try:
                self.consumer.list_topics(timeout=2)
            except KafkaException:
                log.warning("%s", self._kafka_down.line())
            else:
                log.info(
                    "Kafka is reachable again after %.0f s", time.time() - self._kafka_down.since
                )
                self._kafka_down = None
        self._publish()
        if self._should_stop is None:
            return False
        try:
            return self._should_stop()
        except Exception as exc:  # cannot tell (the Prefect API is down): keep consuming
            log.warning("cancellation check failed: %s: %s", type(exc).__name__, exc)
            return False

    def _publish(self) -> None:
        """Hand a report to the callback; its failure (Postgres or the Prefect API down)
        is logged, never allowed to stop the consumer."""
        if self._report is None:
            return
        try:
            self._report(self._metrics_report())
        except Exception as exc:
            log.warning("metrics report failed: %s: %s", type(exc).__name__, exc)

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = TerminalError(f"Kafka client error, fatal: {err.str()}")
            return
        if err.code() in (
            KafkaError._ALL_BROKERS_DOWN,
            KafkaError._TRANSPORT,
            KafkaError._RESOLVE,
            KafkaError._TIMED_OUT,
        ):
            if self._kafka_down is None:
                self._kafka_down = Waiting("Kafka", error=err.str())
                log.warning("%s", self._kafka_down.line())
            else:
                self._kafka_down.error = err.str()
        else:
            log.warning("Kafka client error (librdkafka retries): %s", err.str())

    # -- one batch

    def _next_batch(self, want: int) -> list[Message]:
        """Wait for the first message only, then take whatever else is already fetched:
        consume(n, timeout) would hold a half-full batch for the whole timeout, and that
        wait would be added to every event's latency at low rates."""
        first = self.consumer.poll(self.options.batch_timeout_s)
        if first is None:
            return []
        return (
            [first, *self.consumer.consume(num_messages=want - 1, timeout=0)]
            if want > 1
            else [first]
        )

    def _prepare(self, msgs: list[Message]) -> ChangeBatch:
        batch = ChangeBatch()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._consumer_error(msg, err)
                continue
            refused = batch.add(msg, self.options.read_models)
            if refused is not None:
                self._report_truncate(refused)
        return batch.compact()

    def _consumer_error(self, msg: Message, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() == KafkaError._AUTO_OFFSET_RESET:
            # The position left the log while consuming (retention overtook the consumer).
            tp = TopicPartition(msg.topic() or "", msg.partition() or 0)
            (position,) = self.consumer.position([tp])
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            raise OffsetGap(
                self.settings.consumer_group,
                [Gap(tp.topic, tp.partition, position.offset, low, high)],
            )
        if err.fatal():
            raise classify(KafkaException(err), "Kafka consumer")
        log.warning("Kafka consumer error (librdkafka retries): %s", err.str())

    def _report_truncate(self, error: TruncateNotApplied) -> None:
        log.error("%s", error)
        self.emit(
            "cqrs.cdc.truncate",
            {
                "table": error.table,
                "read_models": error.read_models,
                "commit_ts_us": error.commit_ts_us,
            },
        )

    def _apply(self, batch: ChangeBatch) -> bool:
        """Apply the batch (``BatchApplier.apply``); False if a stop was asked meanwhile."""
        return self.applier.apply(batch, self._report_due)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit what is applied, asynchronously: ``_on_commit`` (served by poll) clears it.

        Never a synchronous commit: librdkafka holds one until a group coordinator answers,
        with no deadline, and a coordinator lost in a Kafka restart left the loop blocked in
        it for good: no polling, no reports, the group left after max.poll.interval.ms
        (docs/decisions.md, "Offsets are committed asynchronously"). One commit is in flight
        at a time; a newer one waits for its answer, or is sent anyway after
        ``COMMIT_RESEND_S`` without one."""
        self._uncommitted.update(offsets)
        if not self._uncommitted:
            return
        now = time.monotonic()
        if self._commit_sent is not None:
            waited = now - self._commit_sent
            if waited < COMMIT_RESEND_S:
                return
            log.warning("offset commit unanswered after %.0f s; sending it again", waited)
        tps = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items()]
        self._commit_sent = now  # before: an answer may come before commit() returns
        try:
            self.consumer.commit(offsets=tps, asynchronous=True)
        except KafkaException as exc:
            self._commit_sent = None
            self._commit_failed(exc.args[0] if exc.args else None, exc)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._commit_sent = None
        if err is not None:
            self._commit_failed(err, KafkaException(err))
            return
        for tp in partitions:
            key = (tp.topic, tp.partition)
            # A partition's newer offset, applied since this commit was sent, stays.
            if tp.error is None and self._uncommitted.get(key) == tp.offset:
                del self._uncommitted[key]

    def _commit_failed(self, err: KafkaError | None, exc: KafkaException) -> None:
        code = err.code() if err is not None else None
        if code in (
            KafkaError.REBALANCE_IN_PROGRESS,
            KafkaError.ILLEGAL_GENERATION,
            KafkaError.UNKNOWN_MEMBER_ID,
            KafkaError._NO_OFFSET,
        ):
            # Kept in _uncommitted: sent again on the next loop turn, or in on_revoke. A
            # partition that moved on is re-read by its new owner from the last commit, and
            # re-applying is idempotent.
            log.info("commit deferred by a rebalance: %s", exc)
            return
        error = classify(exc, "offset commit")
        if not isinstance(error, TransientError):
            self._fatal = error  # e.g. the group is not authorized: say so, stop
            return
        # Not committing loses nothing: what is applied is re-delivered and re-applied.
        log.warning("offset commit failed, sent again on the next loop turn: %s", exc)

    def _flush_commits(self) -> None:
        """Before leaving the group: commit what is applied, for at most
        ``COMMIT_FLUSH_S`` (polling serves the answer; what it fetches is not applied, so
        it is re-delivered to whoever reads the partition next)."""
        deadline = time.monotonic() + COMMIT_FLUSH_S
        while self._uncommitted and self._fatal is None and time.monotonic() < deadline:
            self._commit({})
            try:
                self.consumer.poll(0.1)
            except Exception as exc:  # a closed or failed consumer: nothing more to commit
                log.warning("could not commit on the way out: %s", exc)
                return
        if self._uncommitted:
            log.warning(
                "stopping with %d partition(s) applied but not committed: re-delivered and "
                "re-applied (idempotently) by the next reader",
                len(self._uncommitted),
            )

    # -- rebalances

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Positions are chosen here, not by auto.offset.reset (which would skip a gap).
        if not partitions:
            consumer.incremental_assign(partitions)
            return
        try:
            committed = consumer.committed(partitions, timeout=30)
            marks = {
                (tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=30)
                for tp in partitions
            }
        except KafkaException as exc:
            # Without the committed offsets no start is safe: stop (a supervisor restarts).
            self._fatal = classify(
                exc, f"reading the committed offsets of {len(partitions)} assigned partitions"
            )
            return
        positions, gaps = start_positions(committed, marks)
        if gaps:
            # Not fetched at all: the run stops at the next loop turn with the gap named.
            gapped = {(g.topic, g.partition) for g in gaps}
            positions = [tp for tp in positions if (tp.topic, tp.partition) not in gapped]
            self._fatal = OffsetGap(self.settings.consumer_group, gaps)
            log.error("%s", self._fatal)
            self.emit(
                "cqrs.cdc.offset-gap",
                {"group": self.settings.consumer_group, "gaps": [g.describe() for g in gaps]},
            )
        consumer.incremental_assign(positions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Revocation is served inside poll/consume, between batches: what is applied but not
        # committed yet (a commit a rebalance interrupted) is committed before giving it up.
        log.info("partitions revoked: %s", [f"{p.topic}[{p.partition}]" for p in partitions])
        revoked = {(p.topic, p.partition) for p in partitions}
        pending = [
            TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items() if (t, p) in revoked
        ]
        if pending:
            try:
                # Asynchronous (see ``_commit``): sent before the partitions are given up.
                consumer.commit(offsets=pending, asynchronous=True)
            except KafkaException as exc:
                log.warning(
                    "could not commit revoked partitions (re-applied by their next "
                    "owner, idempotently): %s",
                    exc,
                )
        for key in revoked:
            self._uncommitted.pop(key, None)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost: %s", [f"{p.topic}[{p.partition}]" for p in partitions])
        for p in partitions:
            self._uncommitted.pop((p.topic, p.partition), None)
