"""Prefect task wrappers of the dual-write API, for flows that write.

The ids are parameters, not generated inside: Prefect re-runs a task body with the same
parameters on retry, so a retry after an unknown outcome (connection lost during COMMIT) finds
the rows it already committed and returns them instead of writing twice (idempotent by id).
Only transient errors are retried; invalid input fails at once. Each task returns the result's
``summary()``: ids and flags, never message content, so nothing private lands in Prefect's
result storage or UI.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.core.errors import retry_if_transient
from tasks.core.write_policy import StepInput
from tasks.dual_write import service as dual_write

_RETRY: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [0.5, 2, 5],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NONE,
}


@task(name="dual-write: create session", **_RETRY)
def create_session_task(
    session_id: uuid.UUID, user_id: uuid.UUID, title: str = ""
) -> dict[str, Any]:
    return dual_write.create_session(user_id, title, session_id=session_id).summary()


@task(name="dual-write: record human turn", **_RETRY)
def record_human_turn_task(
    turn_id: uuid.UUID, session_id: uuid.UUID, content: str
) -> dict[str, Any]:
    return dual_write.record_human_turn(session_id, content, turn_id=turn_id).summary()


@task(name="dual-write: record agent turn", **_RETRY)
def record_agent_turn_task(
    turn_id: uuid.UUID,
    session_id: uuid.UUID,
    content: str,
    model: str = "",
    steps: Sequence[StepInput | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    # Steps need ids too, for the same reason; they default from the turn id and position.
    fixed = [_with_step_id(turn_id, i, s) for i, s in enumerate(steps or ())]
    return dual_write.record_agent_turn(
        session_id, content, model=model, steps=fixed, turn_id=turn_id
    ).summary()


@task(name="dual-write: rename session", **_RETRY)
def rename_session_task(session_id: uuid.UUID, title: str) -> dict[str, Any]:
    return dual_write.rename_session(session_id, title).summary()


@task(name="dual-write: delete session", **_RETRY)
def delete_session_task(session_id: uuid.UUID) -> dict[str, Any]:
    # A retry after the delete committed finds no session and fails as InvalidInput
    # (terminal): the session is gone either way, and CDC carries the tombstones.
    return dual_write.delete_session(session_id).summary()


def _with_step_id(
    turn_id: uuid.UUID, index: int, step: StepInput | Mapping[str, Any]
) -> StepInput | Mapping[str, Any]:
    derived = uuid.uuid5(turn_id, f"step-{index}")
    if isinstance(step, StepInput):
        return step if step.step_id is not None else StepInput(step.kind, step.payload, derived)
    if isinstance(step, Mapping) and step.get("step_id") is None:
        return {**step, "step_id": derived}
    return step
