"""The load stage of the backfill: a snapshot's chunk files → projection → the read models.

Each chunk is written by the load method (``chunk_load``) under a hard rows/s limit, its row
count checked against the manifest, then checkpointed (``checkpoints``) once all its writes
succeeded, so ``resume`` skips finished chunks. With ``workers`` > 1 the chunks are spread
over loader processes (``workers``).

Plain code, no Prefect; ``flows/backfill.py`` wraps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cassandra.cluster import Session

from tasks.backfill.checkpoints import Checkpoints
from tasks.backfill.chunk_load import (
    LOAD_METHODS,
    ChunkDone,
    LoadConfig,
    load_chunk,
    open_chunk_writer,
)
from tasks.backfill.manifest import ChunkFile, Manifest
from tasks.backfill.plan import FEEDS, tables_for
from tasks.backfill.rate_limit import RowRateLimiter
from tasks.backfill.workers import load_in_workers
from tasks.core.catalog import READ_MODELS
from tasks.core.cql import check_keyspace
from tasks.core.errors import ConfigurationError, InvalidInput, classify
from tasks.settings import ScyllaSettings, SSTableSettings


@dataclass
class PairStats:
    """What one source table contributed to one read model in this run."""

    table: str
    read_model: str
    chunks: int = 0
    chunks_skipped: int = 0
    rows_read: int = 0
    rows_written: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LoadProgress:
    chunks_done: int  # loaded or skipped
    chunks_total: int
    rows_done: int  # source rows, loaded or skipped
    rows_total: int
    rows_read: int  # source rows read in this run
    rows_written: int
    elapsed_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rows_per_s
        return (self.rows_total - self.rows_done) / rate if rate > 0 else None


@dataclass
class LoadResult:
    snapshot_id: str
    keyspace: str
    read_models: tuple[str, ...]
    pairs: list[PairStats] = field(default_factory=list)
    chunks_loaded: list[str] = field(default_factory=list)
    chunks_skipped: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_written: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


def load_snapshot(
    directory: Path | str,
    session: Session,
    settings: ScyllaSettings,
    *,
    sstable: SSTableSettings | None = None,
    read_models: Collection[str] | None = None,
    keyspace: str | None = None,
    concurrency: int | None = None,
    rate_limit_rows_per_s: float | None = None,
    resume: bool = False,
    record_batch_rows: int = 2_000,
    replica_batch_rows: int | None = None,
    workers: int = 1,
    method: str = "cql",
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> LoadResult:
    """Load a snapshot into ``read_models`` (default: those it was taken for) of ``keyspace``
    (default: the settings'). With ``resume``, chunks checkpointed for a read model are
    neither read nor written again for it. ``workers`` > 1 loads chunks in that many
    processes (spawned, one session each, ``concurrency`` writes in flight each, one shared
    rate limit); a kill then redoes at most one chunk per worker. ``method``: "cql" or
    "sstable" (``chunk_load``; "sstable" needs ``sstable``). ``replica_batch_rows``: rows per
    UNLOGGED replica-set batch (default: the settings'); ``record_batch_rows``: rows per
    record batch read from a chunk file (both "cql"). Never touches Postgres."""
    if workers < 1:
        raise InvalidInput(f"workers must be >= 1, got {workers}")
    if method not in LOAD_METHODS:
        raise InvalidInput(f"unknown load method {method!r}; one of {LOAD_METHODS}")
    directory = Path(directory)
    manifest = Manifest.read(directory)
    models = tuple(sorted(set(read_models or manifest.read_models)))
    if unknown := set(models) - set(READ_MODELS):
        raise InvalidInput(f"unknown read model(s) {sorted(unknown)}")
    tables = tables_for(models)
    if missing := [t for t in tables if t not in manifest.tables]:
        raise ConfigurationError(
            f"snapshot {manifest.snapshot_id} has no {missing} (it was "
            f"taken for {manifest.read_models}); take one for {models}"
        )
    config = LoadConfig(
        method,
        check_keyspace(keyspace or settings.keyspace),
        settings,
        sstable,
        concurrency,
        replica_batch_rows,
        record_batch_rows,
    )
    started = time.monotonic()
    try:
        checkpoints = Checkpoints(session, settings, config.keyspace)
        done = checkpoints.loaded(manifest.snapshot_id, models) if resume else {}
    except Exception as exc:
        raise classify(exc, "reading the backfill checkpoints") from exc
    result = LoadResult(manifest.snapshot_id, config.keyspace, models)
    pairs = {(t, rm): PairStats(t, rm) for t in tables for rm in sorted(FEEDS[t] & set(models))}
    result.pairs = list(pairs.values())
    chunks: list[ChunkFile] = [c for c in manifest.chunks if c.table in tables]
    rows_total = sum(c.rows for c in chunks)
    todo: list[tuple[ChunkFile, list[str]]] = []
    rows_done = chunks_done = 0
    for chunk in chunks:
        wanted = FEEDS[chunk.table] & set(models)
        missing_models = sorted(wanted - set(done.get(chunk.id, {})))
        for rm in wanted - set(missing_models):
            pairs[chunk.table, rm].chunks_skipped += 1
        if missing_models:
            todo.append((chunk, missing_models))
        else:
            result.chunks_skipped.append(chunk.id)
            rows_done += chunk.rows
            chunks_done += 1

    def finished(d: ChunkDone) -> None:
        nonlocal rows_done, chunks_done
        for rm in d.read_models:
            p = pairs[d.table, rm]
            p.chunks += 1
            p.rows_read += d.rows_read
            p.rows_written += d.written[rm]
            p.seconds += d.seconds
        result.chunks_loaded.append(d.chunk_id)
        result.rows_read += d.rows_read
        result.rows_written += sum(d.written.values())
        rows_done += d.rows_read
        chunks_done += 1
        if on_progress:
            on_progress(
                LoadProgress(
                    chunks_done,
                    len(chunks),
                    rows_done,
                    rows_total,
                    result.rows_read,
                    result.rows_written,
                    time.monotonic() - started,
                )
            )

    if on_progress and chunks_done:
        on_progress(
            LoadProgress(
                chunks_done, len(chunks), rows_done, rows_total, 0, 0, time.monotonic() - started
            )
        )
    workers = min(workers, len(todo))
    try:
        if workers <= 1:
            _load_here(
                directory,
                todo,
                manifest.snapshot_id,
                session,
                config,
                rate_limit_rows_per_s,
                checkpoints,
                finished,
            )
        else:
            load_in_workers(
                directory,
                todo,
                manifest.snapshot_id,
                config,
                rate_limit_rows_per_s,
                workers,
                finished,
            )
    finally:
        result.seconds = time.monotonic() - started
    return result


def _load_here(
    directory: Path,
    todo: Sequence[tuple[ChunkFile, list[str]]],
    snapshot_id: str,
    session: Session,
    config: LoadConfig,
    rate_limit: float | None,
    checkpoints: Checkpoints,
    finished: Callable[[ChunkDone], None],
) -> None:
    limiter = RowRateLimiter(rate_limit) if rate_limit else None
    closers: list[Callable[[], None]] = []
    try:
        write = open_chunk_writer(config, session, limiter, closers)
        for chunk, models in todo:
            finished(load_chunk(directory, chunk, models, snapshot_id, write, checkpoints))
    finally:
        for close in closers:
            close()
        if limiter:
            limiter.close()
