"""tasks.audit.report without a stack: the verdict and its reasons, the table rows and markdown
a person reads (keys only, never a row's contents), and the files reconcile reads back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.audit.diff import Difference, ModelAudit, compare
from tasks.audit.fingerprints import shape
from tasks.audit.freshness import (
    ConnectorFreshness,
    ConsumerLag,
    DeadLetterCount,
    FreshnessReport,
    LatencyReading,
    SlotFreshness,
)
from tasks.audit.report import SAMPLE_DIFFERENCES, AuditReport, load_differences, run_directory
from tasks.core.errors import ConfigurationError
from tasks.settings import AuditSettings

RUN = "8e2b8c8e-55a6-4f8a-9c55-0c1d2e3f4a5b"
SECRET = "s3cr3t: the launch code is 0000"
U1 = "10000000-0000-4000-8000-000000000001"
U2 = "20000000-0000-4000-8000-000000000002"
V = 1_700_000_000_123_456


def stale_secret() -> Difference:
    """A stale row of sessions_by_id, as compare() finds it, whose title is the secret."""
    sh = shape("sessions_by_id")
    want = (U1, U2, SECRET, "1700000000000", SECRET, None, "2")
    have = (U1, U2, "old", "1700000000000", "hello", None, "2")
    (d,) = compare(sh, {(U1,): (11, want, V)}, {(U1,): (11, have, V - 1, V - 1)})
    return d


def model(
    read_model: str, differences: list[Difference], bits: int = 6, **counts: int
) -> ModelAudit:
    m = ModelAudit(read_model, bits)
    for name, value in counts.items():
        assert hasattr(m, name)
        setattr(m, name, value)
    m.differences = differences
    return m


def missing(read_model: str, key: dict[str, str | None], token: int = 0) -> Difference:
    return Difference(read_model, "missing", key, token, expected_version_us=V)


def audit(tmp_path: Path, models: list[ModelAudit], max_differences: int = 0) -> AuditReport:
    return AuditReport(RUN, run_directory(tmp_path, RUN), max_differences, models=models)


def freshness(problems: tuple[str, ...]) -> FreshnessReport:
    return FreshnessReport(
        checked_at=datetime(2026, 12, 2, tzinfo=UTC),
        slot=SlotFreshness("cqrs_sync", True, True, 10, 0, 0.0),
        connector=ConnectorFreshness("cqrs-postgres", "http://connect:8083", "RUNNING"),
        consumer=ConsumerLag("cqrs-sync-cdc"),
        latency=LatencyReading(reason="no CDC run yet"),
        dead_letters=DeadLetterCount("cqrs.dlq", 0),
        limits=AuditSettings(),
        problems=problems,
    )


# --------------------------------------------------------------------------------------------
# The verdict


def test_no_differences_and_no_freshness_passes(tmp_path: Path) -> None:
    r = audit(tmp_path, [model("sessions_by_id", []), model("steps_by_turn", [])])
    assert r.problems() == []
    assert not r.drift
    assert r.summary()["passed"] is True
    assert r.markdown().startswith(f"# Audit {RUN}: **passed**\n")
    assert "No drift, all fresh, all expectations met." in r.markdown()


def test_differences_up_to_the_tolerance_pass(tmp_path: Path) -> None:
    diffs = [missing("sessions_by_id", {"session_id": U1}), stale_secret()]
    r = audit(tmp_path, [model("sessions_by_id", diffs)], max_differences=2)
    assert not r.drift and r.problems() == []


def test_differences_over_the_tolerance_are_a_problem_naming_the_counts(tmp_path: Path) -> None:
    r = audit(
        tmp_path,
        [
            model(
                "sessions_by_id", [stale_secret(), missing("sessions_by_id", {"session_id": U2})]
            ),
            model("conversation_timeline", []),
            model("steps_by_turn", [missing("steps_by_turn", {"agent_turn_id": U1})]),
        ],
        max_differences=2,
    )
    assert r.drift
    assert r.problems() == [
        "3 rows differ from what Postgres implies (tolerated: 2): sessions_by_id 2, steps_by_turn 1"
    ]
    assert r.summary()["passed"] is False and r.summary()["differences"] == 3
    assert r.markdown().startswith(f"# Audit {RUN}: **FAILED**\n")


def test_freshness_problems_fail_the_audit(tmp_path: Path) -> None:
    r = audit(tmp_path, [model("sessions_by_id", [])])
    r.freshness = freshness(())
    assert r.problems() == []
    r.freshness = freshness(("consumer group cqrs-sync-cdc is 500 changes behind",))
    assert r.problems() == ["consumer group cqrs-sync-cdc is 500 changes behind"]
    assert not r.drift  # staleness is not drift: reconcile_on_drift does not fire for it
    md = r.markdown()
    assert "- consumer group cqrs-sync-cdc is 500 changes behind" in md
    assert "## Freshness" in md


# --------------------------------------------------------------------------------------------
# What a person reads


def test_model_rows(tmp_path: Path) -> None:
    m = model(
        "sessions_by_id",
        [
            stale_secret(),
            missing("sessions_by_id", {"session_id": U2}),
            Difference("sessions_by_id", "extra", {"session_id": U1}, 3, writetime_us=V),
            missing("sessions_by_id", {"session_id": U1}),
        ],
        bits=5,
        rows_expected=100,
        rows_actual=99,
        mismatched_buckets=3,
        rechecked=2,
        settled_by_recheck=1,
    )
    m.seconds["total"] = 1.23456
    assert audit(tmp_path, [m]).model_rows() == [
        {
            "read model": "sessions_by_id",
            "rows expected": 100,
            "rows in Scylla": 99,
            "buckets": 32,
            "mismatched buckets": 3,
            "missing": 2,
            "extra": 1,
            "stale": 1,
            "re-checked": 2,
            "settled by re-check": 1,
            "seconds": 1.23,
        }
    ]
    assert audit(tmp_path, [model("steps_by_turn", [])]).model_rows()[0]["seconds"] == 0.0


def test_markdown_names_keys_and_the_reconcile_command_never_values(tmp_path: Path) -> None:
    d = stale_secret()
    r = audit(tmp_path, [model("sessions_by_id", [d], rows_expected=7, rows_actual=7)])
    md = r.markdown()
    assert f"`python -m flows.reconcile --audit-run {RUN}`" in md
    assert str(run_directory(tmp_path, RUN)) in md
    assert "## Sample differences: sessions_by_id" in md
    assert f"- {d.describe()}" in md
    assert U1 in md and "title, last_message differ" in md
    assert "| sessions_by_id | 7 | 7 | 0 | 0 | 1 |" in md
    assert SECRET not in md and "launch code" not in md and "hello" not in md


def test_markdown_shows_a_sample_of_many_differences(tmp_path: Path) -> None:
    n = SAMPLE_DIFFERENCES + 5
    diffs = [missing("sessions_by_id", {"session_id": f"k{i:03d}"}, i) for i in range(n)]
    md = audit(tmp_path, [model("sessions_by_id", diffs)]).markdown()
    shown = [line for line in md.splitlines() if line.startswith("- missing sessions_by_id(")]
    assert len(shown) == SAMPLE_DIFFERENCES
    assert "- ... and 5 more" in md


# --------------------------------------------------------------------------------------------
# The files


def test_write_then_load_differences_round_trips(tmp_path: Path) -> None:
    diffs_a = [
        stale_secret(),
        Difference("sessions_by_id", "extra", {"session_id": U2}, -5, (), None, V + 1, V + 9),
    ]
    key: dict[str, str | None] = {
        "session_id": U1,
        "created_at": "1700000000000",
        "created_at_micros": "7",
        "turn_id": U2,
    }
    diffs_b = [Difference("conversation_timeline", "missing", key, 2**63 - 1, (), V)]
    r = audit(tmp_path, [model("sessions_by_id", diffs_a), model("conversation_timeline", diffs_b)])
    directory = r.write()
    assert directory == tmp_path.resolve() / RUN
    assert {p.name for p in directory.iterdir()} >= {
        "differences.jsonl",
        "report.json",
        "report.md",
    }
    loaded = load_differences(tmp_path, RUN)
    assert loaded == diffs_a + diffs_b
    assert [list(d.key) for d in loaded] == [list(d.key) for d in diffs_a + diffs_b]  # key order
    assert all(isinstance(d.columns, tuple) for d in loaded)
    summary = json.loads((directory / "report.json").read_text())
    assert summary["run_id"] == RUN and summary["passed"] is False
    assert summary["differences"] == 3
    assert (directory / "report.md").read_text() == r.markdown()
    for f in directory.iterdir():
        assert SECRET not in f.read_text(), f.name


def test_a_clean_run_stores_no_differences(tmp_path: Path) -> None:
    audit(tmp_path, [model("sessions_by_id", [])]).write()
    assert load_differences(tmp_path, RUN) == []


def test_load_differences_of_an_unknown_run(tmp_path: Path) -> None:
    audit(tmp_path, [model("sessions_by_id", [])]).write()
    with pytest.raises(ConfigurationError, match=r"no audit run 'other-run' under"):
        load_differences(tmp_path, "other-run")
    with pytest.raises(ConfigurationError, match="CQRS_AUDIT_REPORT_DIR"):
        load_differences(tmp_path / "elsewhere", RUN)
