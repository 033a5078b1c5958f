"""The load stage of the backfill: a snapshot's Parquet files → projection → Scylla.

Every row goes through ``tasks.core.projection.project_row``, the module CDC and dual-write use, and
every write carries ``USING TIMESTAMP`` = the row's version; so a load may overlap CDC, run
twice, or replay an old snapshot: an older version never beats a newer one, and a row CDC has
deleted since the snapshot stays deleted (the tombstone is newer).

Writes go through ``ScyllaWriter`` (prepared statements, bounded concurrency) under a hard
rows/s limit, and each chunk is checkpointed once all its writes succeeded, so ``resume``
skips finished chunks. Checkpoints live in ``<keyspace>.backfill_checkpoints``, next to the
data they describe, rather than in the snapshot folder: they say what one keyspace holds, so
loading the same snapshot into another keyspace or cluster starts from zero as it must; a
rebuild (TRUNCATE) can forget them in the same place; and workers on other machines, or a
read-only snapshot store, see the same state.

Plain code, no Prefect; ``flows/backfill.py`` wraps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.util
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow.parquet as pq
from cassandra.cluster import ResponseFuture, Session
from pyrate_limiter import (
    Duration,
    Limiter,
    MultiprocessStateStore,
    Rate,
    StateBucket,
    TokenBucket,
)

from tasks.adapters import scylla
from tasks.adapters.scylla import ScyllaWriter
from tasks.backfill.snapshot import FEEDS, ChunkFile, Manifest, tables_for
from tasks.core.errors import (
    ConfigurationError,
    InvalidInput,
    TerminalError,
    TransientError,
    classify,
)
from tasks.core.projection import READ_MODELS, project_arrow
from tasks.settings import get_settings

T = TypeVar("T")
_IDENT: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}\Z")
CHECKPOINT_TABLE: Final = "backfill_checkpoints"


def _keyspace(name: str | None) -> str:
    ks = name or get_settings().scylla.keyspace
    if not _IDENT.match(ks):
        raise InvalidInput(f"invalid keyspace name {ks!r}")
    return ks


# --------------------------------------------------------------------------------------------
# Rate limit


class RowRateLimiter:
    """A hard cap on rows written per second: pyrate-limiter's token bucket, refilling at the
    limit and holding ``catch_up_s`` seconds of rows, that starts EMPTY. So the rows written
    by any moment t after the start never exceed limit x t, while a stall (GC, a descheduled
    process, a slow write) of up to ``catch_up_s`` is made up afterwards instead of lost; no
    window of T seconds holds more than limit x (T + catch_up_s) rows. Rows are taken in
    pieces of at most 1/10 s, so writes stay smooth.

    ``shared`` makes one limit for the worker processes of one load. Separate backfills (on
    other Prefect workers) each have their own limit; pyrate-limiter's Redis or Postgres
    buckets would make one across machines."""

    def __init__(
        self,
        rows_per_s: float,
        catch_up_s: float = 0.5,
        *,
        store: MultiprocessStateStore | None = None,
        drain: bool = True,
    ) -> None:
        if not rows_per_s > 0:
            raise InvalidInput(f"rate limit must be > 0 rows/s, got {rows_per_s}")
        self.rows_per_s, self.catch_up_s, self.store = rows_per_s, catch_up_s, store
        self.burst = max(1, int(rows_per_s * 0.1))  # rows per acquisition (and write)
        capacity = max(self.burst, int(rows_per_s * catch_up_s))
        # Rate takes an integer limit per interval: rows per 1000 s keeps fractional rates.
        rate = Rate(max(1, round(rows_per_s * 1000)), Duration.SECOND * 1000, burst=capacity)
        # buffer_ms: the library sleeps this much past the computed wait; 1 ms, not the
        # default 50, or short waits would lose most of the rate.
        bucket = (
            StateBucket([rate], algorithm=TokenBucket())
            if store is None
            else StateBucket([rate], algorithm=TokenBucket(), store=store)
        )
        self._limiter = Limiter(bucket, buffer_ms=1)
        if drain:
            # Drain the bucket: a full one would let catch_up_s of rows out at once.
            self._limiter.try_acquire("backfill", weight=capacity)

    @classmethod
    def shared(cls, rows_per_s: float, catch_up_s: float = 0.5) -> RowRateLimiter:
        """One limit for several processes: the token bucket's state lives in a
        multiprocessing manager (pyrate-limiter's MultiprocessStateStore), so N loader
        processes together write at most the limit, however the chunks fall among them."""
        # Lock and manager from the spawn context the loader's workers are started with (a
        # fork-context lock cannot be handed to a spawned process).
        ctx = multiprocessing.get_context("spawn")
        manager = SyncManager(ctx=ctx)
        manager.start(_die_with_parent, (os.getpid(),))  # no orphan after a kill
        limiter = cls(
            rows_per_s, catch_up_s, store=MultiprocessStateStore(manager.list(), ctx.RLock())
        )
        limiter._manager = manager
        return limiter

    def for_worker(self) -> tuple[float, float, MultiprocessStateStore | None]:
        """What a worker process needs to join this limiter (see ``joined``)."""
        return self.rows_per_s, self.catch_up_s, self.store

    @classmethod
    def joined(cls, spec: tuple[float, float, MultiprocessStateStore | None]) -> RowRateLimiter:
        rows_per_s, catch_up_s, store = spec
        return cls(rows_per_s, catch_up_s, store=store, drain=store is None)

    _manager: SyncManager | None = None

    def acquire(self, rows: int) -> None:
        while rows > 0:
            n = min(rows, self.burst)
            if not self._limiter.try_acquire("backfill", weight=n):
                raise TerminalError(f"rate limiter refused {n} rows (burst {self.burst})")
            rows -= n

    def close(self) -> None:
        self._limiter.close()
        if self._manager is not None:
            self._manager.shutdown()


def pieces(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------------------------
# Batched writes


class BatchingWriter:
    """A ScyllaWriter's requests (replica-set batches of ``writer.batch_rows`` rows, see
    ``ScyllaWriter.requests``) for many rows of one statement, pipelined: the next rows are
    projected while the store applies these."""

    def __init__(self, writer: ScyllaWriter) -> None:
        self.writer = writer
        self.keyspace = writer.keyspace
        self._inflight: deque[ResponseFuture] = deque()

    def submit_rows(self, cql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Send ``rows`` (bind parameters of the statement ``cql``) without waiting for them:
        at most ``concurrency`` requests stay in flight, the oldest is awaited beyond that.
        So the next rows are projected while the store applies these; ``flush`` waits for
        the rest. A failure raises what ``classify`` makes of it (here or in ``flush``):
        TransientError for an outage, TerminalError for a schema problem, RejectedData for
        a row that cannot be written."""
        if not rows:
            return 0
        try:
            # Inside the try: preparing talks to the cluster too (and a raw NoHostAvailable
            # would neither be retried nor pickle back from a worker process).
            prepared = self.writer.prepare(cql)
            for request in self.writer.requests([(prepared, r) for r in rows]):
                while len(self._inflight) >= self.writer.concurrency:
                    self._await(self._inflight.popleft())
                self._inflight.append(self.writer.session.execute_async(request))
        except Exception as exc:
            self._inflight.clear()
            raise classify(exc, f"Scylla write of {len(rows)} rows") from exc
        return len(rows)

    def discard(self) -> None:
        """Forget requests a failed chunk left in flight (the chunk is redone anyway)."""
        self._inflight.clear()

    def flush(self) -> None:
        """Wait until every request sent so far is acknowledged."""
        while self._inflight:
            self._await(self._inflight.popleft())

    def _await(self, future: ResponseFuture) -> None:
        try:
            future.result()
        except Exception as exc:
            self._inflight.clear()  # their outcome no longer matters: the chunk is redone
            raise classify(exc, "Scylla write") from exc


