"""The snapshot stage of the backfill: the write model at one consistent point in time, read by
parallel readers into Parquet files (one per chunk) with a manifest.

How the point in time is shared: a coordinator connection (role ``reader``) opens a
REPEATABLE READ transaction and exports its snapshot (``pg_export_snapshot()``); every reader
connection imports it (``SET TRANSACTION SNAPSHOT``) before its first query, so all chunks of
all tables see exactly the same committed rows, however long the reading takes. The same
transaction records the WAL position and the CDC slot's ``confirmed_flush_lsn`` (the gap rule,
docs/architecture.md: the slot must exist before the snapshot so CDC covers every later commit).

Chunks are primary-key (uuid) ranges whose bounds come from the data itself (every
``chunk_size``-th key in key order), so chunks are even whatever the key distribution (random
v4 or time-ordered v7 keys). Rows stream through server-side cursors in batches: no table, and
no chunk, is ever held in memory whole.

Plain code, no Prefect; ``flows/backfill.py`` wraps it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.pq import Format

from tasks.adapters import postgres
from tasks.core.errors import ConfigurationError, ServiceUnavailable, TerminalError
from tasks.core.projection import COLUMNS, READ_MODELS, SOURCE_TABLES, project_row
from tasks.settings import PostgresSettings, get_settings

MANIFEST: Final = "manifest.json"
FORMAT_VERSION: Final = 1
_PG_EPOCH_US: Final = 946_684_800 * 1_000_000  # 2000-01-01T00:00Z, Postgres' binary epoch

_ARROW_TYPES: Final[Mapping[str, pa.DataType]] = {
    "uuid": pa.uuid(),  # Parquet logical type UUID: self-describing for other tools
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "text": pa.string(),
    "int": pa.int32(),
    "jsonb": pa.string(),  # canonical JSON text, as Debezium sends it
}


def arrow_schema(table: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field(col, _ARROW_TYPES[typ], metadata={"pg_type": typ})
            for col, typ in COLUMNS[table].items()
        ]
    )


def _synthetic_row(table: str) -> dict[str, Any]:
    samples = {
        "uuid": uuid.UUID(int=1),
        "timestamptz": datetime(2000, 1, 1, tzinfo=UTC),
        "text": "x",
        "int": 0,
        "jsonb": "{}",
    }
    return {col: samples[typ] for col, typ in COLUMNS[table].items()}


# Which read models each source table feeds, asked of the projection itself (one source of
# truth) by projecting a synthetic row.
FEEDS: Final[Mapping[str, frozenset[str]]] = {
    t: frozenset(u.read_model for u in project_row(t, _synthetic_row(t))) for t in SOURCE_TABLES
}


def tables_for(read_models: Collection[str]) -> tuple[str, ...]:
    """The source tables the given read models are projected from, in SOURCE_TABLES order."""
    wanted = set(read_models)
    return tuple(t for t in SOURCE_TABLES if FEEDS[t] & wanted)


# --------------------------------------------------------------------------------------------
# Filters and chunk planning (pure)


@dataclass(frozen=True)
class SnapshotFilter:
    """Rows to read. ``user_ids``: sessions of these users, and turns/steps whose session
    belongs to them. ``created_from``/``created_to``: each row's own ``created_at`` in
    [from, to) - a read model row is projected from one source row, so each table is
    filtered on its own rows."""

    user_ids: tuple[uuid.UUID, ...] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """Canonical (sorted ids, UTC times): equal filters give equal JSON, which is how a
        resume finds the snapshot of an interrupted run."""

        def when(t: datetime | None) -> str | None:
            return t.astimezone(UTC).isoformat() if t else None

        ids = None if self.user_ids is None else sorted(str(u) for u in set(self.user_ids))
        return {
            "user_ids": ids,
            "created_from": when(self.created_from),
            "created_to": when(self.created_to),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SnapshotFilter:
        ids = d.get("user_ids")
        return cls(
            None if ids is None else tuple(uuid.UUID(u) for u in ids),
            datetime.fromisoformat(d["created_from"]) if d.get("created_from") else None,
            datetime.fromisoformat(d["created_to"]) if d.get("created_to") else None,
        )


@dataclass(frozen=True)
class KeyRange:
    """Primary keys in [lo, hi); None is unbounded. Postgres orders uuid bytewise, which is
    the order of ``uuid.UUID.int``, so Python and SQL agree on membership."""

    lo: uuid.UUID | None = None
    hi: uuid.UUID | None = None

    def contains(self, key: uuid.UUID) -> bool:
        return (self.lo is None or key >= self.lo) and (self.hi is None or key < self.hi)


@dataclass(frozen=True)
class ChunkPlan:
    table: str
    index: int
    key_range: KeyRange
    rows: int

    @property
    def id(self) -> str:
        return f"{self.table}-{self.index:05d}"


def plan_table(
    table: str, boundaries: Sequence[uuid.UUID], total_rows: int, chunk_size: int
) -> list[ChunkPlan]:
    """Chunks of one table from its boundary keys (the 1st, (chunk_size+1)th, ... key in key
    order). The first range is open below and the last open above, so together they cover
    the whole key space with no gap and no overlap."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be > 0")
    if total_rows == 0:
        return []
    if list(boundaries) != sorted(set(boundaries)):
        raise ValueError("boundaries must be distinct and ascending")
    expected = -(-total_rows // chunk_size)
    if len(boundaries) != expected:
        raise ValueError(
            f"{table}: {len(boundaries)} boundaries for {total_rows} rows in "
            f"chunks of {chunk_size} (expected {expected})"
        )
    bounds: list[uuid.UUID | None] = [None, *boundaries[1:], None]
    return [
        ChunkPlan(
            table,
            i,
            KeyRange(bounds[i], bounds[i + 1]),
            min(chunk_size, total_rows - i * chunk_size),
        )
        for i in range(expected)
    ]


def where(
    table: str, filt: SnapshotFilter, key_range: KeyRange | None = None
) -> tuple[sql.Composable, list[Any]]:
    conds: list[sql.Composable] = []
    params: list[Any] = []
    if filt.user_ids is not None:
        if table == "sessions":
            conds.append(sql.SQL("user_id = ANY(%s)"))
        else:
            conds.append(sql.SQL("session_id IN (SELECT id FROM sessions WHERE user_id = ANY(%s))"))
        params.append(list(filt.user_ids))
    if filt.created_from is not None:
        conds.append(sql.SQL("created_at >= %s"))
        params.append(filt.created_from)
    if filt.created_to is not None:
        conds.append(sql.SQL("created_at < %s"))
        params.append(filt.created_to)
    if key_range is not None and key_range.lo is not None:
        conds.append(sql.SQL("id >= %s"))
        params.append(key_range.lo)
    if key_range is not None and key_range.hi is not None:
        conds.append(sql.SQL("id < %s"))
        params.append(key_range.hi)
    clause = sql.SQL(" AND ").join(conds) if conds else sql.SQL("TRUE")
    return clause, params


# --------------------------------------------------------------------------------------------
# The manifest


@dataclass
class ChunkFile:
    id: str
    table: str
    index: int
    lo: str | None
    hi: str | None
    rows: int
    file: str
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class Manifest:
    snapshot_id: str
    snapshot_time: str
    wal_lsn: str
    slot: dict[str, Any]
    filter: dict[str, Any]
    read_models: list[str]
    chunk_size: int
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # table -> {rows}
    chunks: list[ChunkFile] = field(default_factory=list)
    seconds: float = 0.0
    format: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    def write(self, directory: Path) -> Path:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, directory / MANIFEST)  # atomic: a manifest means a complete snapshot
        return directory / MANIFEST

    @classmethod
    def read(cls, directory: Path | str) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ConfigurationError(
                f"{directory} is not a complete snapshot (no {MANIFEST}); "
                f"a snapshot interrupted before its manifest cannot be "
                f"resumed: take a new one"
            )
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigurationError(
                f"{path} is not a readable snapshot manifest ({exc}): take a new snapshot"
            ) from None
        if not isinstance(d, dict):
            raise ConfigurationError(
                f"{path} is not a snapshot manifest: a JSON object was "
                f"expected, got {type(d).__name__}"
            )
        if d.get("format") != FORMAT_VERSION:
            raise ConfigurationError(
                f"{path}: snapshot format {d.get('format')} is not {FORMAT_VERSION}"
            )
        try:
            d["chunks"] = [ChunkFile(**c) for c in d["chunks"]]
            manifest = cls(**d)
            datetime.fromisoformat(manifest.snapshot_time)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{path} is not a complete snapshot manifest (missing or "
                f"malformed field: {exc!r}): take a new snapshot"
            ) from None
        return manifest

    @property
    def taken_at(self) -> datetime:
        return datetime.fromisoformat(self.snapshot_time)


