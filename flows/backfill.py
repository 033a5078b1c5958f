"""The backfill flow: a consistent Postgres snapshot (Parquet files) projected and bulk-loaded
into the Scylla read models; resumable, rate-limited, safe alongside CDC.

    python -m flows.backfill --help
    python -m flows.backfill --user-ids 5b0c...  --rate-limit-rows-per-s 5000
    python -m flows.backfill --resume                      # after a crash: finish the load
    python -m flows.backfill --snapshot-dir snapshots/<id> # load an existing snapshot again

Stages: check the CDC slot (the gap rule) → [rebuild: truncate] → snapshot → load. Progress and
a summary are published as Prefect artifacts.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from tasks.adapters import postgres, scylla
from tasks.adapters import sstable as sstable_load
from tasks.adapters.kafka_connect import KafkaConnectClient
from tasks.backfill.load import (
    Checkpoints,
    LoadProgress,
    LoadResult,
    load_snapshot,
    truncate_read_models,
)
from tasks.backfill.params import BackfillParams, validate
from tasks.backfill.snapshot import (
    Manifest,
    SnapshotProgress,
    check_cdc_slot,
    check_snapshot_age,
    tables_for,
    take_snapshot,
)
from tasks.core.errors import (
    ConfigurationError,
    CqrsSyncError,
    retry_if_transient,
)
from tasks.settings import get_settings

# --------------------------------------------------------------------------------------------
# Progress in the Prefect UI


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Reporter:
    """One progress artifact per stage, updated as chunks finish, and a markdown table with
    rows done, rows/s and ETA. API calls are throttled: a backfill of 10,000 chunks must not
    make 20,000 of them."""

    def __init__(self, stage: str, min_interval_s: float = 2.0) -> None:
        self.stage = stage
        self.min_interval_s = min_interval_s
        self._last = 0.0
        # Called from sync code, Prefect's dual sync/async API returns the id itself.
        self._artifact = cast(
            uuid.UUID,
            create_progress_artifact(
                0.0, key=f"backfill-{stage}-progress", description=f"backfill {stage}: % of rows"
            ),
        )

    def __call__(self, p: SnapshotProgress | LoadProgress, final: bool = False) -> None:
        now = time.monotonic()
        final = final or p.chunks_done >= p.chunks_total  # the last one always goes out
        if not final and now - self._last < self.min_interval_s:
            return
        self._last = now
        pct = 100.0 * p.rows_done / p.rows_total if p.rows_total else 100.0
        update_progress_artifact(self._artifact, pct)
        rate = p.rows_done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        eta: float | None = (p.rows_total - p.rows_done) / rate if rate > 0 else None
        lines = [
            f"## Backfill {self.stage}",
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
            f"| elapsed | {_duration(p.elapsed_s)} |",
            f"| ETA | {_duration(eta) if not final else 'done'} |",
        ]
        create_markdown_artifact(
            "\n".join(lines),
            key="backfill-progress",
            description=f"backfill {self.stage}: rows, rate, ETA",
        )

    def finish(self) -> None:
        """For a stage with no chunk at all (nothing matched the filters)."""
        update_progress_artifact(self._artifact, 100.0)


def summary_rows(manifest: Manifest, result: LoadResult | None) -> list[dict[str, Any]]:
    """One row per (source table, read model): the end-of-run table artifact."""
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


# --------------------------------------------------------------------------------------------
# Tasks: thin wrappers over tasks.backfill.snapshot / tasks.backfill.load


def _debezium_lsn(log: Any) -> int | None:
    settings = get_settings().kafka
    try:
        return KafkaConnectClient(settings.connect_url).source_lsn(settings.connector_name)
    except CqrsSyncError as exc:
        log.warning("cannot read Debezium's offset: %s", exc)
        return None


@task(cache_policy=NONE)
def check_gap(p: BackfillParams, manifest: Manifest | None) -> dict[str, Any]:
    """CDC must cover every change after the snapshot (docs/architecture.md, "The gap rule")."""
    log = get_run_logger()
    slot = postgres.slot_status()
    state = {
        "name": slot.name,
        "exists": slot.exists,
        "active": slot.active,
        "confirmed_flush_lsn": slot.confirmed_flush_lsn,
    }
    if p.no_cdc:
        log.warning(
            "no_cdc: the CDC slot is not checked (%s); changes committed after the "
            "snapshot reach the read models only if something else applies them",
            state,
        )
        return state
    check_cdc_slot(state, slot.name)
    gap = postgres.slot_gap(slot, _debezium_lsn(log))
    if manifest is None:
        if slot.wal_status == "lost":
            # CDC cannot stream from this slot at all: nothing would carry later changes.
            raise ConfigurationError(
                f"{gap}: CDC cannot continue from it. Recreate the slot (drop it, then run "
                f"python -m flows.setup), then run this backfill; it covers what was missed."
            )
        if gap:  # a new snapshot holds every change up to now: it is what covers such a gap
            log.warning("%s; the new snapshot covers the changes missed so far", gap)
    else:
        if not manifest.slot.get("exists"):
            raise ConfigurationError(
                f"snapshot {manifest.snapshot_id} was taken without a CDC slot: changes "
                f"between it and the slot's creation are in neither. Take a new snapshot, or "
                f"pass no_cdc=True."
            )
        if gap:
            raise ConfigurationError(
                f"{gap}: snapshot {manifest.snapshot_id} predates that, so changes between "
                f"it and the slot's recreation are in neither. Take a new snapshot, or pass "
                f"no_cdc=True."
            )
        recorded = manifest.slot.get("confirmed_flush_lsn")
        if (
            recorded
            and slot.confirmed_flush_lsn
            and postgres.lsn_to_int(slot.confirmed_flush_lsn) < postgres.lsn_to_int(recorded)
        ):
            # A slot's confirmed position never moves back: this is another slot (dropped and
            # recreated, or a restored database), which does not continue from the snapshot.
            raise ConfigurationError(
                f"replication slot {slot.name!r} is at {slot.confirmed_flush_lsn}, behind the "
                f"{recorded} it had confirmed when snapshot {manifest.snapshot_id} was taken: "
                f"it is not the slot the snapshot was taken against, and changes since the "
                f"snapshot may be in neither. Take a new snapshot, or pass no_cdc=True."
            )
    log.info(
        "CDC slot %s is active (confirmed flush LSN %s): no gap after the snapshot",
        slot.name,
        slot.confirmed_flush_lsn,
    )
    return state


def gc_grace_seconds(keyspace: str, read_models: Sequence[str]) -> dict[str, int]:
    """gc_grace_seconds of each read-model table, as the target cluster's schema has it."""
    session = scylla.connect()
    try:
        rows = session.execute(
            "SELECT table_name, gc_grace_seconds FROM system_schema.tables "
            "WHERE keyspace_name = %s",
            (keyspace,),
        )
        found = {r.table_name: int(r.gc_grace_seconds) for r in rows}
    finally:
        scylla.close(session)
    if missing := [rm for rm in read_models if rm not in found]:
        raise ConfigurationError(
            f"keyspace {keyspace!r} has no table(s) {missing}: apply the "
            f"schema first (`python -m flows.setup`)"
        )
    return {rm: found[rm] for rm in read_models}


