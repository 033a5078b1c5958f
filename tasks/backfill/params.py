"""The backfill flow's parameters, validated as a whole before any work: a bad value stops the
run with a message that names it, before Postgres or Scylla is touched. Pure: no I/O beyond
checking that a given snapshot folder has a manifest."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.backfill.manifest import MANIFEST, Manifest
from tasks.backfill.plan import SnapshotFilter
from tasks.core.catalog import READ_MODELS, read_models_named
from tasks.core.cql import IDENTIFIER_RULE, is_cql_identifier
from tasks.core.errors import ConfigurationError, describe_invalid

# Upper bounds: far above what pays off, low enough that a typo (a few extra zeros) is refused
# instead of opening thousands of connections or building chunks that cannot fit in memory.
MAX_CHUNK_SIZE = 10_000_000
MAX_CONCURRENCY = 4_096
MAX_WRITE_BATCH_ROWS = 1_000
MAX_READERS = 64
_INTEGERS = ("chunk_size", "concurrency", "write_batch_rows", "workers", "readers")


class BackfillParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    read_models: tuple[str, ...] = Field(
        READ_MODELS, description=f"read models to backfill (default: all of {list(READ_MODELS)})"
    )
    user_ids: tuple[uuid.UUID, ...] | None = Field(
        None,
        description="only these users: their sessions, and the turns and steps of those "
        "sessions (default: every user)",
    )
    created_from: AwareDatetime | None = Field(
        None,
        description="only rows created at or after this time (ISO 8601 with an offset, "
        "e.g. 2026-01-01T00:00:00Z); each table filters its own created_at",
    )
    created_to: AwareDatetime | None = Field(
        None, description="only rows created before this time (ISO 8601 with an offset)"
    )
    chunk_size: int = Field(
        50_000,
        gt=0,
        le=MAX_CHUNK_SIZE,
        description="source rows per chunk: the unit of a Parquet file, of parallel "
        "reading and of checkpoints",
    )
    concurrency: int = Field(
        64, gt=0, le=MAX_CONCURRENCY, description="Scylla writes in flight at once while loading"
    )
    write_batch_rows: int | None = Field(
        None,
        gt=0,
        le=MAX_WRITE_BATCH_ROWS,
        description="method cql: at most this many rows per UNLOGGED batch, each batch "
        "holding rows of one replica set (and under CQRS_SCYLLA_BATCH_MAX_BYTES); 1 sends one "
        "INSERT per row (default: CQRS_SCYLLA_REPLICA_BATCH_ROWS, 100)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="loader processes sharing the chunks, each with its own "
        "Scylla session and `concurrency` writes in flight, and "
        "one rate limit for all; a kill redoes at most one chunk "
        "per worker (more than 1 pays off when the machine has "
        "cores the store does not use)",
    )
    method: Literal["cql", "sstable"] = Field(
        "cql",
        description="how rows reach the read models: cql = prepared INSERTs in "
        "batches (ScyllaDB or Cassandra); sstable = each chunk written "
        "into SSTables and streamed to its replicas, faster on large loads "
        "and far lighter on the cluster, at the cost of a JVM start "
        "(Apache Cassandra 4+ only; "
        "needs Java 17 and the cassandra-all jars, CQRS_SSTABLE_*)",
    )
    readers: int = Field(
        4,
        gt=0,
        le=MAX_READERS,
        description="parallel Postgres reader connections sharing the snapshot",
    )
    rate_limit_rows_per_s: float | None = Field(
        None, gt=0, description="hard limit on read-model rows written per second (default: none)"
    )
    resume: bool = Field(
        False,
        description="finish an interrupted backfill: reuse its snapshot (snapshot_dir, "
        "or the newest matching one under snapshot_root) and skip the "
        "chunks already loaded",
    )
    dry_run: bool = Field(
        False,
        description="plan only: chunks and row counts in a consistent snapshot, chunks "
        "already loaded; writes nothing",
    )
    rebuild: bool = Field(
        False,
        description="TRUNCATE the chosen read models, then snapshot and load them "
        "(CDC may keep running; the tables are empty or partial meanwhile)",
    )
    no_cdc: bool = Field(
        False,
        description="skip the gap rule (the CDC replication slot must exist and be "
        "active before the snapshot): accept that later changes are missed",
    )
    allow_old_snapshot: bool = Field(
        False,
        description="load a snapshot (resume, snapshot_dir) even if it is older than "
        "the target tables' gc_grace_seconds: tombstones of rows deleted "
        "since may be purged, and the load would bring those rows back",
    )
    snapshot_dir: Path | None = Field(
        None,
        description="load this existing snapshot (a folder with manifest.json) instead "
        "of taking a new one; Postgres is not read. Its own filter applies: "
        "user_ids/created_from/created_to, if given, must equal it",
    )
    snapshot_root: Path = Field(
        Path("snapshots"), description="where new snapshots are written, one folder each"
    )
    keyspace: str | None = Field(
        None, description="target keyspace (default: the settings' CQRS_SCYLLA_KEYSPACE)"
    )

    @field_validator("read_models", mode="before")
    @classmethod
    def _read_models(cls, v: Any) -> Any:
        return read_models_named(v)

    @field_validator(*_INTEGERS, mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # bool is an int subclass: True would mean 1
            raise ValueError("Input should be a valid integer, not a boolean")
        return v

    @field_validator("user_ids", mode="before")
    @classmethod
    def _user_ids(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) == 0:
            raise ValueError("an empty list would select nothing; omit it for every user")
        return v

    @field_validator("keyspace")
    @classmethod
    def _keyspace(cls, v: str | None) -> str | None:
        if v is not None and not is_cql_identifier(v):
            raise ValueError(f"must be a CQL identifier: {IDENTIFIER_RULE}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BackfillParams:
        if self.created_from and self.created_to and self.created_from >= self.created_to:
            raise ValueError(
                f"created_from ({self.created_from}) must be before created_to ({self.created_to})"
            )
        if self.rebuild and self.resume:
            raise ValueError(
                "rebuild and resume together: a rebuild truncates what a resume "
                "would keep. After an interrupted rebuild, resume without "
                "rebuild."
            )
        if self.rebuild and self.snapshot_dir and not self.no_cdc:
            raise ValueError(
                "rebuild with snapshot_dir: the truncate would wipe changes CDC "
                "applied since that snapshot was taken, and the old snapshot "
                "does not hold them. Rebuild from a new snapshot (omit "
                "snapshot_dir)."
            )
        if self.snapshot_dir is not None:
            if not (self.snapshot_dir / MANIFEST).is_file():
                raise ValueError(
                    f"snapshot_dir {self.snapshot_dir} has no {MANIFEST}: not a complete snapshot"
                )
            try:
                manifest = Manifest.read(self.snapshot_dir)
            except ConfigurationError as exc:
                raise ValueError(f"snapshot_dir: {exc}") from None
            given = self.filter
            if given != SnapshotFilter() and given.to_json() != manifest.filter:
                # The snapshot holds the rows of its own filter only: loading it cannot apply
                # another one, and ignoring the one given would load rows nobody asked for.
                raise ValueError(
                    f"snapshot_dir {self.snapshot_dir} was taken with filter "
                    f"{manifest.filter}, not the one given ({given.to_json()}): omit "
                    f"user_ids/created_from/created_to to load it as it is, or omit "
                    f"snapshot_dir to take a new snapshot with these filters"
                )
        return self

    @property
    def filter(self) -> SnapshotFilter:
        return SnapshotFilter(self.user_ids, self.created_from, self.created_to)


def validate(params: Mapping[str, Any]) -> BackfillParams:
    """Parameters as given to the flow or the CLI → BackfillParams, or a ConfigurationError
    listing every bad one. None means 'use the default'."""
    given = {k: v for k, v in params.items() if v is not None}
    try:
        return BackfillParams.model_validate(given)
    except ValidationError as exc:
        raise ConfigurationError(describe_invalid(exc, "invalid backfill parameters")) from None
