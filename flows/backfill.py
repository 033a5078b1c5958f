"""The backfill flow: a consistent Postgres snapshot (Parquet files) projected and bulk-loaded
into the Scylla read models; resumable, rate-limited, safe alongside CDC.

    python -m flows.backfill --help
    python -m flows.backfill --user-ids 5b0c...  --rate-limit-rows-per-s 5000
    python -m flows.backfill --resume                      # after a crash: finish the load
    python -m flows.backfill --snapshot-dir snapshots/<id> # load an existing snapshot again

Stages: check the CDC slot (the gap rule) → [rebuild: truncate the read models] → take a
snapshot → load it. Progress and a summary are published as Prefect artifacts.
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

from flows.cli import documented, run_cli
from tasks.adapters import postgres, scylla, sstable_setup
from tasks.adapters.kafka_connect import KafkaConnectClient
from tasks.backfill import checkpoints, load, progress, safety, snapshot
from tasks.backfill.load import LoadProgress, LoadResult
from tasks.backfill.manifest import Manifest, find_resumable
from tasks.backfill.params import BackfillParams, validate
from tasks.backfill.snapshot import SnapshotProgress
from tasks.core.errors import CqrsSyncError, retry_if_transient
from tasks.settings import KafkaSettings, ScyllaSettings, Settings, get_settings


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
        update_progress_artifact(self._artifact, progress.percent_done(p))
        create_markdown_artifact(
            progress.progress_markdown(self.stage, p, final),
            key="backfill-progress",
            description=f"backfill {self.stage}: rows, rate, ETA",
        )

    def finish(self) -> None:
        """For a stage with no chunk at all (nothing matched the filters)."""
        update_progress_artifact(self._artifact, 100.0)


# --------------------------------------------------------------------------------------------
# Tasks: thin wrappers over tasks.backfill


def _debezium_lsn(settings: KafkaSettings) -> int | None:
    try:
        return KafkaConnectClient(settings.connect_url).source_lsn(settings.connector_name)
    except CqrsSyncError as exc:
        get_run_logger().warning("cannot read Debezium's offset: %s", exc)
        return None


@task(cache_policy=NONE)
def check_gap(p: BackfillParams, manifest: Manifest | None, cfg: Settings) -> dict[str, Any]:
    """CDC must cover every change after the snapshot (docs/architecture.md, "The gap rule")."""
    log = get_run_logger()
    slot = postgres.slot_status(cfg.postgres)
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
    safety.check_gap(slot, _debezium_lsn(cfg.kafka), manifest, log.warning)
    log.info(
        "CDC slot %s is active (confirmed flush LSN %s): no gap after the snapshot",
        slot.name,
        slot.confirmed_flush_lsn,
    )
    return state


@task(cache_policy=NONE)
def check_snapshot_fresh(p: BackfillParams, manifest: Manifest, cfg: ScyllaSettings) -> None:
    """An existing snapshot is loaded only while the tombstones it could undo still exist."""
    with scylla.session(cfg) as session:
        grace = safety.gc_grace_seconds(session, p.keyspace or cfg.keyspace, p.read_models)
    if p.allow_old_snapshot:
        get_run_logger().warning(
            "allow_old_snapshot: snapshot %s (taken %s) is loaded whatever "
            "its age; gc_grace_seconds %s",
            manifest.snapshot_id,
            manifest.snapshot_time,
            grace,
        )
    safety.check_snapshot_age(manifest.taken_at, grace, allow=p.allow_old_snapshot)


@task(cache_policy=NONE)
def check_sstable_method(cfg: Settings) -> None:
    """The sstable method needs Java 17 and the cassandra-all jars here, and an Apache
    Cassandra 4+ cluster there: checked before the snapshot, not after it."""
    sstable_setup.check_available(cfg.sstable)
    with scylla.session(cfg.scylla) as session:
        get_run_logger().info("sstable load method: %s", sstable_setup.check_target(session))


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def take_snapshot(
    p: BackfillParams, cfg: Settings, dry_run: bool = False
) -> tuple[Manifest, Path | None]:
    reporter = None if dry_run else Reporter("snapshot")
    manifest, directory = snapshot.take_snapshot(
        p.snapshot_root,
        p.read_models,
        settings=cfg.postgres,
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
def truncate_read_models(p: BackfillParams, cfg: ScyllaSettings) -> None:
    """Empty the chosen read models before a rebuild, while CDC keeps writing. Safe because
    the snapshot is taken after the truncate (docs/architecture.md):
    - a CDC write landing after the truncate is either newer than the snapshot (its version,
      the write timestamp, beats the snapshot row's) or an old change the snapshot holds too
      (same or older version). A CDC delete leaves a tombstone stamped with the deleted row's
      version + 1 µs, newer than any version a snapshot can hold, so the load cannot
      resurrect the row. TRUNCATE is not a timestamped deletion: later writes with older
      timestamps are kept, which is what we need.
    - a CDC write applied BEFORE the truncate is wiped by it; the snapshot, taken after,
      holds that change. Loading an OLDER snapshot would lose it: BackfillParams refuses
      rebuild with snapshot_dir.
    - until the load ends, readers see empty or partial read models: a rebuild is an outage
      of those tables, to schedule as one."""
    get_run_logger().warning(
        "rebuild: truncating %s in keyspace %s", list(p.read_models), p.keyspace or cfg.keyspace
    )
    with scylla.session(cfg) as session:
        checkpoints.truncate_read_models(session, cfg, p.read_models, p.keyspace)


@task(cache_policy=NONE, retries=3, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def load_snapshot(p: BackfillParams, directory: Path, cfg: Settings) -> LoadResult:
    # A retry after a transient failure resumes: the chunks it finished are checkpointed.
    resume = p.resume or (task_run.run_count or 1) > 1
    reporter = Reporter("load")
    with scylla.session(cfg.scylla) as session:
        result = load.load_snapshot(
            directory,
            session,
            cfg.scylla,
            sstable=cfg.sstable,
            read_models=p.read_models,
            keyspace=p.keyspace,
            concurrency=p.concurrency,
            rate_limit_rows_per_s=p.rate_limit_rows_per_s,
            resume=resume,
            replica_batch_rows=p.write_batch_rows,
            workers=p.workers,
            method=p.method,
            on_progress=reporter,
        )
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


def plan_backfill(p: BackfillParams, manifest: Manifest | None, cfg: Settings) -> dict[str, Any]:
    """The dry run: the plan of a new snapshot (or the given one) and what is loaded already."""
    if manifest is None:
        manifest, _ = take_snapshot(p, cfg, dry_run=True)
    with scylla.session(cfg.scylla) as session:
        loaded = checkpoints.Checkpoints(session, cfg.scylla, p.keyspace).loaded(
            manifest.snapshot_id, p.read_models
        )
    create_markdown_artifact(
        progress.plan_markdown(manifest, p.read_models, p.keyspace, p.rebuild, loaded),
        key="backfill-plan",
    )
    plan = progress.planned_tables(manifest, p.read_models)
    get_run_logger().info("dry run: %s", plan)
    return {
        "dry_run": True,
        "snapshot_id": manifest.snapshot_id,
        "tables": plan,
        "chunks_already_loaded": len(loaded),
        "rebuild": p.rebuild,
    }


def snapshot_to_resume(p: BackfillParams) -> Path | None:
    """The snapshot this run loads instead of taking one: snapshot_dir, or with resume the
    newest one under snapshot_root matching the parameters."""
    if p.snapshot_dir:
        return Path(p.snapshot_dir)
    if not p.resume:
        return None
    log = get_run_logger()
    directory = find_resumable(p.snapshot_root, p.filter, p.read_models)
    if directory is None:
        log.warning(
            "resume: no complete snapshot under %s matches these parameters; taking a new one",
            p.snapshot_root,
        )
    else:
        log.info("resume: continuing snapshot %s", directory)
    return directory


# --------------------------------------------------------------------------------------------
# The flow


@flow(name="backfill", validate_parameters=False)  # BackfillParams validates, with clear messages
@documented(BackfillParams)
def backfill_flow(
    read_models: list[str] | None = None,
    user_ids: list[str] | None = None,
    created_from: datetime | str | None = None,
    created_to: datetime | str | None = None,
    chunk_size: int = 50_000,
    concurrency: int = 64,
    write_batch_rows: int | None = None,
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
    """Ad-hoc backfill: a consistent Postgres snapshot, projected and bulk-loaded."""
    # First statement: every parameter is validated before anything is read or written.
    p = validate(dict(locals()))
    cfg = get_settings()
    directory = snapshot_to_resume(p)
    manifest = Manifest.read(directory) if directory else None
    if p.method == "sstable" and not p.dry_run:
        check_sstable_method(cfg)
    check_gap(p, manifest, cfg)
    if manifest is not None and not p.dry_run:
        check_snapshot_fresh(p, manifest, cfg.scylla)
    if p.dry_run:
        return plan_backfill(p, manifest, cfg)

    if p.rebuild:
        truncate_read_models(p, cfg.scylla)
    if directory is None:
        manifest, directory = take_snapshot(p, cfg)
    assert manifest is not None and directory is not None
    result = load_snapshot(p, directory, cfg)
    create_table_artifact(
        progress.summary_rows(manifest, result),
        key="backfill-summary",
        description=f"backfill of snapshot {manifest.snapshot_id}",
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


def _run(args: dict[str, Any]) -> int:
    result = backfill_flow(**args)
    print({k: v for k, v in result.items() if k != "pairs"})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, validate, _run)


if __name__ == "__main__":
    sys.exit(main())