# --------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """One row per (read model, snapshot, chunk) loaded. Partitioned by read model so a
    rebuild forgets every snapshot's checkpoints for the models it truncates in one delete."""

    def __init__(self, session: Session, keyspace: str | None = None) -> None:
        self.session = session
        self.keyspace = _keyspace(keyspace)
        t = f"{self.keyspace}.{CHECKPOINT_TABLE}"
        try:
            self._prepare(session, t)
        except Exception as exc:
            raise classify(exc, f"setting up the checkpoints in {t}") from exc

    def _prepare(self, session: Session, t: str) -> None:
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {t} (read_model text, snapshot_id text, "
            f"chunk_id text, rows_read bigint, rows_written bigint, seconds double, "
            f"loaded_at timestamp, PRIMARY KEY ((read_model), snapshot_id, chunk_id))",
            timeout=60,
        )
        self._insert = session.prepare(
            f"INSERT INTO {t} (read_model, snapshot_id, chunk_id, rows_read, rows_written, "
            f"seconds, loaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self._select = session.prepare(
            f"SELECT chunk_id, loaded_at FROM {t} WHERE read_model = ? AND snapshot_id = ?"
        )
        self._forget = session.prepare(f"DELETE FROM {t} WHERE read_model = ?")
        write_consistency = get_settings().scylla.write_consistency_level
        for stmt in (self._insert, self._forget):
            # Re-marking a chunk or forgetting twice is harmless: the driver may retry these.
            stmt.consistency_level, stmt.is_idempotent = write_consistency, True

    def loaded(
        self, snapshot_id: str, read_models: Collection[str]
    ) -> dict[str, dict[str, datetime]]:
        """chunk id -> {read model: loaded_at} for the chunks already loaded."""
        out: dict[str, dict[str, datetime]] = {}
        for rm in read_models:
            for row in self.session.execute(self._select, (rm, snapshot_id)):
                out.setdefault(row.chunk_id, {})[rm] = row.loaded_at
        return out

    def mark(
        self, snapshot_id: str, chunk_id: str, written: Counter[str], rows_read: int, seconds: float
    ) -> None:
        now = datetime.now(UTC)
        for rm, n in written.items():
            self.session.execute(
                self._insert, (rm, snapshot_id, chunk_id, rows_read, n, seconds, now)
            )

    def forget(self, read_models: Collection[str]) -> None:
        for rm in read_models:
            self.session.execute(self._forget, (rm,))


