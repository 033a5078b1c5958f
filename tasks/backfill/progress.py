"""What a backfill reports (pure): progress as markdown, the dry run's plan, the end-of-run
summary. The flow publishes them as Prefect artifacts."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from tasks.backfill.load import LoadProgress, LoadResult
from tasks.backfill.manifest import Manifest
from tasks.backfill.plan import tables_for
from tasks.backfill.snapshot import SnapshotProgress


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def percent_done(p: SnapshotProgress | LoadProgress) -> float:
    return 100.0 * p.rows_done / p.rows_total if p.rows_total else 100.0


def progress_markdown(stage: str, p: SnapshotProgress | LoadProgress, final: bool) -> str:
    """A table of chunks and rows done, rows/s and ETA of one stage."""
    pct = percent_done(p)
    rate = p.rows_done / p.elapsed_s if p.elapsed_s > 0 else 0.0
    eta: float | None = (p.rows_total - p.rows_done) / rate if rate > 0 else None
    lines = [
        f"## Backfill {stage}",
        "",
        "| | |",
        "|---|---|",
        f"| chunks | {p.chunks_done:,} / {p.chunks_total:,} |",
        f"| source rows | {p.rows_done:,} / {p.rows_total:,} ({pct:.1f} %) |",
    ]
    if isinstance(p, LoadProgress):
        rate, eta = p.rows_per_s, p.eta_s  # rows read in this run: skipped chunks are free
        lines.append(f"| read-model rows written | {p.rows_written:,} |")
    lines += [
        f"| rows/s | {rate:,.0f} |",
        f"| elapsed | {duration(p.elapsed_s)} |",
        f"| ETA | {duration(eta) if not final else 'done'} |",
    ]
    return "\n".join(lines)


def planned_tables(manifest: Manifest, read_models: Collection[str]) -> dict[str, dict[str, int]]:
    """table -> {rows, chunks} of the snapshot (or plan) for these read models."""
    return {
        t: {
            "rows": manifest.tables.get(t, {}).get("rows", 0),
            "chunks": sum(1 for c in manifest.chunks if c.table == t),
        }
        for t in tables_for(read_models)
    }


def plan_markdown(
    manifest: Manifest,
    read_models: Collection[str],
    keyspace: str | None,
    rebuild: bool,
    loaded: Mapping[str, Any],
) -> str:
    """The dry run's plan: rows and chunks per table, and chunks already loaded."""
    lines = [
        "## Backfill plan (dry run)",
        "",
        f"read models: {', '.join(read_models)}; keyspace: {keyspace or 'default'}; "
        f"rebuild (truncate first): {rebuild}",
        "",
        "| table | rows | chunks | already loaded (resume) |",
        "|---|---|---|---|",
    ]
    for table in tables_for(read_models):
        chunks = [c for c in manifest.chunks if c.table == table]
        lines.append(
            f"| {table} | {manifest.tables.get(table, {}).get('rows', 0):,} | "
            f"{len(chunks)} | {sum(1 for c in chunks if c.id in loaded)} |"
        )
    return "\n".join(lines)


def summary_rows(manifest: Manifest, result: LoadResult | None) -> list[dict[str, Any]]:
    """One row per (source table, read model): the end-of-run table."""
    rows = []
    for p in result.pairs if result else []:
        rows.append(
            {
                "table": p.table,
                "read_model": p.read_model,
                "rows_read": p.rows_read,
                "rows_written": p.rows_written,
                "duration_s": round(p.seconds, 2),
                "rows_per_s": round(p.rows_per_s),
                "chunks_loaded": p.chunks,
                "chunks_skipped_by_resume": p.chunks_skipped,
                "snapshot_rows": manifest.tables.get(p.table, {}).get("rows"),
            }
        )
    return rows
