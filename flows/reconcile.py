"""The reconcile flow: repair the read models where they differ from what Postgres implies,
safely while CDC and dual-writes run (docs/decisions.md, "Reconcile gives a shadowed row a new
version").

    python -m flows.reconcile --help
    python -m flows.reconcile --audit-run <run id>          # what an audit found
    python -m flows.reconcile --partitions sessions_by_id:5b0c...
    python -m flows.reconcile --read-models steps_by_turn --dry-run

Each difference is read again first, then repaired through the projection module with the
source row's version: missing and stale rows rewritten, extra rows deleted, rows a newer
write shadows given a new source version. The run reports exactly what it changed (a table
artifact) and fails if anything still differs afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from flows.cli import documented, parser_from_model, run_cli
from tasks.adapters import postgres, scylla
from tasks.audit.diff import Difference, audit_read_model
from tasks.audit.params import ReconcileParams, validate_reconcile
from tasks.audit.reconcile import Action, ReconcileResult, reconcile, reconcile_partitions
from tasks.audit.report import load_differences
from tasks.core.errors import TerminalError, retry_if_transient
from tasks.settings import Settings, get_settings

MAX_ROWS_SHOWN = 500  # rows of the repairs table artifact


class ReconcileIncomplete(TerminalError):
    """Some differences remain after the repair."""


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NONE)
def find_differences(read_model: str, cfg: Settings) -> list[Difference]:
    """A whole read model diffed now (the audit's diff, without the expectation suites)."""
    with (
        postgres.connect("reader", cfg.postgres, autocommit=True) as conn,
        scylla.session(cfg.scylla) as session,
    ):
        found = audit_read_model(
            conn,
            session,
            cfg.scylla,
            read_model,
            cfg.audit,
            window_s=cfg.audit.min_freshness_window_s,
        )
    return found.differences


# Repairs are idempotent (versions as write times), so a transient failure is retried.
@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NONE)
def repair(
    p: ReconcileParams, differences: list[Difference] | None, cfg: Settings
) -> ReconcileResult:
    with scylla.session(cfg.scylla) as session:
        if differences is None:
            return reconcile_partitions(
                cfg, session, p.partition_keys(), dry_run=p.dry_run, max_keys=p.max_keys
            )
        return reconcile(cfg, session, differences, dry_run=p.dry_run, max_keys=p.max_keys)


def publish(result: ReconcileResult) -> None:
    rows = [
        {
            "read model": r.read_model,
            "difference": r.kind,
            "key": ", ".join(f"{k}={v}" for k, v in r.key.items()),
            "action": r.action,
            "version written": r.version_us,
            "detail": r.detail,
        }
        for r in result.repairs[:MAX_ROWS_SHOWN]
    ]
    create_table_artifact(rows, key="reconcile-repairs", description="what reconcile changed")
    actions: tuple[Action, ...] = (
        "rewritten",
        "deleted",
        "new_version",
        "planned",
        "gone",
        "failed",
    )
    counts = ", ".join(f"{a} {result.count(a)}" for a in actions if result.count(a))
    create_markdown_artifact(
        f"# Reconcile{' (dry run)' if result.dry_run else ''}\n\n"
        f"- repairs: {counts or 'none needed'}\n"
        f"- left for the next run (max_keys): {result.over_limit}\n"
        f"- still different afterwards: {len(result.remaining)}\n",
        key="reconcile-report",
        description="reconcile summary",
    )


@flow(name="reconcile", validate_parameters=False)  # ReconcileParams validates
@documented(ReconcileParams)
def reconcile_flow(
    audit_run: str | None = None,
    partitions: list[str] | None = None,
    read_models: list[str] | None = None,
    dry_run: bool = False,
    max_keys: int | None = None,
) -> dict[str, Any]:
    """Repair read-model rows that differ from what Postgres implies."""
    # First statement: every parameter is validated before anything is read or written.
    p = validate_reconcile(dict(locals()))
    cfg = get_settings()
    log = get_run_logger()
    differences: list[Difference] | None = None
    if p.audit_run:
        differences = load_differences(cfg.audit.report_dir, p.audit_run)
    elif p.read_models:
        differences = [d for rm in p.read_models for d in find_differences(rm, cfg)]
    result = repair(p, differences, cfg)
    publish(result)
    summary = {
        "dry_run": result.dry_run,
        **{a: result.count(a) for a in ("rewritten", "deleted", "new_version", "gone", "failed")},
        "planned": result.count("planned"),
        "over_limit": result.over_limit,
        "remaining": len(result.remaining),
    }
    log.info("reconcile: %s", summary)
    if result.remaining and not result.dry_run:
        raise ReconcileIncomplete(
            f"{len(result.remaining)} rows still differ after reconcile: "
            + "; ".join(d.describe() for d in result.remaining[:5])
        )
    return summary


def _run(args: dict[str, Any]) -> int:
    try:
        print(reconcile_flow(**args))
    except ReconcileIncomplete as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = parser_from_model("python -m flows.reconcile", __doc__, ReconcileParams)
    return run_cli(parser, argv, validate_reconcile, _run)


if __name__ == "__main__":
    sys.exit(main())