@task(cache_policy=NONE)
def check_snapshot_fresh(p: BackfillParams, manifest: Manifest) -> None:
    """An existing snapshot is loaded only while the tombstones it could undo still exist."""
    keyspace = p.keyspace or get_settings().scylla.keyspace
    grace = gc_grace_seconds(keyspace, p.read_models)
    if p.allow_old_snapshot:
        get_run_logger().warning(
            "allow_old_snapshot: snapshot %s (taken %s) is loaded whatever "
            "its age; gc_grace_seconds %s",
            manifest.snapshot_id,
            manifest.snapshot_time,
            grace,
        )
    check_snapshot_age(manifest.taken_at, grace, allow=p.allow_old_snapshot)


@task(cache_policy=NONE)
def check_sstable_method(p: BackfillParams) -> None:
    """The sstable method needs Java 17 and the cassandra-all jars here, and an Apache
    Cassandra 4+ cluster there: checked before the snapshot, not after it."""
    sstable_load.check_available()
    session = scylla.connect()
    try:
        get_run_logger().info("sstable load method: %s", sstable_load.check_target(session))
    finally:
        scylla.close(session)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def snapshot_stage(p: BackfillParams, dry_run: bool = False) -> tuple[Manifest, Path | None]:
    reporter = None if dry_run else Reporter("snapshot")
    manifest, directory = take_snapshot(
        p.snapshot_root,
        p.read_models,
        filt=p.filter,
        chunk_size=p.chunk_size,
        readers=p.readers,
        require_slot=not p.no_cdc,
        dry_run=dry_run,
        on_progress=reporter,
    )
    if reporter is not None and not manifest.chunks:
        reporter.finish()
    if directory is not None:
        get_run_logger().info(
            "snapshot %s: %d rows in %d chunks, %.1f s (%.0f rows/s), WAL %s, slot flush LSN %s",
            manifest.snapshot_id,
            manifest.rows,
            len(manifest.chunks),
            manifest.seconds,
            manifest.rows / max(manifest.seconds, 1e-9),
            manifest.wal_lsn,
            manifest.slot.get("confirmed_flush_lsn"),
        )
    return manifest, directory


