"""Loader worker processes. Where the client, not the store, limits one loader (projection,
binding and the driver's encoding hold one GIL), a load spreads its chunks over processes,
each with its own session and ``concurrency`` writes in flight, under one shared rate limit.
Spawned, not forked: the parent holds a driver session with live threads and sockets."""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tasks.adapters import scylla
from tasks.backfill.checkpoints import Checkpoints
from tasks.backfill.chunk_load import ChunkDone, LoadConfig, load_chunk, open_chunk_writer
from tasks.backfill.manifest import ChunkFile
from tasks.backfill.processes import die_with_parent
from tasks.backfill.rate_limit import LimiterSpec, RowRateLimiter
from tasks.core.errors import TransientError

# This worker process's state: its LoadConfig and limiter at start, then its session,
# checkpoints and chunk writer from the first chunk on.
_worker: dict[str, Any] = {}


def _start_worker(parent_pid: int, config: LoadConfig, limiter: LimiterSpec | None) -> None:
    die_with_parent(parent_pid)
    _worker["args"] = (config, limiter)


def _load_chunk_in_worker(
    directory: Path, chunk: ChunkFile, read_models: Sequence[str], snapshot_id: str
) -> ChunkDone:
    if "write" not in _worker:
        # Made at the first chunk, not in the initializer: an error here (no Java, a bad
        # cluster) then reaches the parent as itself, instead of as a broken pool. The
        # session lives as long as the worker process.
        config, limiter = _worker["args"]
        session = scylla.connect(config.scylla)
        _worker["checkpoints"] = Checkpoints(session, config.scylla, config.keyspace)
        closers: list[Callable[[], None]] = []
        try:
            _worker["write"] = open_chunk_writer(
                config, session, RowRateLimiter.joined(limiter) if limiter else None, closers
            )
        finally:
            for close in closers:  # e.g. the SSTable writer's JVM, when the pool shuts down
                multiprocessing.util.Finalize(None, close, exitpriority=10)
    return load_chunk(
        directory, chunk, read_models, snapshot_id, _worker["write"], _worker["checkpoints"]
    )


def load_in_workers(
    directory: Path,
    todo: Sequence[tuple[ChunkFile, list[str]]],
    snapshot_id: str,
    config: LoadConfig,
    rate_limit: float | None,
    workers: int,
    finished: Callable[[ChunkDone], None],
) -> None:
    """Load the ``todo`` chunks in ``workers`` processes; ``finished`` is called here, in
    the calling process, for each chunk done. The first failure raises."""
    limiter = RowRateLimiter.shared(rate_limit) if rate_limit else None
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), config, limiter.for_worker() if limiter else None),
    )
    try:
        futures = [
            pool.submit(_load_chunk_in_worker, directory, chunk, models, snapshot_id)
            for chunk, models in todo
        ]
        for future in as_completed(futures):
            finished(future.result())  # the first failure raises here
    except BrokenProcessPool as exc:
        raise TransientError(f"a loader worker process died: {exc}") from exc
    finally:
        # On failure: drop what has not started; chunks in flight finish and checkpoint.
        pool.shutdown(wait=True, cancel_futures=True)
        if limiter:
            limiter.close()