def truncate_read_models(
    session: Session, read_models: Collection[str], keyspace: str | None = None
) -> None:
    """Empty the read models and forget their checkpoints. Checkpoints go first: a crash in
    between then leaves data without checkpoints (a resume reloads it, harmless), never
    checkpoints without data (a resume would skip chunks that are gone)."""
    ks = _keyspace(keyspace)
    if unknown := set(read_models) - set(READ_MODELS):
        raise InvalidInput(f"unknown read model(s) {sorted(unknown)}")
    try:
        Checkpoints(session, ks).forget(read_models)
        for rm in read_models:
            session.execute(f"TRUNCATE {ks}.{rm}", timeout=300)
    except Exception as exc:
        raise classify(exc, f"truncating {sorted(read_models)} in {ks}") from exc


# --------------------------------------------------------------------------------------------
# Loading


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


def load_chunk(
    path: Path,
    table: str,
    read_models: Collection[str],
    writer: BatchingWriter,
    limiter: RowRateLimiter | None = None,
    batch_rows: int = 2_000,
) -> tuple[int, Counter[str]]:
    """Project and write one chunk file; returns (rows read, rows written per read model).
    Record batches go through the projection column-wise (``project_arrow``: the same
    statements and parameters as ``project_row``, without a dict and a Mutation per row)."""
    rows_read, written = 0, Counter[str]()
    writer.discard()  # a worker's previous chunk may have failed with requests in flight
    if limiter:
        # Time spent projecting between two acquisitions longer than the bucket holds
        # (1/10 s) would be lost to the rate: keep record batches that small.
        batch_rows = max(50, min(batch_rows, limiter.burst))
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for upserts in project_arrow(table, batch, writer.keyspace, read_models):
            step = limiter.burst if limiter else max(1, len(upserts.params))
            for piece in pieces(upserts.params, step):
                if limiter:
                    limiter.acquire(len(piece))
                writer.submit_rows(upserts.cql, piece)
            written[upserts.read_model] += len(upserts.params)
        rows_read += batch.num_rows
    writer.flush()  # every row acknowledged before the caller checkpoints the chunk
    return rows_read, written


