"""CDC's end-to-end latency of chosen changes, measured from outside the consumer (demo support).

:class:`LatencyProbe` taps the change events of some sessions from Kafka (``ChangeTap``,
support/cdc_probe.py) and counts each one applied once the CDC group's committed offset is past
it: the consumer commits a batch only after its Scylla writes succeeded. Its latency is that
moment minus the source transaction's commit time, as tasks/core/metrics.py measures it inside
the consumer. :func:`committed_lag` is how far the group is behind on the change topics.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from support.cdc_probe import ChangeTap
from tasks.adapters import kafka
from tasks.core.debezium import DecodedEvent
from tasks.core.metrics import percentile
from tasks.settings import KafkaSettings

Pending = tuple[str, int, int, int]  # topic, partition, offset, commit time (µs)


def committed_lag(offsets: Consumer, settings: KafkaSettings) -> tuple[int, int]:
    """(offsets committed, summed; messages not yet committed) of ``settings``' consumer group
    on the change topics. ``offsets`` is a consumer of that group that never subscribes."""
    wanted = set(kafka.change_topics(settings))
    tps = [
        TopicPartition(t, p)
        for t, meta in offsets.list_topics(timeout=10).topics.items()
        if t in wanted
        for p in meta.partitions
    ]
    done = lag = 0
    for tp in offsets.committed(tps, timeout=10) if tps else []:
        low, high = offsets.get_watermark_offsets(tp, timeout=10, cached=False)
        done += max(tp.offset, 0)
        lag += max(0, high - max(tp.offset, low))
    return done, lag


@dataclass
class LatencyProbe:
    """Start with :meth:`start` before the changes are written, :meth:`stop` after."""

    settings: KafkaSettings
    sessions: set[str] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _ours(self, e: DecodedEvent) -> bool:
        row = (e.change and (e.change.after or e.change.before)) or {}
        return str(row.get("session_id", row.get("id"))) in self.sessions

    def _tap(self, tap: ChangeTap) -> None:
        try:
            while not self._stopping.is_set():
                # One poll per call: an event is pending as soon as it is read.
                for t in tap.collect(self._ours, 10_000, timeout_s=0.001):
                    ts = t.event.commit_ts_us or int(time.time() * 1e6)
                    with self._lock:
                        self.pending.append((t.topic, t.partition, t.offset, ts))
        finally:
            tap.close()

    def _check(self, drain_s: float) -> None:
        """Every few ms: which of the pending events the group committed past."""
        offsets = Consumer(kafka.consumer_config(self.settings))
        try:
            deadline: float | None = None
            while deadline is None or (self.pending and time.monotonic() < deadline):
                if deadline is None and self._stopping.is_set():
                    deadline = time.monotonic() + drain_s
                time.sleep(0.005)
                with self._lock:
                    pending = list(self.pending)
                if not pending:
                    continue
                parts = [TopicPartition(t, p) for t, p in {(e[0], e[1]) for e in pending}]
                got = offsets.committed(parts, timeout=10)
                now_us = time.time() * 1e6
                committed = {(tp.topic, tp.partition): tp.offset for tp in got}
                done = {e for e in pending if committed.get((e[0], e[1]), -1) > e[2]}
                self.latencies_ms.extend((now_us - e[3]) / 1000 for e in done)
                with self._lock:
                    self.pending = [e for e in self.pending if e not in done]
        finally:
            offsets.close()

    def start(self, drain_s: float = 30) -> LatencyProbe:
        tap = ChangeTap(self.settings)  # positioned at the topics' end now
        self._threads = [
            threading.Thread(target=self._tap, args=(tap,), name="latency-tap", daemon=True),
            threading.Thread(
                target=self._check, args=(drain_s,), name="latency-check", daemon=True
            ),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self, settle_s: float = 2.0) -> None:
        """Tap for ``settle_s`` more, then wait (up to ``drain_s``) for the pending events."""
        time.sleep(settle_s)
        self._stopping.set()
        for t in self._threads:
            t.join(60)

    def percentile_ms(self, q: float) -> float | None:
        lat = sorted(self.latencies_ms)
        return round(percentile(lat, q), 1) if lat else None