@task(cache_policy=NONE)
def truncate_stage(p: BackfillParams) -> None:
    session = scylla.connect()
    try:
        truncate_read_models(session, p.read_models, p.keyspace)
    finally:
        scylla.close(session)


@task(cache_policy=NONE, retries=3, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def load_stage(p: BackfillParams, directory: Path) -> LoadResult:
    # A retry after a transient failure resumes: the chunks it finished are checkpointed.
    resume = p.resume or (task_run.run_count or 1) > 1
    reporter = Reporter("load")
    session = scylla.connect()
    try:
        result = load_snapshot(
            directory,
            session,
            read_models=p.read_models,
            keyspace=p.keyspace,
            concurrency=p.concurrency,
            rate_limit_rows_per_s=p.rate_limit_rows_per_s,
            resume=resume,
            write_batch_rows=p.write_batch_rows,
            workers=p.workers,
            method=p.method,
            on_progress=reporter,
        )
    finally:
        scylla.close(session)
    if not result.chunks_loaded and not result.chunks_skipped:
        reporter.finish()
    get_run_logger().info(
        "loaded %d rows as %d read-model rows in %.1f s (%.0f rows/s); %d "
        "chunks loaded, %d skipped by resume",
        result.rows_read,
        result.rows_written,
        result.seconds,
        result.rows_per_s,
        len(result.chunks_loaded),
        len(result.chunks_skipped),
    )
    return result


def _plan_markdown(p: BackfillParams, manifest: Manifest, loaded: dict[str, Any]) -> str:
    lines = [
        "## Backfill plan (dry run)",
        "",
        f"read models: {', '.join(p.read_models)}; keyspace: {p.keyspace or 'default'}; "
        f"rebuild (truncate first): {p.rebuild}",
        "",
        "| table | rows | chunks | already loaded (resume) |",
        "|---|---|---|---|",
    ]
    for table in tables_for(p.read_models):
        chunks = [c for c in manifest.chunks if c.table == table]
        lines.append(
            f"| {table} | {manifest.tables.get(table, {}).get('rows', 0):,} | "
            f"{len(chunks)} | {sum(1 for c in chunks if c.id in loaded)} |"
        )
    return "\n".join(lines)


def find_resumable(p: BackfillParams) -> Path | None:
    """The newest complete snapshot under snapshot_root taken with the same filter and for
    (at least) the same read models: what a crashed run with these parameters left."""
    root = Path(p.snapshot_root)
    if not root.is_dir():
        return None
    for d in sorted((x for x in root.iterdir() if (x / "manifest.json").is_file()), reverse=True):
        m = Manifest.read(d)
        if m.filter == p.filter.to_json() and set(p.read_models) <= set(m.read_models):
            return d
    return None


# --------------------------------------------------------------------------------------------
# The flow


@flow(name="backfill", validate_parameters=False)  # BackfillParams validates, with clear messages
def backfill_flow(
    read_models: list[str] | None = None,
    user_ids: list[str] | None = None,
    created_from: datetime | str | None = None,
    created_to: datetime | str | None = None,
    chunk_size: int = 50_000,
    concurrency: int = 64,
    write_batch_rows: int = 20,
    workers: int = 1,
    method: str = "cql",
    readers: int = 4,
    rate_limit_rows_per_s: float | None = None,
    resume: bool = False,
    dry_run: bool = False,
    rebuild: bool = False,
    no_cdc: bool = False,
    allow_old_snapshot: bool = False,
    snapshot_dir: str | None = None,
    snapshot_root: str = "snapshots",
    keyspace: str | None = None,
) -> dict[str, Any]:
    # First statement: every parameter is validated before anything is read or written.
    p = validate(dict(locals()))
    log = get_run_logger()
    directory = Path(p.snapshot_dir) if p.snapshot_dir else None
    if directory is None and p.resume:
        directory = find_resumable(p)
        if directory is None:
            log.warning(
                "resume: no complete snapshot under %s matches these parameters; taking a new one",
                p.snapshot_root,
            )
        else:
            log.info("resume: continuing snapshot %s", directory)
    manifest = Manifest.read(directory) if directory else None
    if p.method == "sstable" and not p.dry_run:
        check_sstable_method(p)
    check_gap(p, manifest)
    if manifest is not None and not p.dry_run:
        check_snapshot_fresh(p, manifest)

    if p.dry_run:
        if manifest is None:
            manifest, _ = snapshot_stage(p, dry_run=True)
        session = scylla.connect()
        try:
            loaded = Checkpoints(session, p.keyspace).loaded(manifest.snapshot_id, p.read_models)
        finally:
            scylla.close(session)
        create_markdown_artifact(_plan_markdown(p, manifest, loaded), key="backfill-plan")
        plan = {
            t: {
                "rows": manifest.tables.get(t, {}).get("rows", 0),
                "chunks": sum(1 for c in manifest.chunks if c.table == t),
            }
            for t in tables_for(p.read_models)
        }
        log.info("dry run: %s", plan)
        return {
            "dry_run": True,
            "snapshot_id": manifest.snapshot_id,
            "tables": plan,
            "chunks_already_loaded": len(loaded),
            "rebuild": p.rebuild,
        }

    if p.rebuild:
        # TRUNCATE, then snapshot, then load, while CDC keeps writing:
        # - a CDC write that lands after the truncate, before or during the load, is either a
        #   change newer than the snapshot (its version, the write timestamp, beats the
        #   snapshot row's) or an old change the snapshot already holds (same or older
        #   version: the snapshot row wins or ties with the same cells). A CDC delete leaves a
        #   tombstone stamped with the deleted row's version + 1 µs, newer than any version
        #   of that row a snapshot can hold, so the load cannot resurrect the row. TRUNCATE
        #   itself is not a timestamped deletion: later writes with older timestamps are
        #   kept, which is what we need.
        # - a CDC write applied BEFORE the truncate is wiped by it; that is only safe because
        #   the snapshot is taken after the truncate, so it holds every change committed up
        #   to then. Truncating and then loading an OLDER snapshot would lose the changes CDC
        #   applied in between: BackfillParams refuses rebuild with snapshot_dir.
        # - between the truncate and the load, readers see empty or partial read models: a
        #   rebuild is an outage of those tables, to schedule as one.
        log.warning(
            "rebuild: truncating %s in keyspace %s",
            list(p.read_models),
            p.keyspace or get_settings().scylla.keyspace,
        )
        truncate_stage(p)

    if directory is None:
        manifest, directory = snapshot_stage(p)
    assert manifest is not None and directory is not None
    result = load_stage(p, directory)
    summary = summary_rows(manifest, result)
    create_table_artifact(
        summary, key="backfill-summary", description=f"backfill of snapshot {manifest.snapshot_id}"
    )
    return {
        "dry_run": False,
        "snapshot_id": manifest.snapshot_id,
        "snapshot_dir": str(directory),
        "snapshot_rows": manifest.rows,
        "snapshot_seconds": manifest.seconds,
        "rows_read": result.rows_read,
        "rows_written": result.rows_written,
        "load_seconds": round(result.seconds, 3),
        "load_rows_per_s": round(result.rows_per_s, 1),
        "chunks_loaded": result.chunks_loaded,
        "chunks_skipped": result.chunks_skipped,
        "pairs": [asdict(x) for x in result.pairs],
    }


# --------------------------------------------------------------------------------------------
# Command line: the options are generated from BackfillParams, so --help lists exactly the
# flow's parameters with the same descriptions.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, info in BackfillParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.get_default()
        if default is False:
            parser.add_argument(flag, dest=name, action="store_true", help=info.description)
        elif name in ("read_models", "user_ids"):
            parser.add_argument(
                flag, dest=name, nargs="+", metavar=name.upper()[:-1], help=info.description
            )
        else:
            # Strings all the way: BackfillParams parses them, with the same messages as in
            # the UI.
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(flag, dest=name, help=f"{info.description}{shown}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    try:
        validate(args)  # fail here, before a flow run is even created
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = backfill_flow(**args)
    print({k: v for k, v in result.items() if k != "pairs"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
