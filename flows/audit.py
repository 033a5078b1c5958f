"""The audit flow: are the read models what Postgres implies, and are they fresh? Read-only.

    python -m flows.audit --help
    python -m flows.audit                                  # every read model
    python -m flows.audit --read-models sessions_by_id --reconcile-on-drift

Stages: freshness (slot, connector, consumer lag, latency, DLQ) → per read model, a
checksum-and-bisect diff against the expected rows Postgres computes in SQL (docs/decisions.md,
"The audit buckets by token, computed in Postgres") → the expectation suites on sampled rows,
with Data Docs → the report: a table artifact per read model, a markdown report, files for
reconcile. Drift or staleness over a threshold emits the Prefect event ``cqrs.audit.failed``
and fails the run, so automations and alerts fire (deployments/prefect.yaml triggers
reconcile from it).
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.runtime import flow_run

from flows.cli import documented, parser_from_model, run_cli
from tasks.adapters import postgres, scylla
from tasks.audit import freshness as freshness_checks
from tasks.audit.cross_model import recheck_keys
from tasks.audit.diff import ModelAudit, first_passes, recheck
from tasks.audit.freshness import FreshnessReport
from tasks.audit.params import AuditParams, validate_audit
from tasks.audit.report import AuditReport, run_directory
from tasks.audit.sampled_quality import QualityPass, cross_model_failures, validate_samples
from tasks.core.errors import TerminalError, retry_if_transient
from tasks.settings import Settings, get_settings

FAILED_EVENT = "cqrs.audit.failed"


class AuditFailed(TerminalError):
    """The audit found drift or staleness over a threshold (the run fails on purpose)."""


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient, cache_policy=NONE)
def check_freshness(cfg: Settings) -> FreshnessReport:
    """Slot, connector, consumer lag, latency and DLQ; a service down is a problem reported."""
    report = freshness_checks.check_freshness(cfg)
    for problem in report.problems:
        get_run_logger().warning("freshness: %s", problem)
    for warning in report.warnings:
        get_run_logger().warning("freshness (not a failure): %s", warning)
    return report


def freshness_window(p: AuditParams, cfg: Settings, fresh: FreshnessReport) -> float:
    """How long a difference that live traffic may explain gets before it counts: given, or
    3x how far behind the consumer is (its oldest unconsumed change, its last p99)."""
    if p.freshness_window_s is not None:
        return p.freshness_window_s
    if cfg.audit.freshness_window_s is not None:
        return cfg.audit.freshness_window_s
    record = fresh.latency.record
    behind = max(fresh.consumer_lag_age_s, (record.p99_ms / 1000) if record else 0.0)
    return min(max(3 * behind, cfg.audit.min_freshness_window_s), cfg.audit.max_freshness_window_s)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NONE)
def diff_read_models(read_models: list[str], samples: int, cfg: Settings) -> list[ModelAudit]:
    """The key-level diff of each read model, before re-checks (tasks/audit/diff.py),
    ``CQRS_AUDIT_PARALLEL_READ_MODELS`` at once."""
    n = min(cfg.audit.parallel_read_models, len(read_models))
    with contextlib.ExitStack() as stack:
        conns = [
            stack.enter_context(postgres.connect("reader", cfg.postgres, autocommit=True))
            for _ in range(n)
        ]
        session = stack.enter_context(scylla.session(cfg.scylla))
        return first_passes(conns, session, cfg.scylla, read_models, cfg.audit, samples=samples)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NONE)
def recheck_differences(
    models: list[ModelAudit], window_s: float, cfg: Settings
) -> list[ModelAudit]:
    """Differences live traffic may explain, read again once after the freshness window
    (one wait for every read model)."""
    with (
        postgres.connect("reader", cfg.postgres, autocommit=True) as conn,
        scylla.session(cfg.scylla) as session,
    ):
        recheck(models, conn, session, cfg.scylla, cfg.audit, window_s=window_s)
    log = get_run_logger()
    for m in models:
        log.info(
            "%s: %d rows expected, %d in Scylla, %d of %d buckets differ; %d missing, "
            "%d extra, %d stale (%d re-checked, %d settled) in %.1f s",
            m.read_model,
            m.rows_expected,
            m.rows_actual,
            m.mismatched_buckets,
            1 << m.bucket_bits,
            m.count("missing"),
            m.count("extra"),
            m.count("stale"),
            m.rechecked,
            m.settled_by_recheck,
            m.seconds.get("total", 0.0),
        )
    return models


@task(retries=1, retry_condition_fn=retry_if_transient, cache_policy=NONE)
def validate_quality(
    samples: dict[str, list[str]], directory: Path, run_id: str, window_s: float, cfg: Settings
) -> QualityPass:
    """The expectation suites on the rows of the sampled partitions, the cross-model checks
    (a failure is re-checked once after the freshness window: a header and its timeline
    may be a moment apart under live traffic), and Data Docs in the report folder."""
    keys = {rm: [uuid.UUID(k) for k in ks] for rm, ks in samples.items()}
    with scylla.session(cfg.scylla) as session:
        result = validate_samples(
            session,
            cfg.scylla.keyspace,
            keys,
            max_rows=cfg.audit.quality_sample_rows,
            data_docs_dir=directory / "data-docs",
            run_name=run_id,
        )
        if result.cross_model:
            time.sleep(window_s)
            sessions, turns = recheck_keys(result.cross_model)
            still = cross_model_failures(session, cfg.scylla.keyspace, sessions, turns)
            result = QualityPass(
                results=result.results,
                cross_model=tuple(still),
                data_docs_index=result.data_docs_index,
                rows_validated=result.rows_validated,
                data_docs_error=result.data_docs_error,
                cross_model_keys=result.cross_model_keys,
                seconds=result.seconds,
            )
    return result


def publish(report: AuditReport) -> None:
    """What a person reads in the UI: a table per read model, the report, freshness."""
    for row in report.model_rows():
        name = row["read model"]
        create_table_artifact(
            [row],
            key=f"audit-{name.replace('_', '-')}",
            description=f"audit of {name}: rows checked, buckets, missing / extra / stale",
        )
    if report.freshness is not None:
        create_table_artifact(
            report.freshness.table_rows(),
            key="audit-freshness",
            description="replication slot, connector, consumer lag, latency, dead letters",
        )
    create_markdown_artifact(
        report.markdown(), key="audit-report", description=f"audit {report.run_id}"
    )


def _run_id() -> str:
    run = flow_run.get_id()
    return str(run) if run else f"local-{uuid.uuid4().hex[:12]}"


@flow(name="audit", validate_parameters=False)  # AuditParams validates, with clear messages
@documented(AuditParams)
def audit_flow(
    read_models: list[str] | None = None,
    freshness_window_s: float | None = None,
    quality: bool = True,
    reconcile_on_drift: bool = False,
    max_differences: int | None = None,
) -> dict[str, Any]:
    """Audit the read models against Postgres: key-level diff, freshness, expectations."""
    # First statement: every parameter is validated before anything is read.
    p = validate_audit(dict(locals()))
    cfg = get_settings()
    log = get_run_logger()
    run_id = _run_id()
    report = AuditReport(
        run_id,
        run_directory(cfg.audit.report_dir, run_id),
        cfg.audit.max_differences if p.max_differences is None else p.max_differences,
    )
    report.freshness = check_freshness(cfg)
    window = freshness_window(p, cfg, report.freshness)
    log.info("freshness window %.1f s", window)
    sample_size = cfg.audit.quality_sample_partitions if p.quality else 0
    first = diff_read_models(list(p.read_models), sample_size, cfg)
    report.models = recheck_differences(first, window, cfg)
    if p.quality:
        samples = {m.read_model: m.samples for m in report.models}
        report.quality = validate_quality(samples, report.directory, run_id, window, cfg)
    report.write()
    publish(report)
    problems = report.problems()
    if not problems:
        log.info("audit passed: %s", report.directory)
        return report.summary()
    emit_event(
        event=FAILED_EVENT,
        resource={"prefect.resource.id": f"cqrs.audit.{run_id}", "prefect.resource.name": "audit"},
        payload={
            "audit_run": run_id,
            "drift": report.drift,
            "differences": len(report.differences),
            "problems": problems[:20],
        },
    )
    if p.reconcile_on_drift and report.drift:
        from flows.reconcile import reconcile_flow

        reconcile_flow(audit_run=run_id)
    raise AuditFailed("audit failed: " + "; ".join(problems[:5]))


def _run(args: dict[str, Any]) -> int:
    try:
        result = audit_flow(**args)
    except AuditFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    print(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = parser_from_model("python -m flows.audit", __doc__, AuditParams)
    return run_cli(parser, argv, validate_audit, _run)


if __name__ == "__main__":
    sys.exit(main())
