"""What an operator sees of the CDC consumer: lag per partition, events/s, end-to-end latency
(now minus the source commit time) and the dead-letter count, over a reporting interval."""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

# Bounded: memory stays flat however fast events arrive (a uniform sample is not needed for
# p50/p99 over one interval; the most recent samples are what an operator wants).
MAX_LATENCY_SAMPLES = 50_000


@dataclass(frozen=True)
class MetricsReport:
    interval_s: float
    events: int
    events_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    dead_lettered_total: int
    events_total: int
    lag: dict[str, int] = field(default_factory=dict)
    # "waiting for Scylla since 10:02:03 UTC (45 s): ..." while a service is down.
    waiting_for: str | None = None

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())

    def as_line(self) -> str:
        p50 = "-" if self.latency_p50_ms is None else f"{self.latency_p50_ms:.0f}"
        p99 = "-" if self.latency_p99_ms is None else f"{self.latency_p99_ms:.0f}"
        return (
            f"{self.events_per_s:,.0f} events/s, latency p50 {p50} ms p99 {p99} ms, "
            f"lag {self.total_lag}, DLQ {self.dead_lettered_total}, "
            f"total {self.events_total}" + (f"; {self.waiting_for}" if self.waiting_for else "")
        )


@dataclass(frozen=True)
class LatencyRecord:
    """The last end-to-end latency (source commit → applied in Scylla) a CDC flow run measured,
    kept where a reader on another machine finds it: the CDC flow overwrites a Prefect variable
    per consumer group (``latency_variable``) after each interval that applied changes, and
    the audit reads it."""

    consumer_group: str
    measured_at: float  # Unix time (s) at the end of the interval
    interval_s: float
    events: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(
        cls, rep: MetricsReport, consumer_group: str, measured_at: float
    ) -> LatencyRecord | None:
        """None for an interval that measured no latency (nothing applied): the last value
        measured stays the one to read."""
        p50, p99, top = rep.latency_p50_ms, rep.latency_p99_ms, rep.latency_max_ms
        if p50 is None or p99 is None or top is None:
            return None
        return cls(consumer_group, measured_at, rep.interval_s, rep.events, p50, p99, top)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: object) -> LatencyRecord:
        """What ``as_json`` wrote; ValueError for anything else."""
        if not isinstance(value, dict):
            raise ValueError(f"a latency record is an object, got {type(value).__name__}")
        try:
            return cls(
                str(value["consumer_group"]),
                float(value["measured_at"]),
                float(value["interval_s"]),
                int(value["events"]),
                float(value["p50_ms"]),
                float(value["p99_ms"]),
                float(value["max_ms"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a latency record: {type(exc).__name__}: {exc}") from None


def latency_variable(consumer_group: str) -> str:
    """The Prefect variable holding a consumer group's ``LatencyRecord`` (variable names allow
    only lowercase letters, digits, '-' and '_')."""
    return "cqrs_cdc_latency__" + re.sub(r"[^a-z0-9_-]", "_", consumer_group.lower())


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        raise ValueError("no values")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class CdcMetrics:
    def __init__(self) -> None:
        self._latencies_ms: deque[float] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._events = 0
        self.events_total = 0
        self.dead_lettered_total = 0
        self._since = time.monotonic()

    def record_batch(self, messages: int, changes: int, dead: int, commit_ts_us: list[int]) -> None:
        """Called after the batch's writes succeeded: latency is commit → visible."""
        now_us = time.time() * 1e6
        self._latencies_ms.extend((now_us - ts) / 1000 for ts in commit_ts_us)
        self._events += messages
        self.events_total += messages
        self.dead_lettered_total += dead

    def report(
        self, consumer: Consumer | None = None, waiting_for: str | None = None
    ) -> MetricsReport:
        now = time.monotonic()
        interval = max(now - self._since, 1e-9)
        lat = sorted(self._latencies_ms)
        rep = MetricsReport(
            interval_s=interval,
            events=self._events,
            events_per_s=self._events / interval,
            latency_p50_ms=percentile(lat, 0.50) if lat else None,
            latency_p99_ms=percentile(lat, 0.99) if lat else None,
            latency_max_ms=lat[-1] if lat else None,
            dead_lettered_total=self.dead_lettered_total,
            events_total=self.events_total,
            lag=consumer_lag(consumer) if consumer is not None else {},
            waiting_for=waiting_for,
        )
        self._latencies_ms.clear()
        self._events = 0
        self._since = now
        return rep


def consumer_lag(consumer: Consumer) -> dict[str, int]:
    """High watermark minus the consumer's position, per assigned partition."""
    lag: dict[str, int] = {}
    try:
        assignment = consumer.assignment()
        if not assignment:
            return lag
        for tp in consumer.position(assignment):
            _low, high = consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            pos = tp.offset if tp.offset >= 0 else _committed_or_low(consumer, tp)
            lag[f"{tp.topic}[{tp.partition}]"] = max(0, high - pos) if pos >= 0 else high
    except KafkaException:
        pass  # reported as missing; the next interval tries again
    return lag


def _committed_or_low(consumer: Consumer, tp: TopicPartition) -> int:
    committed = consumer.committed([TopicPartition(tp.topic, tp.partition)], timeout=2)
    if committed and committed[0].offset >= 0:
        return committed[0].offset
    low, _high = consumer.get_watermark_offsets(tp, timeout=2, cached=False)
    return low
