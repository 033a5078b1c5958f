"""One batch of Kafka change messages, decoded and projected: the mutations to write
(compacted), the changes they come from, the messages set aside for the dead-letter topic, and
the offsets to commit once the batch is applied. Pure: no I/O.

A message that cannot be decoded or projected is set aside with its error, never dropped: the
rest of the batch goes on (docs/architecture.md, "Error classes").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import Message

from tasks.core.catalog import read_models_of
from tasks.core.debezium import decode_message
from tasks.core.errors import RejectedData
from tasks.core.projection import Mutation, compact, project


class TruncateNotApplied(RejectedData):
    """A TRUNCATE of a source table reached CDC. It is not applied: the read models keep the
    rows until a rebuild (docs/operations.md, "A TRUNCATE of a source table")."""

    def __init__(self, table: str | None, commit_ts_us: int | None) -> None:
        self.table, self.commit_ts_us = table, commit_ts_us
        self.read_models = list(read_models_of(table)) if table else []
        super().__init__(
            f"TRUNCATE of public.{table} is not applied: the read models {self.read_models} "
            f"still hold its rows. Rebuild them: python -m flows.backfill --rebuild "
            f"--read-models {' '.join(self.read_models)}"
        )

    def __reduce__(self) -> tuple[type[TruncateNotApplied], tuple[str | None, int | None]]:  # type: ignore[override]
        return type(self), (self.table, self.commit_ts_us)


@dataclass
class ChangeBatch:
    mutations: list[Mutation] = field(default_factory=list)  # compacted by ``compact``
    # Each applied message with its own mutations: to find the one a write rejects.
    applied: list[tuple[Message, list[Mutation]]] = field(default_factory=list)
    dead: list[tuple[Message, BaseException]] = field(default_factory=list)
    commit_ts_us: list[int] = field(default_factory=list)
    # The next offset to read, by (topic, partition): what the batch commits once applied.
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    changes: int = 0

    def add(self, msg: Message, read_models: Sequence[str]) -> TruncateNotApplied | None:
        """Decode and project one message (without a Kafka error) into the batch. Returns the
        refused TRUNCATE, if it was one, for the caller to report; it is set aside too."""
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        self.offsets[(topic, partition)] = offset + 1
        try:
            event = decode_message(topic, msg.key(), msg.value())
            if event.kind == "truncate":
                refused = TruncateNotApplied(event.table, event.commit_ts_us)
                self.dead.append((msg, refused))
                return refused
            if event.kind != "change" or event.change is None:
                return None
            mutations = project(event.change, read_models)
        except Exception as exc:  # any error about this one change: dead-lettered
            self.dead.append((msg, exc))
            return None
        self.applied.append((msg, mutations))
        self.mutations.extend(mutations)
        self.changes += 1
        if event.commit_ts_us is not None:
            self.commit_ts_us.append(event.commit_ts_us)
        return None

    def compact(self) -> ChangeBatch:
        """Keep one mutation per cell: the batch's writes, once every message is added."""
        self.mutations = compact(self.mutations)
        return self

    def keep_only(self, kept: list[tuple[Message, list[Mutation]]]) -> None:
        """Apply only these of the batch's changes (the others were set aside)."""
        self.applied, self.changes = kept, len(kept)
        self.mutations = compact(m for _, ms in kept for m in ms)
