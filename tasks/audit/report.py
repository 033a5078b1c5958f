"""An audit run's report: the verdict, what a person reads (tables and markdown for Prefect
artifacts), and the files reconcile reads back (``<report_dir>/<run id>/``):

- ``report.json``: counts per read model, freshness problems, quality failures, verdict;
- ``differences.jsonl``: one difference per line (keys only, never row contents);
- ``data-docs/``: the Great Expectations Data Docs of the sampled rows.

The report folder must be reachable by the reconcile run that repairs it (shared storage
when they run on different machines; docs/operations.md, "Audits").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tasks.audit.diff import Difference, ModelAudit
from tasks.audit.reconcile import differences_from
from tasks.core.errors import ConfigurationError

if TYPE_CHECKING:
    from tasks.audit.freshness import FreshnessReport
    from tasks.audit.sampled_quality import QualityPass

SAMPLE_DIFFERENCES: Final = 20  # shown in the markdown report per read model


def run_directory(report_dir: str | Path, run_id: str) -> Path:
    return Path(report_dir).expanduser().resolve() / run_id


@dataclass(slots=True)
class AuditReport:
    run_id: str
    directory: Path
    max_differences: int
    models: list[ModelAudit] = field(default_factory=list)
    freshness: FreshnessReport | None = None
    quality: QualityPass | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def differences(self) -> list[Difference]:
        return [d for m in self.models for d in m.differences]

    @property
    def drift(self) -> bool:
        return len(self.differences) > self.max_differences

    def quality_failures(self) -> list[str]:
        if self.quality is None:
            return []
        out = [
            f"{rm}: {f.expectation} on {', '.join(f.columns)}"
            + (f" ({f.unexpected_count} rows)" if f.unexpected_count is not None else "")
            for rm, r in self.quality.results.items()
            for f in r.failures
        ]
        out += [f"cross-model {c.check}: {c.detail}" for c in self.quality.cross_model]
        return out

    def problems(self) -> list[str]:
        """Why the audit fails; empty when it passes."""
        out: list[str] = []
        if self.drift:
            counts = ", ".join(
                f"{m.read_model} {len(m.differences)}" for m in self.models if m.differences
            )
            out.append(
                f"{len(self.differences)} rows differ from what Postgres implies "
                f"(tolerated: {self.max_differences}): {counts}"
            )
        if self.freshness is not None:
            out += list(self.freshness.problems)
        out += self.quality_failures()
        return out

    def model_rows(self) -> list[dict[str, Any]]:
        """One row per read model, for a table artifact."""
        return [
            {
                "read model": m.read_model,
                "rows expected": m.rows_expected,
                "rows in Scylla": m.rows_actual,
                "buckets": 1 << m.bucket_bits,
                "mismatched buckets": m.mismatched_buckets,
                "missing": m.count("missing"),
                "extra": m.count("extra"),
                "stale": m.count("stale"),
                "re-checked": m.rechecked,
                "settled by re-check": m.settled_by_recheck,
                "seconds": round(m.seconds.get("total", 0.0), 2),
            }
            for m in self.models
        ]

    def markdown(self) -> str:
        verdict = "**FAILED**" if self.problems() else "**passed**"
        lines = [f"# Audit {self.run_id}: {verdict}", ""]
        lines += [f"- {p}" for p in self.problems()] or [
            "No drift, all fresh, all expectations met."
        ]
        lines += [
            "",
            "| read model | expected | in Scylla | missing | extra | stale | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.model_rows():
            lines.append(
                f"| {r['read model']} | {r['rows expected']} | {r['rows in Scylla']} | "
                f"{r['missing']} | {r['extra']} | {r['stale']} | {r['seconds']} |"
            )
        for m in self.models:
            if m.differences:
                lines += ["", f"## Sample differences: {m.read_model}", ""]
                lines += [f"- {d.describe()}" for d in m.differences[:SAMPLE_DIFFERENCES]]
                if len(m.differences) > SAMPLE_DIFFERENCES:
                    lines.append(f"- ... and {len(m.differences) - SAMPLE_DIFFERENCES} more")
        if self.quality is not None:
            where = self.quality.data_docs_index or self.quality.data_docs_error
            lines += ["", "## Expectations", "", f"Data Docs: `{where}`", ""]
            lines += [
                f"- {rm}: {n} rows validated" for rm, n in self.quality.rows_validated.items()
            ]
        if self.freshness is not None:
            lines += ["", self.freshness.markdown()]
        lines += [
            "",
            f"Report folder: `{self.directory}`; repair with "
            f"`python -m flows.reconcile --audit-run {self.run_id}`.",
        ]
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "started_at": self.started_at.isoformat(),
            "passed": not self.problems(),
            "problems": self.problems(),
            "models": self.model_rows(),
            "differences": len(self.differences),
            "data_docs": str(self.quality.data_docs_index)
            if self.quality and self.quality.data_docs_index
            else None,
            "directory": str(self.directory),
        }

    def write(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "differences.jsonl").open("w") as f:
            for d in self.differences:
                f.write(json.dumps(d.as_dict()) + "\n")
        (self.directory / "report.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        (self.directory / "report.md").write_text(self.markdown())
        return self.directory


def load_differences(report_dir: str | Path, run_id: str) -> list[Difference]:
    """The differences an audit run stored; ConfigurationError if it stored none here."""
    path = run_directory(report_dir, run_id) / "differences.jsonl"
    if not path.exists():
        raise ConfigurationError(
            f"no audit run {run_id!r} under {Path(report_dir).expanduser()} "
            "(CQRS_AUDIT_REPORT_DIR must be the folder the audit wrote to)"
        )
    rows: Sequence[dict[str, Any]] = [
        json.loads(line) for line in path.read_text().splitlines() if line
    ]
    return differences_from(rows)
