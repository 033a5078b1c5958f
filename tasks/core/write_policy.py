"""Dual-write policy and input validation: pure, no I/O.

The policy says which write operations are user-facing (their read models are updated right
after the Postgres commit, so the user reads their own write) and which are left to CDC, plus
the Scylla step's deadline and the input limits. It is typed configuration, read from the
environment with the prefix ``CQRS_DUAL_WRITE_`` (e.g. ``CQRS_DUAL_WRITE_RECORD_AGENT_TURN=true``,
``CQRS_DUAL_WRITE_DEADLINE_MS=80``).

Validation runs before any connection is taken, so bad input never reaches Postgres: each
check raises :class:`~tasks.core.errors.InvalidInput` naming the field and the rule, never echoing
the content itself (it may be private).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.core.errors import InvalidInput
from tasks.core.projection import PLACEHOLDER_TEXT


class Operation(StrEnum):
    CREATE_SESSION = "create_session"
    RECORD_HUMAN_TURN = "record_human_turn"
    RECORD_AGENT_TURN = "record_agent_turn"
    RENAME_SESSION = "rename_session"
    DELETE_SESSION = "delete_session"


class DualWritePolicy(BaseSettings):
    """Which operations are dual-written, how long the Scylla step may take, input limits."""

    model_config = SettingsConfigDict(env_prefix="CQRS_DUAL_WRITE_", frozen=True)

    # User-facing writes: the user expects to see them on the next read. Agent turns are
    # produced by a background worker while the user waits on a stream, not on a read-model
    # query, so by default they are left to CDC (one Scylla round trip fewer per agent step).
    create_session: bool = True
    record_human_turn: bool = True
    record_agent_turn: bool = False
    rename_session: bool = True
    delete_session: bool = True

    # The Scylla step's budget after the commit. Small: the Postgres write already succeeded,
    # and a slow read model must not make the app slow; CDC repairs whatever misses it.
    deadline_ms: float = Field(default=50.0, gt=0, le=60_000)
    # Scylla writes still running past their deadline, at most; beyond that the step is
    # skipped at once, so a hung cluster costs the app nothing but staleness.
    max_in_flight: int = Field(default=16, gt=0, le=1024)

    # Limits checked before anything is written. Content is measured in UTF-8 bytes (what
    # Postgres, Kafka's record cap and Scylla's cells pay for), not in characters. The upper
    # bounds are the write model's own caps (migration 0009), which keep every change event
    # within Kafka's and the consumer's 16 MiB.
    max_content_bytes: int = Field(default=64 * 1024, gt=0, le=1024 * 1024)
    max_title_chars: int = Field(default=500, gt=0, le=10_000)
    max_model_chars: int = Field(default=200, gt=0, le=10_000)
    max_kind_chars: int = Field(default=100, gt=0, le=10_000)
    max_steps: int = Field(default=256, ge=0, le=10_000)
    max_step_payload_bytes: int = Field(default=256 * 1024, gt=0, le=1024 * 1024)

    def dual_writes(self, operation: Operation | str) -> bool:
        """True when ``operation`` updates the read models right after its commit."""
        try:
            op = Operation(operation)
        except ValueError:
            raise InvalidInput(
                f"unknown operation {operation!r}; known: {[o.value for o in Operation]}"
            ) from None
        return bool(getattr(self, op.value))

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0


# --------------------------------------------------------------------------------------------
# Validation


def as_uuid(value: Any, name: str) -> uuid.UUID:
    """A UUID from a UUID or its text form; anything else is a bad id."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    # Echo only the type: an id field may carry anything a client sent.
    raise InvalidInput(f"{name} must be a UUID, got {type(value).__name__}")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be text, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInput(f"{name} contains a NUL character (Postgres text cannot hold it)")
    if value == PLACEHOLDER_TEXT:
        # CDC reads this exact text as Debezium's "unchanged TOAST value" marker and would
        # project the previous value instead: the two paths would disagree.
        raise InvalidInput(f"{name} is Debezium's reserved placeholder text")
    return value


