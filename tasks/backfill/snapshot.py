"""The snapshot stage of the backfill: the write model at one consistent point in time, read by
parallel readers into Parquet chunk files with a manifest.

How the point in time is shared: a coordinator connection (role ``reader``) opens a
REPEATABLE READ transaction and exports its snapshot (``pg_export_snapshot()``); every reader
connection imports it (``SET TRANSACTION SNAPSHOT``) before its first query, so all chunks of
all tables see exactly the same committed rows, however long the reading takes. The same
transaction records the WAL position and the CDC slot's ``confirmed_flush_lsn`` (the gap rule,
docs/architecture.md: the slot must exist before the snapshot so CDC covers every later commit).

Plain code, no Prefect; ``flows/backfill.py`` wraps it.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import psycopg
from psycopg import sql

from tasks.adapters import postgres
from tasks.backfill.chunk_files import join_snapshot, read_chunk
from tasks.backfill.manifest import ChunkFile, Manifest
from tasks.backfill.plan import ChunkPlan, SnapshotFilter, plan_table, tables_for, where
from tasks.backfill.safety import check_cdc_slot
from tasks.core.catalog import READ_MODELS, SOURCE_TABLES
from tasks.core.errors import ServiceUnavailable
from tasks.settings import PostgresSettings


@dataclass(frozen=True)
class SnapshotProgress:
    chunks_done: int
    chunks_total: int
    rows_done: int
    rows_total: int
    elapsed_s: float


def plan_chunks(
    conn: psycopg.Connection, tables: Sequence[str], filt: SnapshotFilter, chunk_size: int
) -> list[ChunkPlan]:
    """The chunks of ``tables`` as ``conn``'s snapshot holds them: row counts and boundary
    keys, asked of the server."""
    plan: list[ChunkPlan] = []
    for table in tables:
        clause, params = where(table, filt)
        count_row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(sql.Identifier(table), clause),
            params,
        ).fetchone()
        total = int(count_row[0]) if count_row else 0
        # Only the boundary keys leave the server: one every chunk_size rows.
        bounds = conn.execute(
            sql.SQL(
                "SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM {} "
                "WHERE {}) k WHERE (rn - 1) %% %s = 0 ORDER BY id"
            ).format(sql.Identifier(table), clause),
            [*params, chunk_size],
        ).fetchall()
        plan.extend(
            plan_table(
                table,
                [uuid.UUID(bytes=b) if isinstance(b, bytes) else b for (b,) in bounds],
                total,
                chunk_size,
            )
        )
    return plan


def take_snapshot(
    root: Path | str,
    read_models: Collection[str] = READ_MODELS,
    *,
    settings: PostgresSettings,
    filt: SnapshotFilter | None = None,
    chunk_size: int = 50_000,
    readers: int = 4,
    require_slot: bool = True,
    dry_run: bool = False,
    fetch_rows: int = 5_000,
    on_progress: Callable[[SnapshotProgress], None] | None = None,
) -> tuple[Manifest, Path | None]:
    """Snapshot the tables feeding ``read_models``. Returns the manifest and the snapshot's
    folder (``root/<snapshot_id>``), or with ``dry_run`` the plan (chunks with their row
    counts, read in the same consistent snapshot) and no folder, having written nothing.
    ``fetch_rows``: rows per fetch of a reader's server-side cursor (and per record batch of
    the Parquet files)."""
    filt = filt or SnapshotFilter()
    tables = tables_for(read_models)
    started = time.monotonic()
    directory: Path | None = None
    # Closing the coordinator ends the exporting transaction: only once every reader is done.
    with postgres.connect("reader", settings) as coord:
        try:
            coord.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            coord.read_only = True
            exported = coord.execute(
                "SELECT pg_export_snapshot(), pg_current_wal_lsn()::text, clock_timestamp()"
            ).fetchone()
            assert exported is not None
            snapshot_name, wal_lsn, taken_at = exported
            # pg_replication_slots is not MVCC: this is the slot as it is at this moment.
            slot_row = coord.execute(
                "SELECT active, confirmed_flush_lsn::text, wal_status FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (settings.slot_name,),
            ).fetchone()
            slot = {
                "name": settings.slot_name,
                "exists": slot_row is not None,
                "active": bool(slot_row and slot_row[0]),
                "confirmed_flush_lsn": slot_row[1] if slot_row else None,
                "wal_status": slot_row[2] if slot_row else None,
            }
            if require_slot:
                check_cdc_slot(slot, settings.slot_name)
            plan = plan_chunks(coord, tables, filt, chunk_size)
            snapshot_id = f"{taken_at.astimezone(UTC):%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:8]}"
            manifest = Manifest(
                snapshot_id,
                taken_at.astimezone(UTC).isoformat(),
                wal_lsn,
                slot,
                filt.to_json(),
                sorted(set(read_models)),
                chunk_size,
                {t: {"rows": sum(c.rows for c in plan if c.table == t)} for t in tables},
            )
            if dry_run:
                manifest.chunks = [
                    ChunkFile(
                        c.id,
                        c.table,
                        c.index,
                        str(c.key_range.lo) if c.key_range.lo else None,
                        str(c.key_range.hi) if c.key_range.hi else None,
                        c.rows,
                        "",
                    )
                    for c in plan
                ]
                return manifest, None
            directory = Path(root) / snapshot_id
            directory.mkdir(parents=True)
            manifest.chunks = _read_chunks(
                plan,
                snapshot_name,
                filt,
                directory,
                readers,
                fetch_rows,
                settings,
                on_progress,
                started,
            )
            manifest.seconds = round(time.monotonic() - started, 3)
            manifest.write(directory)
            return manifest, directory
        except BaseException as exc:
            if directory is not None:  # no manifest, no use: leave no half snapshot behind
                shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, psycopg.OperationalError):
                raise ServiceUnavailable("PostgreSQL", f"snapshot failed: {exc}") from exc
            raise


def _read_chunks(
    plan: list[ChunkPlan],
    snapshot_name: str,
    filt: SnapshotFilter,
    directory: Path,
    readers: int,
    fetch_rows: int,
    settings: PostgresSettings,
    on_progress: Callable[[SnapshotProgress], None] | None,
    started: float,
) -> list[ChunkFile]:
    """Read the chunks with ``readers`` connections sharing the exported snapshot. Progress
    is reported from the calling thread (Prefect's run context does not follow threads)."""
    todo: queue.Queue[ChunkPlan] = queue.Queue()
    for chunk in sorted(plan, key=lambda c: -c.rows):  # biggest first: readers finish together
        todo.put(chunk)
    results: queue.Queue[ChunkFile | BaseException] = queue.Queue()
    stop = threading.Event()

    def reader() -> None:
        try:
            with join_snapshot(snapshot_name, settings) as conn:
                while not stop.is_set():
                    try:
                        chunk = todo.get_nowait()
                    except queue.Empty:
                        return
                    results.put(read_chunk(conn, chunk, filt, directory, fetch_rows))
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            results.put(exc)

    threads = [
        threading.Thread(target=reader, name=f"snapshot-reader-{i}", daemon=True)
        for i in range(max(1, min(readers, len(plan))))
    ]
    for t in threads:
        t.start()
    done: list[ChunkFile] = []
    rows_total = sum(c.rows for c in plan)
    try:
        while len(done) < len(plan):
            item = results.get()
            if isinstance(item, BaseException):
                if isinstance(item, psycopg.OperationalError):
                    raise ServiceUnavailable("PostgreSQL", f"snapshot reader failed: {item}")
                raise item
            done.append(item)
            if on_progress:
                on_progress(
                    SnapshotProgress(
                        len(done),
                        len(plan),
                        sum(c.rows for c in done),
                        rows_total,
                        time.monotonic() - started,
                    )
                )
    finally:
        stop.set()
        for t in threads:
            t.join()
    return sorted(done, key=lambda c: (SOURCE_TABLES.index(c.table), c.index))
