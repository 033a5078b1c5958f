"""Where a CDC consumer group starts on a partition, and the gap it must never skip silently.

Kafka's ``auto.offset.reset=earliest`` turns "the changes after my committed offset were
deleted by retention" into "start at the oldest change still there": the read models would
miss every deleted change and nobody would know. The consumer therefore runs with
``auto.offset.reset=error`` and positions each assigned partition itself:

- no committed offset (a new group): the oldest change still in the log (a new group's past is
  the backfill's job);
- a committed offset inside the log: there;
- a committed offset outside the log (below its start: retention deleted changes this group
  never applied; beyond its end: the topic was recreated): a :class:`OffsetGap`, which stops
  the consumer with the partition and the missing range, and what to do (docs/operations.md,
  "An offset gap").
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from tasks.core.errors import TerminalError


@dataclass(frozen=True, slots=True)
class Gap:
    topic: str
    partition: int
    committed: int
    log_start: int
    log_end: int

    def describe(self) -> str:
        where = f"{self.topic}[{self.partition}]"
        if self.committed < self.log_start:
            return (
                f"{where}: committed offset {self.committed} but the log starts at "
                f"{self.log_start}: offsets {self.committed}..{self.log_start - 1} were "
                f"deleted by retention before this group applied them"
            )
        return (
            f"{where}: committed offset {self.committed} is beyond the log's end "
            f"{self.log_end} (was the topic deleted and recreated?)"
        )


class OffsetGap(TerminalError):
    """Changes this group has not applied are gone from Kafka: the read models may miss them."""

    def __init__(self, group: str, gaps: list[Gap]) -> None:
        self.group, self.gaps = group, gaps
        super().__init__(
            f"consumer group {group!r} cannot continue without losing changes: "
            + "; ".join(g.describe() for g in gaps)
            + ". Run a backfill of the read models (python -m flows.backfill), then start "
            "CDC with a new consumer group, or reset this group's offsets to the log's "
            "start (kafka-consumer-groups --reset-offsets --to-earliest)."
        )

    def __reduce__(self) -> tuple[type[OffsetGap], tuple[str, list[Gap]]]:
        return type(self), (self.group, self.gaps)


def start_positions(
    committed: list[TopicPartition], watermarks: dict[tuple[str, int], tuple[int, int]]
) -> tuple[list[TopicPartition], list[Gap]]:
    """The start of each partition given its committed offset (negative: none) and its
    (log start, log end) watermarks; and the gaps that forbid starting at all."""
    positions: list[TopicPartition] = []
    gaps: list[Gap] = []
    for tp in committed:
        low, high = watermarks[(tp.topic, tp.partition)]
        if tp.offset < 0:
            positions.append(TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
            continue
        if tp.offset < low or tp.offset > high:
            gaps.append(Gap(tp.topic, tp.partition, tp.offset, low, high))
        positions.append(TopicPartition(tp.topic, tp.partition, tp.offset))
    return positions, gaps