def _utf8_len(value: str, name: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not valid Unicode (lone surrogate)") from None


def check_content(value: Any, policy: DualWritePolicy, name: str = "content") -> str:
    """Message content: non-blank text of at most ``max_content_bytes`` UTF-8 bytes."""
    text = _text(value, name)
    if not text.strip():
        raise InvalidInput(f"{name} is empty")
    size = _utf8_len(text, name)
    if size > policy.max_content_bytes:
        raise InvalidInput(
            f"{name} is {size} bytes, over the limit of {policy.max_content_bytes} bytes"
        )
    return text


def check_short_text(value: Any, name: str, max_chars: int, *, allow_empty: bool = True) -> str:
    text = _text(value, name)
    if not allow_empty and not text.strip():
        raise InvalidInput(f"{name} is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"{name} is {len(text)} characters, over the limit of {max_chars}")
    _utf8_len(text, name)
    return text


def check_title(value: Any, policy: DualWritePolicy) -> str:
    # An empty title is allowed (the schema's default): the app may name a session later.
    return check_short_text(value, "title", policy.max_title_chars)


@dataclass(frozen=True, slots=True)
class StepInput:
    """One agent step as the app hands it over; ``payload`` is any JSON value."""

    kind: str
    payload: Any = None
    step_id: uuid.UUID | str | None = None


@dataclass(frozen=True, slots=True)
class ValidStep:
    step_id: uuid.UUID
    kind: str
    payload_json: str  # JSON text; Postgres casts it to jsonb


def _json_text(payload: Any, name: str, max_bytes: int) -> str:
    try:
        # allow_nan=False: jsonb has no NaN/Infinity, Postgres would reject them after the
        # turn was half written.
        text = json.dumps(
            {} if payload is None else payload,
            allow_nan=False,
            ensure_ascii=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} is not a JSON value: {type(exc).__name__}") from None
    except RecursionError:
        raise InvalidInput(f"{name} is nested too deeply") from None
    if "\\u0000" in text:
        raise InvalidInput(f"{name} contains \\u0000 (jsonb cannot hold it)")
    size = _utf8_len(text, name)
    if size > max_bytes:
        raise InvalidInput(f"{name} is {size} bytes of JSON, over the limit of {max_bytes}")
    return text


def check_steps(
    steps: Sequence[StepInput | Mapping[str, Any]] | None, policy: DualWritePolicy
) -> list[ValidStep]:
    """Agent steps in order; a mapping may stand for a StepInput (kind, payload, step_id)."""
    if steps is None:
        return []
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise InvalidInput(f"steps must be a sequence, got {type(steps).__name__}")
    if len(steps) > policy.max_steps:
        raise InvalidInput(f"{len(steps)} steps, over the limit of {policy.max_steps}")
    out: list[ValidStep] = []
    seen: set[uuid.UUID] = set()
    for i, raw in enumerate(steps):
        name = f"steps[{i}]"
        if isinstance(raw, Mapping):
            unknown = set(raw).difference({"kind", "payload", "step_id"})
            if unknown or "kind" not in raw:
                raise InvalidInput(
                    f"{name} must have 'kind' and may have 'payload' and "
                    f"'step_id' (unknown: {sorted(map(str, unknown))})"
                )
            raw = StepInput(raw["kind"], raw.get("payload"), raw.get("step_id"))
        if not isinstance(raw, StepInput):
            raise InvalidInput(f"{name} must be a StepInput or a mapping")
        kind = check_short_text(raw.kind, f"{name}.kind", policy.max_kind_chars, allow_empty=False)
        step_id = uuid.uuid4() if raw.step_id is None else as_uuid(raw.step_id, f"{name}.step_id")
        if step_id in seen:
            raise InvalidInput(f"{name}.step_id repeats an earlier step's id")
        seen.add(step_id)
        payload = _json_text(raw.payload, f"{name}.payload", policy.max_step_payload_bytes)
        out.append(ValidStep(step_id, kind, payload))
    return out
