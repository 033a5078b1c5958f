"""Loading one chunk: written by the load method, its row count checked against the
manifest, then checkpointed.

The load methods: "cql" writes rows with prepared INSERTs (any Scylla or Cassandra,
``cql_writes``); "sstable" writes each chunk into SSTables and streams them to the replicas
(Apache Cassandra 4+ only, ``tasks.adapters.sstable``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cassandra.cluster import Session

from tasks.adapters.scylla import ScyllaWriter
from tasks.backfill.checkpoints import Checkpoints
from tasks.backfill.cql_writes import PipelinedWriter, write_chunk_cql
from tasks.backfill.manifest import ChunkFile
from tasks.backfill.rate_limit import RowRateLimiter
from tasks.core.errors import InvalidInput, TerminalError, classify
from tasks.settings import ScyllaSettings, SSTableSettings

LOAD_METHODS: Final = ("cql", "sstable")

# Writes one chunk into some read models: (snapshot directory, chunk, read models) -> (rows
# read, rows written per read model). One per load and process (see ``open_chunk_writer``).
ChunkWriter = Callable[[Path, ChunkFile, Sequence[str]], tuple[int, Counter[str]]]


@dataclass(frozen=True)
class LoadConfig:
    """How a load writes its chunks; the same in every loader process (it is pickled to
    them)."""

    method: str
    keyspace: str
    scylla: ScyllaSettings
    sstable: SSTableSettings | None = None  # needed by method "sstable"
    concurrency: int | None = None  # writes in flight per process (default: the settings')
    # Rows per UNLOGGED replica-set batch ("cql"); default: the settings' replica_batch_rows.
    replica_batch_rows: int | None = None
    record_batch_rows: int = 2_000  # rows per record batch read from a chunk file ("cql")

    def __post_init__(self) -> None:
        if self.method not in LOAD_METHODS:
            raise InvalidInput(f"unknown load method {self.method!r}; one of {LOAD_METHODS}")
        if self.method == "sstable" and self.sstable is None:
            raise InvalidInput("the sstable load method needs its settings (SSTableSettings)")


def open_chunk_writer(
    config: LoadConfig,
    session: Session,
    limiter: RowRateLimiter | None,
    closers: list[Callable[[], None]],
) -> ChunkWriter:
    """This process's way to write a chunk with ``config.method``. Whatever must be shut
    down at the end (the SSTable writer's JVM) is appended to ``closers``."""
    if config.method == "sstable":
        from tasks.adapters.sstable import SSTableWriterProcess

        assert config.sstable is not None
        proc = SSTableWriterProcess(session, config.keyspace, config.sstable, config.scylla)
        closers.append(proc.close)
        acquire = limiter.acquire if limiter else None

        def stream_chunk(
            directory: Path, chunk: ChunkFile, models: Sequence[str]
        ) -> tuple[int, Counter[str]]:
            read, written, _ = proc.stream_chunk(
                directory / chunk.file, chunk.table, chunk.id, models, acquire
            )
            return read, written

        return stream_chunk
    writer = PipelinedWriter(
        ScyllaWriter(
            session,
            config.scylla,
            keyspace=config.keyspace,
            concurrency=config.concurrency,
            replica_batch_rows=config.replica_batch_rows,
        )
    )

    def write_chunk(
        directory: Path, chunk: ChunkFile, models: Sequence[str]
    ) -> tuple[int, Counter[str]]:
        return write_chunk_cql(
            directory / chunk.file,
            chunk.table,
            models,
            writer,
            limiter,
            config.record_batch_rows,
        )

    return write_chunk


@dataclass(frozen=True)
class ChunkDone:
    """One chunk loaded and checkpointed (by this process or a worker process)."""

    chunk_id: str
    table: str
    read_models: tuple[str, ...]
    rows_read: int
    written: Counter[str]
    seconds: float


def load_chunk(
    directory: Path,
    chunk: ChunkFile,
    read_models: Sequence[str],
    snapshot_id: str,
    write: ChunkWriter,
    checkpoints: Checkpoints,
) -> ChunkDone:
    """Write one chunk into ``read_models``, check its row count against the manifest, then
    checkpoint it: the checkpoint is written only once every row of the chunk is."""
    t0 = time.monotonic()
    read, written = write(directory, chunk, read_models)
    if read != chunk.rows:
        raise TerminalError(f"{chunk.file}: {read} rows, manifest says {chunk.rows}")
    seconds = time.monotonic() - t0
    try:
        checkpoints.mark(snapshot_id, chunk.id, written, read, seconds)
    except Exception as exc:
        raise classify(exc, f"checkpoint of {chunk.id}") from exc
    return ChunkDone(chunk.id, chunk.table, tuple(read_models), read, written, seconds)
