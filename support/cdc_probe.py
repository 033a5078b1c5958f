"""Observe the CDC path from a program: for demos, benchmarks and tests, not for production.

- :class:`ChangeTap` reads the Debezium change topics from their current end and hands back the
  decoded events of interest with their (topic, partition, offset).
- :class:`LocalCdc` runs a CDC consumer (the real one, ``tasks.cdc.consumer.CdcConsumer``) in a
  thread, in a consumer group of its own positioned at the topics' current end, and answers "has CDC
  applied this event?" from the group's committed offsets: the consumer commits a batch only
  after its Scylla writes succeeded, so a committed offset past an event proves it was applied.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from confluent_kafka import Consumer, TopicPartition

from tasks.adapters import kafka, scylla
from tasks.cdc.consumer import CdcConsumer
from tasks.cdc.options import CdcOptions
from tasks.core.debezium import DecodedEvent, decode_message
from tasks.settings import KafkaSettings, Settings


@dataclass(frozen=True, slots=True)
class TappedEvent:
    topic: str
    partition: int
    offset: int
    event: DecodedEvent


def end_offsets(consumer: Consumer, topics: Iterable[str]) -> list[TopicPartition]:
    out = []
    for topic in topics:
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out.append(TopicPartition(topic, p, high))
    return out


def position_group_at_end(settings: KafkaSettings) -> None:
    """Commit the change topics' end offsets for ``settings.consumer_group`` before any member
    subscribes: the group then starts exactly there, with no window in which a change could
    be skipped or replayed."""
    c = Consumer(kafka.consumer_config(settings))
    try:
        c.commit(offsets=end_offsets(c, kafka.change_topics(settings)), asynchronous=False)
    finally:
        c.close()


class ChangeTap:
    """Change events committed after construction (assigned at the end offsets, no group)."""

    def __init__(self, settings: KafkaSettings) -> None:
        cfg = settings
        self.consumer = Consumer(
            kafka.consumer_config(
                cfg, **{"group.id": f"tap-{uuid.uuid4()}", "enable.auto.offset.store": False}
            )
        )
        self.consumer.assign(end_offsets(self.consumer, kafka.change_topics(cfg)))

    def collect(
        self, match: Callable[[DecodedEvent], bool], count: int, timeout_s: float = 30.0
    ) -> list[TappedEvent]:
        """The first ``count`` change events that ``match``, or fewer on timeout."""
        found: list[TappedEvent] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            msg = self.consumer.poll(0.2)
            if msg is None or msg.error() or msg.value() is None:
                continue
            topic, partition, offset = msg.topic() or "", msg.partition(), msg.offset()
            event = decode_message(topic, msg.key(), msg.value())
            if (
                event.kind == "change"
                and match(event)
                and partition is not None
                and offset is not None
            ):
                found.append(TappedEvent(topic, partition, offset, event))
        return found

    def close(self) -> None:
        self.consumer.close()


class LocalCdc:
    """A CDC consumer thread from the topics' current end; use as a context manager."""

    def __init__(self, settings: Settings, options: CdcOptions | None = None) -> None:
        self.kafka = settings.kafka.model_copy(
            update={"consumer_group": f"local-cdc-{uuid.uuid4()}"}
        )
        self.options = options or CdcOptions(report_interval_s=3600)
        # Lives from here to stop(): connected now, closed there.
        self._session = scylla.connect(settings.scylla, settings.scylla.keyspace)
        position_group_at_end(self.kafka)
        self.consumer = CdcConsumer(
            scylla.ScyllaWriter(self._session, settings.scylla), self.options, self.kafka
        )
        # A second client of the same group that never subscribes: it only reads commits.
        self._offsets = Consumer(kafka.consumer_config(self.kafka))
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="local-cdc", daemon=True)

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def start(self) -> LocalCdc:
        self._thread.start()
        return self

    def applied(self, events: Iterable[TappedEvent]) -> bool:
        """True when the group's committed offset is past every one of ``events``."""
        wanted = list(events)
        if not wanted:
            return True
        tps = [TopicPartition(e.topic, e.partition) for e in wanted]
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in self._offsets.committed(tps, timeout=10)
        }
        return all(committed.get((e.topic, e.partition), -1) > e.offset for e in wanted)

    def where(self) -> str:
        """The consumer thread's stack now, for the message of a wait that timed out: a
        consumer that stopped committing then says where it is blocked."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is None:
            return f"consumer thread not running; errors: {self.errors!r}"
        return "consumer thread at:\n" + "".join(traceback.format_stack(frame))

    def stop(self) -> None:
        self.consumer.stop()
        t0 = time.monotonic()
        self._thread.join(30)
        if self._thread.is_alive():
            # Not an error of the test that ends the session, but a consumer that does not
            # stop is worth a line in the run's warnings summary, with where it is stuck.
            warnings.warn(
                f"the local CDC consumer did not stop within {time.monotonic() - t0:.0f} s; "
                + self.where(),
                stacklevel=2,
            )
        self._offsets.close()
        scylla.close(self._session)
        if self.errors:
            raise RuntimeError(f"local CDC consumer failed: {self.errors[0]!r}")

    def __enter__(self) -> LocalCdc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def members_with_partitions(settings: KafkaSettings, group: str) -> int:
    """Members of ``group`` holding partitions now (0 while the group is not formed)."""
    admin = kafka.admin(settings)  # held: its futures fail if it is collected
    (fut,) = admin.describe_consumer_groups([group], request_timeout=10).values()
    try:
        desc = fut.result()
    except Exception:  # no such group yet
        return 0
    return sum(1 for m in desc.members if m.assignment and m.assignment.topic_partitions)
