"""The audit and reconcile command lines (``python -m flows.audit``, ``python -m flows.reconcile``),
built from their parameter models: help, a mistake refused with status 2 before any flow run,
and the audit's freshness window. No stack needed: the flows are replaced where one would
start."""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass
from typing import Any, cast

import pytest

import flows.audit
import flows.reconcile
from flows.audit import AuditFailed, freshness_window
from flows.reconcile import ReconcileIncomplete
from tasks.audit.freshness import FreshnessReport
from tasks.audit.params import AuditParams, ReconcileParams, validate_audit
from tasks.settings import AuditSettings, Settings

KEY = uuid.UUID("5b0c1f3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")


class Called(list[dict[str, Any]]):
    """A stand-in flow that records its arguments."""

    def __init__(self, result: Any = None, raises: BaseException | None = None) -> None:
        super().__init__()
        self.result, self.raises = result, raises

    def __call__(self, **kwargs: Any) -> Any:
        self.append(kwargs)
        if self.raises is not None:
            raise self.raises
        return self.result


def must_not_run(**_: object) -> None:
    raise AssertionError("a flow run was started")


@pytest.fixture
def no_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows.audit, "audit_flow", must_not_run)
    monkeypatch.setattr(flows.reconcile, "reconcile_flow", must_not_run)


# --------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize(
    ("module", "options"),
    [
        (
            flows.audit,
            [
                "--read-models",
                "--freshness-window-s",
                "--quality",
                "--reconcile-on-drift",
                "--max-differences",
            ],
        ),
        (
            flows.reconcile,
            ["--audit-run", "--partitions", "--read-models", "--dry-run", "--max-keys"],
        ),
    ],
)
def test_help_exits_0_and_lists_every_parameter(
    module: Any, options: list[str], capsys: pytest.CaptureFixture[str], no_flows: None
) -> None:
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module.__name__}")
    for option in options:
        assert option in out
    assert module.__doc__.splitlines()[0] in out  # the module's description


@pytest.mark.parametrize(
    ("module", "flow", "model"),
    [
        (flows.audit, flows.audit.audit_flow, AuditParams),
        (flows.reconcile, flows.reconcile.reconcile_flow, ReconcileParams),
    ],
)
def test_cli_flow_and_model_have_the_same_parameters(module: Any, flow: Any, model: Any) -> None:
    prog = f"python -m {module.__name__}"
    parser = flows.audit.parser_from_model(prog, None, model)
    cli = {a.dest for a in parser._actions if a.dest != "help"}
    assert set(inspect.signature(flow.fn).parameters) == set(model.model_fields) == cli


# --------------------------------------------------------------------------------------------
# Mistakes: status 2, a message naming them, no flow run


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--read-models", "sessions_by_id", "users"], "read_models: unknown read model"),
        (["--freshness-window-s", "-1"], "freshness_window_s: Input should be greater than"),
        (["--freshness-window-s", "soon"], "freshness_window_s: Input should be a valid number"),
        (["--max-differences", "many"], "max_differences: Input should be a valid integer"),
        (["--quality", "perhaps"], "quality: Input should be a valid boolean"),
    ],
)
def test_audit_cli_refuses_a_bad_parameter(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str], no_flows: None
) -> None:
    assert flows.audit.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid audit parameters:")
    assert named in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([], "name exactly one of audit_run, partitions, read_models"),
        (["--dry-run"], "name exactly one of audit_run, partitions, read_models"),
        (
            ["--audit-run", "r1", "--read-models", "sessions_by_id"],
            "(got audit_run, read_models)",
        ),
        (["--audit-run", "../etc"], "audit_run: '../etc' is not an audit run id"),
        (["--partitions", "x"], "partitions: 'x': unknown read model 'x'"),
        (
            ["--partitions", "sessions_by_id:not-a-uuid"],
            "'sessions_by_id:not-a-uuid': 'not-a-uuid' is not a uuid partition key",
        ),
        (["--partitions", f"nope:{KEY}"], f"'nope:{KEY}': unknown read model 'nope'"),
        (["--audit-run", "r1", "--max-keys", "0"], "max_keys: Input should be greater than"),
    ],
)
def test_reconcile_cli_refuses_a_bad_parameter(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str], no_flows: None
) -> None:
    assert flows.reconcile.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid reconcile parameters:")
    assert named in err