# --------------------------------------------------------------------------------------------
# The gap rule


def check_cdc_slot(slot: Mapping[str, Any], slot_name: str) -> None:
    """Refuse a snapshot the CDC slot would not continue from (docs/architecture.md, "The gap
    rule")."""
    if not slot.get("exists"):
        raise ConfigurationError(
            f"the CDC replication slot {slot_name!r} does not exist: changes committed after "
            f"this snapshot would reach neither the snapshot nor CDC (a silent gap in the read "
            f"models). Create it first (`python -m flows.setup` registers the connector), or "
            f"pass no_cdc=True if CDC is deliberately not running and you accept the gap."
        )
    if not slot.get("active"):
        raise ConfigurationError(
            f"the CDC replication slot {slot_name!r} exists but no connector is streaming from "
            f"it: changes after the snapshot are retained but not applied, and the read models "
            f"will stay stale until CDC runs. Start the Debezium connector, or pass no_cdc=True."
        )


def check_snapshot_age(
    taken_at: datetime,
    gc_grace_s: Mapping[str, int],
    *,
    now: datetime | None = None,
    allow: bool = False,
) -> None:
    """Refuse to load a snapshot older than the target tables' ``gc_grace_seconds``.

    A row deleted after the snapshot is kept out of the read model only by its tombstone,
    whose timestamp beats the snapshot row's. Compaction may purge a tombstone once it is
    gc_grace_seconds old, and then loading the snapshot brings the deleted row back.
    """
    if allow or not gc_grace_s:
        return
    age = ((now or datetime.now(UTC)) - taken_at).total_seconds()
    table, grace = min(gc_grace_s.items(), key=lambda kv: kv[1])
    if age > grace:
        raise ConfigurationError(
            f"the snapshot taken at {taken_at.isoformat()} is {age:,.0f} s old, older than "
            f"gc_grace_seconds of {table} ({grace:,} s): tombstones of rows deleted since may "
            f"have been purged, and loading it would bring those rows back. Take a new "
            f"snapshot, or pass allow_old_snapshot=True if no row was deleted since."
        )


