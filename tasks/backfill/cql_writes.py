"""The "cql" load method: a chunk file's record batches projected column-wise and written as
prepared INSERTs, in replica-set batches kept in flight by a ``PipelinedWriter``.

Every row goes through the projection CDC and dual-write use (``project_arrow_columns`` gives
the same statements as ``project_row``, its columns encoded once by ``cql_cells`` into the
bytes the driver's binding would give each value: tests/unit prove both), and every write
carries ``USING TIMESTAMP`` = the row's version; so a load may overlap CDC, run twice, or
replay an old snapshot: an older version never beats a newer one (docs/architecture.md).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq
from cassandra.cluster import ResponseFuture
from cassandra.query import BatchStatement, BoundStatement, PreparedStatement

from tasks.adapters.cql_binary import cql_cells
from tasks.adapters.scylla import ScyllaWriter
from tasks.backfill.rate_limit import RowRateLimiter
from tasks.core.columnar import project_arrow_columns
from tasks.core.errors import classify

T = TypeVar("T")


def pieces(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class PipelinedWriter:
    """Sends a ScyllaWriter's requests (replica-set batches, see ``ScyllaWriter.requests``)
    for many rows of one statement without waiting for each: at most ``concurrency`` stay in
    flight, so the next rows are projected while the store applies these."""

    def __init__(self, writer: ScyllaWriter) -> None:
        self.writer = writer
        self.keyspace = writer.keyspace
        self._inflight: deque[ResponseFuture] = deque()

    def submit_rows(self, cql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Send ``rows`` (bind parameters of the statement ``cql``) without waiting for them:
        at most ``concurrency`` requests stay in flight, the oldest is awaited beyond that.
        ``flush`` waits for the rest. A failure raises what ``classify`` makes of it (here or
        in ``flush``): TransientError for an outage, TerminalError for a schema problem,
        RejectedData for a row that cannot be written."""
        return self._submit(
            cql, rows, lambda prepared: self.writer.requests([(prepared, r) for r in rows])
        )

    def submit_values(self, cql: str, rows: Sequence[Sequence[bytes | None]]) -> int:
        """``submit_rows`` for rows already in CQL's binary format (``cql_cells``): what the
        load sends, without the driver serializing value by value."""
        return self._submit(
            cql, rows, lambda prepared: self.writer.requests_of_values(prepared, rows)
        )

    def _submit(
        self,
        cql: str,
        rows: Sequence[object],
        requests: Callable[[PreparedStatement], list[BoundStatement | BatchStatement]],
    ) -> int:
        if not rows:
            return 0
        try:
            # Inside the try: preparing talks to the cluster too (and a raw NoHostAvailable
            # would neither be retried nor pickle back from a worker process).
            for request in requests(self.writer.prepare(cql)):
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


def write_chunk_cql(
    path: Path,
    table: str,
    read_models: Collection[str],
    writer: PipelinedWriter,
    limiter: RowRateLimiter | None = None,
    record_batch_rows: int = 2_000,
) -> tuple[int, Counter[str]]:
    """Project and write one chunk file, reading it ``record_batch_rows`` rows at a time;
    returns (rows read, rows written per read model) once every write is acknowledged."""
    rows_read, written = 0, Counter[str]()
    writer.discard()  # a worker's previous chunk may have failed with requests in flight
    if limiter:
        # Time spent projecting between two acquisitions longer than the bucket holds
        # (1/10 s) would be lost to the rate: keep record batches that small.
        record_batch_rows = max(50, min(record_batch_rows, limiter.burst))
    for batch in pq.ParquetFile(path).iter_batches(batch_size=record_batch_rows):
        for upserts in project_arrow_columns(table, batch, writer.keyspace, read_models):
            rows = list(zip(*map(cql_cells, upserts.arrays), strict=True))
            step = limiter.burst if limiter else max(1, len(rows))
            for piece in pieces(rows, step):
                if limiter:
                    limiter.acquire(len(piece))
                writer.submit_values(upserts.cql, piece)
            written[upserts.read_model] += len(rows)
        rows_read += batch.num_rows
    writer.flush()  # every row acknowledged before the caller checkpoints the chunk
    return rows_read, written