@dataclass(frozen=True)
class ChunkDone:
    """One chunk loaded and checkpointed (by this process or a worker process)."""

    chunk_id: str
    table: str
    read_models: tuple[str, ...]
    rows_read: int
    written: Counter[str]
    seconds: float


# What loads one chunk into some read models: (directory, chunk, read models) -> (rows read,
# rows written per read model). One per method and process (see ``_chunk_loader``).
ChunkLoader = Callable[[Path, ChunkFile, Sequence[str]], tuple[int, Counter[str]]]
LOAD_METHODS: Final = ("cql", "sstable")


def load_and_checkpoint(
    directory: Path,
    chunk: ChunkFile,
    read_models: Sequence[str],
    snapshot_id: str,
    load: ChunkLoader,
    checkpoints: Checkpoints,
) -> ChunkDone:
    """Load one chunk into ``read_models``, check its row count against the manifest, then
    checkpoint it: the checkpoint is written only once every row of the chunk is."""
    t0 = time.monotonic()
    read, written = load(directory, chunk, read_models)
    if read != chunk.rows:
        raise TerminalError(f"{chunk.file}: {read} rows, manifest says {chunk.rows}")
    seconds = time.monotonic() - t0
    try:
        checkpoints.mark(snapshot_id, chunk.id, written, read, seconds)
    except Exception as exc:
        raise classify(exc, f"checkpoint of {chunk.id}") from exc
    return ChunkDone(chunk.id, chunk.table, tuple(read_models), read, written, seconds)


def _chunk_loader(
    method: str,
    session: Session,
    keyspace: str,
    concurrency: int | None,
    write_batch_rows: int,
    limiter: RowRateLimiter | None,
    batch_rows: int,
    closers: list[Callable[[], None]],
) -> ChunkLoader:
    """This process's way to load a chunk: CQL writes (any Scylla or Cassandra) or SSTables
    streamed to the replicas (Cassandra 4+, see tasks/sstable_load). Whatever must be shut
    down at the end is appended to ``closers``."""
    if method == "sstable":
        from tasks.adapters.sstable import SSTableWriterProcess

        proc = SSTableWriterProcess(session, keyspace)
        closers.append(proc.close)
        acquire = limiter.acquire if limiter else None

        def load_sstables(
            directory: Path, chunk: ChunkFile, models: Sequence[str]
        ) -> tuple[int, Counter[str]]:
            read, written, _ = proc.load_chunk(
                directory / chunk.file, chunk.table, chunk.id, models, acquire
            )
            return read, written

        return load_sstables
    writer = BatchingWriter(
        ScyllaWriter(session, keyspace, concurrency, batch_rows=write_batch_rows)
    )

    def load_cql(
        directory: Path, chunk: ChunkFile, models: Sequence[str]
    ) -> tuple[int, Counter[str]]:
        return load_chunk(directory / chunk.file, chunk.table, models, writer, limiter, batch_rows)

    return load_cql


# Worker processes: where the client, not the store, limits one loader (projection, binding
# and the driver's encoding hold one GIL: ~40 µs of CPU per row on the test machine), a load
# spreads its chunks over processes, each with its own session.

_worker: dict[str, Any] = {}


def _die_with_parent(parent_pid: int) -> None:
    # A SIGKILLed backfill must not leave workers writing and checkpointing behind it (the
    # resume would then skip chunks it never saw finish). Linux: prctl(PR_SET_PDEATHSIG).
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would signal us
        os._exit(1)


def _worker_start(
    parent_pid: int,
    method: str,
    keyspace: str,
    concurrency: int | None,
    write_batch_rows: int,
    batch_rows: int,
    limiter: tuple[float, float, MultiprocessStateStore | None] | None,
) -> None:
    _die_with_parent(parent_pid)
    _worker["args"] = (method, keyspace, concurrency, write_batch_rows, batch_rows, limiter)


