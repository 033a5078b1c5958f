"""What a dual-write call did, and its step after the Postgres commit: the committed rows go
through the projection CDC and backfill use, and, when the policy says the operation is
user-facing, to Scylla within the deadline. The Scylla step never fails the call: on any error
the result says ``read_model_updated=False`` and CDC converges the read models later
(docs/architecture.md, "The one rule")."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tasks.core.projection import (
    Change,
    Mutation,
    change_from_row,
    normalize_row,
    project,
    tombstone_version,
)
from tasks.core.write_policy import Operation
from tasks.dual_write.deps import DualWriteDeps

log = logging.getLogger("cqrs_sync.dual_write")

Row = Mapping[str, Any]


@dataclass(frozen=True)
class WriteResult:
    operation: Operation
    session_id: uuid.UUID
    # Canonical rows this call wrote (for delete: the rows it deleted), by source table.
    rows: Mapping[str, tuple[Row, ...]]
    # "skipped": the policy leaves this operation to CDC.
    dual_write: Literal["written", "failed", "skipped"]
    mutations: tuple[Mutation, ...] = ()
    replayed: bool = False  # the ids existed already with the same content: nothing new
    postgres_ms: float = 0.0
    scylla_ms: float | None = None
    error: str | None = None

    @property
    def read_model_updated(self) -> bool:
        return self.dual_write == "written"

    def ids(self, table: str) -> list[uuid.UUID]:
        return [r["id"] for r in self.rows.get(table, ())]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly, free of content: what a flow or a log may keep."""
        return {
            "operation": self.operation.value,
            "session_id": str(self.session_id),
            "ids": {t: [str(r["id"]) for r in rs] for t, rs in self.rows.items()},
            "read_model_updated": self.read_model_updated,
            "dual_write": self.dual_write,
            "replayed": self.replayed,
            "postgres_ms": round(self.postgres_ms, 3),
            "scylla_ms": None if self.scylla_ms is None else round(self.scylla_ms, 3),
            "error": self.error,
        }


def after_commit(
    d: DualWriteDeps,
    op: Operation,
    sid: uuid.UUID,
    raw: Mapping[str, Sequence[Row]],
    t0: float,
    *,
    replayed: bool = False,
    deleted: bool = False,
) -> WriteResult:
    """The call's result once Postgres committed ``raw`` (the rows it wrote, or for a
    delete the rows it deleted): projected, and written to Scylla if the policy says so."""
    postgres_ms = (time.perf_counter() - t0) * 1000
    # The same normalization and projection CDC and backfill use: same cells, same stamps.
    if not deleted:
        changes = [change_from_row(t, r) for t, rs in raw.items() for r in rs]
    else:
        changes = []
        for t, rs in raw.items():
            for r in rs:
                before = normalize_row(t, r, toast_placeholders=False)
                changes.append(Change(t, "d", before, None, tombstone_version(before)))
    rows = {t: tuple(c.after or c.before or {} for c in changes if c.table == t) for t in raw}
    result = WriteResult(op, sid, rows, "skipped", replayed=replayed, postgres_ms=postgres_ms)
    if not d.policy.dual_writes(op):
        return result
    t1 = time.perf_counter()
    mutations: tuple[Mutation, ...] = ()
    try:
        mutations = tuple(m for c in changes for m in project(c))
        d.scylla.write(mutations, d.policy.deadline_s)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
        keys = [f"{t}:{r['id']}" for t, rs in rows.items() for r in rs][:20]
        # Keys only: never the content, which may be private.
        log.warning(
            "dual-write %s committed to Postgres but the read models were not "
            "updated (%s); CDC will converge them. session=%s keys=%s",
            op.value,
            error,
            sid,
            keys,
        )
        return replace(
            result,
            dual_write="failed",
            mutations=mutations,
            error=error,
            scylla_ms=(time.perf_counter() - t1) * 1000,
        )
    return replace(
        result,
        dual_write="written",
        mutations=mutations,
        scylla_ms=(time.perf_counter() - t1) * 1000,
    )
