"""What a CDC run does, validated as a whole before any work: a bad value raises a
ConfigurationError that names it, before Kafka, Postgres or Scylla is touched.

Shared by the CDC flow and by app code that runs ``CdcConsumer`` directly, so both refuse the
same values. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.catalog import READ_MODELS, read_models_named
from tasks.core.errors import ConfigurationError, describe_invalid

# Upper bounds: far above any sensible value, low enough that a typo (an extra few zeros)
# is refused instead of building a batch that cannot fit in memory or a sleep of a year.
MAX_BATCH_SIZE = 100_000
MAX_BATCH_TIMEOUT_S = 60.0
MAX_MESSAGES = 10**12
MAX_SECONDS = 366 * 86_400.0
MAX_REPORT_INTERVAL_S = 86_400.0
MAX_RETRY_S = 3_600.0

# Kafka's own rule for group ids is loose; this keeps them printable and usable in tooling.
_GROUP = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")


class CdcOptions(BaseModel):
    """What a CDC run does; validated on construction (keyword arguments, like a dataclass).

    Strict: a bool is not an int, floats must be finite, and each value has an upper bound.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    batch_size: int = Field(
        2000,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="messages per batch; offsets are committed once per batch",
    )
    # How long one poll waits for the first message of a batch (bounds the stop latency).
    batch_timeout_s: float = Field(
        0.1,
        gt=0,
        le=MAX_BATCH_TIMEOUT_S,
        description="how long one poll waits for a batch's first message (bounds how long "
        "a stop waits)",
    )
    max_messages: int | None = Field(
        None, ge=1, le=MAX_MESSAGES, description="stop after this many messages"
    )
    max_seconds: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="stop after this many seconds"
    )
    report_interval_s: float = Field(
        10.0,
        gt=0,
        le=MAX_REPORT_INTERVAL_S,
        description="how often lag, rate and latency are logged and published",
    )
    read_models: tuple[str, ...] = Field(
        READ_MODELS, description="read models to project (None: all; an empty list is refused)"
    )
    # Backoff while Scylla or Kafka is down: the batch is retried, never skipped. The ceiling
    # is small because it is also the lag a latency-minded consumer adds after an outage ends.
    retry_initial_s: float = Field(
        0.2,
        gt=0,
        le=MAX_RETRY_S,
        description="first backoff while Scylla or Kafka is down (doubles up to retry_max_s)",
    )
    retry_max_s: float = Field(
        2.0,
        gt=0,
        le=MAX_RETRY_S,
        description="longest backoff: also the most lag a retry adds after an outage ends",
    )
    # Stop after this long without any message (None: run until stopped).
    idle_exit_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="stop after this many seconds without a message"
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigurationError(describe_invalid(exc, "invalid CDC options")) from None

    @field_validator("read_models", mode="before")
    @classmethod
    def _read_models(cls, v: Any) -> Any:
        return read_models_named(v)

    @model_validator(mode="after")
    def _consistent(self) -> CdcOptions:
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError(
                f"retry_initial_s ({self.retry_initial_s}) must not exceed "
                f"retry_max_s ({self.retry_max_s})"
            )
        return self

    @property
    def is_subset(self) -> bool:
        return set(self.read_models) != set(READ_MODELS)


def consumer_group_for(
    shared_group: str, read_models: Sequence[str], consumer_group: str | None = None
) -> str:
    """The Kafka consumer group a CDC run uses.

    A run projecting every read model uses ``consumer_group`` or the shared group. A run
    projecting a subset commits offsets for changes it did not apply to the other read models,
    so in the shared group it would make every later member skip them: a subset therefore
    gets a group of its own by default, ``<shared>.<sorted subset joined by '.'>``, and naming
    the shared group explicitly together with a subset is refused.
    """
    if consumer_group is not None and not _GROUP.match(consumer_group):
        raise ConfigurationError(
            f"consumer_group {consumer_group!r}: must be 1-249 characters of letters, digits, "
            f"'.', '_' or '-'"
        )
    subset = set(read_models) != set(READ_MODELS)
    if not subset:
        return consumer_group or shared_group
    if consumer_group == shared_group:
        raise ConfigurationError(
            f"consumer_group {consumer_group!r} is the shared CDC group, but read_models is a "
            f"subset {sorted(read_models)}: its commits would skip, for every other member of "
            f"that group, the changes it does not apply to the other read models. Omit "
            f"consumer_group (a subset gets its own group) or name another one."
        )
    return consumer_group or ".".join([shared_group, *sorted(set(read_models))])
