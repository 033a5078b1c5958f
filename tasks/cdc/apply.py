"""Applying a batch of changes to the read models: its mutations to Scylla, the changes set
aside to the dead-letter topic, retrying transient failures with capped backoff until both
succeed (a batch is never skipped). When the store rejects the batch's write, each change is
written alone and those it rejects for good are set aside; a systemic error (schema,
permissions) stops the run instead (docs/architecture.md, "Error classes").
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from confluent_kafka import Message

from tasks.adapters.scylla import ScyllaWriter
from tasks.cdc.batch import ChangeBatch
from tasks.cdc.dead_letters import DeadLetters
from tasks.cdc.options import CdcOptions
from tasks.core.errors import (
    ConfigurationError,
    CqrsSyncError,
    RejectedData,
    TerminalError,
    TransientError,
    classify,
)
from tasks.core.projection import Mutation

log = logging.getLogger("cqrs_sync.cdc")


@dataclass
class Waiting:
    """A service the consumer is waiting for, since when (for the operator's log line)."""

    service: str
    since: float = field(default_factory=time.time)
    error: str = ""
    last_line: float = 0.0

    def line(self) -> str:
        at = datetime.fromtimestamp(self.since, UTC).strftime("%H:%M:%S UTC")
        return (
            f"waiting for {self.service} since {at} ({time.time() - self.since:.0f} s): "
            f"{self.error}"
        )


# Errors about the store rather than about one change: every change would fail the same way.
_SYSTEMIC: Final = re.compile(
    r"unconfigured table|does not exist|keyspace|unauthorized|"
    r"permission|not authorized|authenticat",
    re.IGNORECASE,
)


def stops_the_run(error: CqrsSyncError) -> bool:
    """A terminal error about the store (schema, permissions, configuration) stops the run
    with its cause; any other non-transient error concerns the change it came from."""
    if isinstance(error, TransientError | RejectedData) or not isinstance(error, TerminalError):
        return False
    cause = error.__cause__ or error
    return isinstance(error, ConfigurationError) or bool(
        _SYSTEMIC.search(f"{type(cause).__name__} {error}")
    )


class BatchApplier:
    """Writes batches with ``writer`` and sets changes aside with ``dead_letters``; while a
    service is down, ``waiting`` names it (the consumer's reports show it)."""

    def __init__(
        self,
        writer: ScyllaWriter,
        dead_letters: DeadLetters,
        options: CdcOptions,
        stop_event: threading.Event,
    ) -> None:
        self.writer = writer
        self.dead_letters = dead_letters
        self.options = options
        self.stop_event = stop_event
        self.waiting: Waiting | None = None

    def apply(self, batch: ChangeBatch, should_stop: Callable[[], bool]) -> bool:
        """Write the batch's mutations and dead letters, retrying transient failures with
        capped backoff until they succeed. False if a stop was asked (``stop_event``, or
        ``should_stop()`` between two attempts) while retrying: the batch is abandoned
        uncommitted and will be re-delivered."""
        delay = self.options.retry_initial_s
        while True:
            service = "Scylla"
            try:
                try:
                    self.writer.write(batch.mutations)
                except TransientError:
                    raise
                except Exception as exc:
                    self.set_aside_rejected(batch, exc)
                service = "the dead-letter topic"
                self.dead_letters.send(batch.dead)
                if self.waiting is not None:
                    log.info(
                        "%s is back after %.0f s",
                        self.waiting.service,
                        time.time() - self.waiting.since,
                    )
                    self.waiting = None
                return True
            except TransientError as exc:
                if self.waiting is None or self.waiting.service != service:
                    self.waiting = Waiting(service)
                self.waiting.error = str(exc)
                now = time.monotonic()
                if now - self.waiting.last_line >= min(10.0, self.options.report_interval_s):
                    self.waiting.last_line = now
                    log.warning(
                        "%s; batch of %d changes not applied, retrying every <= %.1f s",
                        self.waiting.line(),
                        batch.changes,
                        self.options.retry_max_s,
                    )
            if self.stop_event.wait(delay) or should_stop():
                return False
            delay = min(delay * 2, self.options.retry_max_s)

    def set_aside_rejected(self, batch: ChangeBatch, exc: Exception) -> None:
        """The batch's write failed with a non-transient error. A systemic one (schema,
        permissions) stops the run; otherwise each change is written alone, and those whose
        own write fails for good go to the dead-letter topic with the error. A transient
        error meanwhile leaves the batch as it was, to be retried whole."""
        error = classify(exc, f"Scylla write of a batch of {batch.changes} changes")
        if stops_the_run(error):
            raise error from exc
        kept: list[tuple[Message, list[Mutation]]] = []
        dead: list[tuple[Message, BaseException]] = []
        for msg, mutations in batch.applied:
            try:
                self.writer.write(mutations)
            except TransientError:
                raise
            except Exception as one:
                err = classify(
                    one, f"Scylla write of {msg.topic()}[{msg.partition()}]@{msg.offset()}"
                )
                if stops_the_run(err):
                    raise err from one
                dead.append((msg, err))
                continue
            kept.append((msg, mutations))
        batch.keep_only(kept)
        batch.dead.extend(dead)