def test_an_unknown_option_is_argparses_usage_error(
    capsys: pytest.CaptureFixture[str], no_flows: None
) -> None:
    with pytest.raises(SystemExit) as exit_:
        flows.audit.main(["--bogus", "1"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Good parameters reach the flow, and its verdict is the exit status


def test_audit_cli_runs_the_flow_with_the_options_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = Called(result={"passed": True})
    monkeypatch.setattr(flows.audit, "audit_flow", flow)
    argv = ["--read-models", "sessions_by_id", "--quality", "false", "--reconcile-on-drift"]
    assert flows.audit.main(argv) == 0
    assert flow == [
        {"read_models": ["sessions_by_id"], "quality": "false", "reconcile_on_drift": True}
    ]
    assert validate_audit(flow[0]).quality is False  # what the flow makes of it
    assert "{'passed': True}" in capsys.readouterr().out


def test_a_failed_audit_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(flows.audit, "audit_flow", Called(raises=AuditFailed("audit failed: x")))
    assert flows.audit.main([]) == 1
    assert "audit failed: x" in capsys.readouterr().err


def test_reconcile_cli_runs_the_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = Called(result={"remaining": 0})
    monkeypatch.setattr(flows.reconcile, "reconcile_flow", flow)
    assert flows.reconcile.main(["--partitions", f"sessions_by_id:{KEY}", "--dry-run"]) == 0
    assert flow == [{"partitions": [f"sessions_by_id:{KEY}"], "dry_run": True}]
    monkeypatch.setattr(
        flows.reconcile, "reconcile_flow", Called(raises=ReconcileIncomplete("2 rows differ"))
    )
    assert flows.reconcile.main(["--audit-run", "r1"]) == 1


# --------------------------------------------------------------------------------------------
# The freshness window


@dataclass
class Record:
    p99_ms: float


@dataclass
class Latency:
    record: Record | None


@dataclass
class Fresh:
    """What freshness_window reads of a FreshnessReport."""

    consumer_lag_age_s: float
    latency: Latency


def fresh(lag_s: float, p99_ms: float | None = None) -> FreshnessReport:
    return cast(FreshnessReport, Fresh(lag_s, Latency(None if p99_ms is None else Record(p99_ms))))


def settings(window: float | None = None, lo: float = 2.0, hi: float = 120.0) -> Settings:
    return Settings(
        audit=AuditSettings(
            freshness_window_s=window, min_freshness_window_s=lo, max_freshness_window_s=hi
        )
    )


def params(window: float | None = None) -> AuditParams:
    return validate_audit({"freshness_window_s": window})


@pytest.mark.parametrize(
    ("p", "cfg", "f", "window"),
    [
        # Given as a parameter: it wins, even 0 and even over the setting.
        (params(7.5), settings(), fresh(100.0), 7.5),
        (params(0), settings(window=50.0), fresh(100.0), 0.0),
        (params(3000), settings(hi=120.0), fresh(0.0), 3000.0),  # not clamped
        # The setting, when no parameter.
        (params(), settings(window=50.0), fresh(100.0), 50.0),
        (params(), settings(window=0.0), fresh(100.0), 0.0),
        # Derived: 3x how far behind the consumer is.
        (params(), settings(), fresh(5.0), 15.0),
        (params(), settings(), fresh(5.0, p99_ms=20_000), 60.0),  # the p99 is further behind
        (params(), settings(), fresh(10.0, p99_ms=2_000), 30.0),  # the lag is
        # ...clamped to the minimum and maximum.
        (params(), settings(), fresh(0.0), 2.0),
        (params(), settings(), fresh(0.1, p99_ms=100), 2.0),
        (params(), settings(lo=0.0), fresh(0.0), 0.0),
        (params(), settings(), fresh(41.0), 120.0),
        (params(), settings(hi=30.0), fresh(1.0, p99_ms=60_000), 30.0),
    ],
)
def test_freshness_window(p: AuditParams, cfg: Settings, f: FreshnessReport, window: float) -> None:
    assert freshness_window(p, cfg, f) == pytest.approx(window)