def _worker_load(
    directory: Path, chunk: ChunkFile, read_models: Sequence[str], snapshot_id: str
) -> ChunkDone:
    if "load" not in _worker:
        # Made at the first chunk, not in the initializer: an error here (no Java, a bad
        # cluster) then reaches the parent as itself, instead of as a broken pool.
        method, keyspace, concurrency, write_batch_rows, batch_rows, limiter = _worker["args"]
        session = scylla.connect()
        _worker["checkpoints"] = Checkpoints(session, keyspace)
        closers: list[Callable[[], None]] = []
        try:
            _worker["load"] = _chunk_loader(
                method,
                session,
                keyspace,
                concurrency,
                write_batch_rows,
                RowRateLimiter.joined(limiter) if limiter else None,
                batch_rows,
                closers,
            )
        finally:
            for close in closers:  # e.g. the SSTable writer's JVM, when the pool shuts down
                multiprocessing.util.Finalize(None, close, exitpriority=10)
    return load_and_checkpoint(
        directory, chunk, read_models, snapshot_id, _worker["load"], _worker["checkpoints"]
    )


def load_snapshot(
    directory: Path | str,
    session: Session,
    *,
    read_models: Collection[str] | None = None,
    keyspace: str | None = None,
    concurrency: int | None = None,
    rate_limit_rows_per_s: float | None = None,
    resume: bool = False,
    batch_rows: int = 2_000,
    write_batch_rows: int = 20,
    workers: int = 1,
    method: str = "cql",
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> LoadResult:
    """Load a snapshot into ``read_models`` (default: those it was taken for) of ``keyspace``.
    With ``resume``, chunks checkpointed for a read model are neither read nor written again
    for it. ``workers`` > 1 loads chunks in that many processes (spawned, one Scylla session
    each, ``concurrency`` writes in flight each, one shared rate limit); a kill then redoes
    at most one chunk per worker. ``method``: "cql" writes rows with prepared INSERTs (any
    Scylla or Cassandra); "sstable" writes each chunk into SSTables and streams them to the
    replicas (Apache Cassandra 4+ only; see tasks/sstable_load). Never touches Postgres."""
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
    ks = _keyspace(keyspace)
    started = time.monotonic()
    try:
        checkpoints = Checkpoints(session, ks)
        done = checkpoints.loaded(manifest.snapshot_id, models) if resume else {}
    except Exception as exc:
        raise classify(exc, "reading the backfill checkpoints") from exc
    result = LoadResult(manifest.snapshot_id, ks, models)
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
                method,
                ks,
                concurrency,
                rate_limit_rows_per_s,
                batch_rows,
                write_batch_rows,
                checkpoints,
                finished,
            )
        else:
            _load_in_workers(
                directory,
                todo,
                manifest.snapshot_id,
                method,
                ks,
                concurrency,
                rate_limit_rows_per_s,
                batch_rows,
                write_batch_rows,
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
    method: str,
    keyspace: str,
    concurrency: int | None,
    rate_limit: float | None,
    batch_rows: int,
    write_batch_rows: int,
    checkpoints: Checkpoints,
    finished: Callable[[ChunkDone], None],
) -> None:
    limiter = RowRateLimiter(rate_limit) if rate_limit else None
    closers: list[Callable[[], None]] = []
    try:
        load = _chunk_loader(
            method, session, keyspace, concurrency, write_batch_rows, limiter, batch_rows, closers
        )
        for chunk, models in todo:
            finished(load_and_checkpoint(directory, chunk, models, snapshot_id, load, checkpoints))
    finally:
        for close in closers:
            close()
        if limiter:
            limiter.close()


def _load_in_workers(
    directory: Path,
    todo: Sequence[tuple[ChunkFile, list[str]]],
    snapshot_id: str,
    method: str,
    keyspace: str,
    concurrency: int | None,
    rate_limit: float | None,
    batch_rows: int,
    write_batch_rows: int,
    workers: int,
    finished: Callable[[ChunkDone], None],
) -> None:
    limiter = RowRateLimiter.shared(rate_limit) if rate_limit else None
    # spawn, not fork: the parent holds a driver session with live threads and sockets.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_start,
        initargs=(
            os.getpid(),
            method,
            keyspace,
            concurrency,
            write_batch_rows,
            batch_rows,
            limiter.for_worker() if limiter else None,
        ),
    )
    try:
        futures = [
            pool.submit(_worker_load, directory, chunk, models, snapshot_id)
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