# --------------------------------------------------------------------------------------------
# Reading


class _UuidBytesLoader(Loader):
    """uuid as its 16 raw bytes: what Arrow stores; skips building uuid.UUID objects."""

    format = Format.BINARY

    def load(self, data: Any) -> bytes:
        return bytes(data)


class _TimestamptzMicrosLoader(Loader):
    """timestamptz as µs since the Unix epoch: Arrow's timestamp[us] storage, exact."""

    format = Format.BINARY

    def load(self, data: Any) -> int:
        return int.from_bytes(data, "big", signed=True) + _PG_EPOCH_US


def _select(table: str, clause: sql.Composable) -> sql.Composed:
    cols = [
        sql.SQL("{}::text AS {}").format(sql.Identifier(c), sql.Identifier(c))
        if typ == "jsonb"
        else sql.Identifier(c)
        for c, typ in COLUMNS[table].items()
    ]
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(cols), sql.Identifier(table), clause
    )


def _to_batch(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for values, f in zip(zip(*rows, strict=True), schema, strict=True):
        if isinstance(f.type, pa.ExtensionType):
            arrays.append(
                pa.ExtensionArray.from_storage(f.type, pa.array(values, f.type.storage_type))
            )
        else:
            arrays.append(pa.array(values, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _import_snapshot(snapshot_name: str, settings: PostgresSettings) -> psycopg.Connection:
    conn = postgres.connect("reader", settings)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.adapters.register_loader("uuid", _UuidBytesLoader)
    conn.adapters.register_loader("timestamptz", _TimestamptzMicrosLoader)
    # First statement of the transaction (psycopg sends BEGIN ... before it).
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
    return conn


def read_chunk(
    conn: psycopg.Connection,
    chunk: ChunkPlan,
    filt: SnapshotFilter,
    directory: Path,
    batch_rows: int,
) -> ChunkFile:
    """Stream one chunk through a server-side cursor into its Parquet file."""
    started = time.monotonic()
    schema = arrow_schema(chunk.table)
    clause, params = where(chunk.table, filt, chunk.key_range)
    rel = Path(chunk.table) / f"{chunk.index:05d}.parquet"
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    rows = 0
    with (
        conn.cursor(name=f"bf_{chunk.table}_{chunk.index}", binary=True) as cur,
        pq.ParquetWriter(tmp, schema, compression="zstd") as out,
    ):
        cur.itersize = batch_rows
        cur.execute(_select(chunk.table, clause), params)
        while batch := cur.fetchmany(batch_rows):
            out.write_batch(_to_batch(batch, schema))
            rows += len(batch)
    if rows != chunk.rows:
        # Planned and read in the same snapshot: a difference means the snapshot is not what
        # we think it is; loading it would be wrong in ways nothing downstream would notice.
        raise TerminalError(
            f"{chunk.id}: read {rows} rows, planned {chunk.rows} in the same snapshot"
        )
    os.replace(tmp, path)
    kr = chunk.key_range
    return ChunkFile(
        chunk.id,
        chunk.table,
        chunk.index,
        str(kr.lo) if kr.lo else None,
        str(kr.hi) if kr.hi else None,
        rows,
        str(rel),
        path.stat().st_size,
        round(time.monotonic() - started, 3),
    )


def _plan(
    conn: psycopg.Connection, tables: Sequence[str], filt: SnapshotFilter, chunk_size: int
) -> list[ChunkPlan]:
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


@dataclass(frozen=True)
class SnapshotProgress:
    chunks_done: int
    chunks_total: int
    rows_done: int
    rows_total: int
    elapsed_s: float


def take_snapshot(
    root: Path | str,
    read_models: Collection[str] = READ_MODELS,
    *,
    filt: SnapshotFilter | None = None,
    chunk_size: int = 50_000,
    readers: int = 4,
    require_slot: bool = True,
    dry_run: bool = False,
    batch_rows: int = 5_000,
    on_progress: Callable[[SnapshotProgress], None] | None = None,
    settings: PostgresSettings | None = None,
) -> tuple[Manifest, Path | None]:
    """Snapshot the tables feeding ``read_models``. Returns the manifest and the snapshot's
    folder (``root/<snapshot_id>``), or with ``dry_run`` the plan (chunks with their row
    counts, read in the same consistent snapshot) and no folder, having written nothing."""
    cfg = settings or get_settings().postgres
    filt = filt or SnapshotFilter()
    tables = tables_for(read_models)
    started = time.monotonic()
    coord = postgres.connect("reader", cfg)
    directory: Path | None = None
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
            (cfg.slot_name,),
        ).fetchone()
        slot = {
            "name": cfg.slot_name,
            "exists": slot_row is not None,
            "active": bool(slot_row and slot_row[0]),
            "confirmed_flush_lsn": slot_row[1] if slot_row else None,
            "wal_status": slot_row[2] if slot_row else None,
        }
        if require_slot:
            check_cdc_slot(slot, cfg.slot_name)
        plan = _plan(coord, tables, filt, chunk_size)
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
        manifest.chunks = _read_parallel(
            plan, snapshot_name, filt, directory, readers, batch_rows, cfg, on_progress, started
        )
        manifest.seconds = round(time.monotonic() - started, 3)
        manifest.write(directory)
        return manifest, directory
    except BaseException as exc:
        if directory is not None:  # no manifest, no use: do not leave half a snapshot behind
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(exc, psycopg.OperationalError):
            raise ServiceUnavailable("PostgreSQL", f"snapshot failed: {exc}") from exc
        raise
    finally:
        coord.close()  # ends the exporting transaction once every reader is done


def _read_parallel(
    plan: list[ChunkPlan],
    snapshot_name: str,
    filt: SnapshotFilter,
    directory: Path,
    readers: int,
    batch_rows: int,
    cfg: PostgresSettings,
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

    def worker() -> None:
        try:
            with _import_snapshot(snapshot_name, cfg) as conn:
                while not stop.is_set():
                    try:
                        chunk = todo.get_nowait()
                    except queue.Empty:
                        return
                    results.put(read_chunk(conn, chunk, filt, directory, batch_rows))
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            results.put(exc)

    threads = [
        threading.Thread(target=worker, name=f"snapshot-reader-{i}", daemon=True)
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
