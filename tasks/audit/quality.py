"""Validation of read-model rows (a pandas DataFrame) against their expectation suite
(tasks/audit/suites.py) with Great Expectations (GX Core 1.x). Plain functions: flows wrap
them.

GX's ephemeral context is created once per process and reused; nothing is written to disk,
nothing goes over the network. :func:`run_validation` also returns GX's own result, from which
tasks/audit/sampled_quality.py renders Data Docs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from tasks.audit.suites import (
    DEFAULT_CLOCK_SKEW,
    check_read_model,
    columns_of,
    default_parameters,
    expectation_name,
    gx,
    load_suite,
    render_condition,
)
from tasks.core.errors import InvalidInput

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.datasource.fluent import PandasDatasource

# Unexpected values kept per failed expectation (GX's partial_unexpected_count).
MAX_UNEXPECTED_VALUES: Final = 5
_DATASOURCE: Final = "cqrs_read_models"


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class ExpectationFailure:
    """One expectation the frame did not meet, or could not be evaluated on it."""

    expectation: str  # GX expectation type, e.g. expect_column_values_to_be_in_set
    columns: tuple[str, ...]  # the column, or the column_list of a compound expectation
    condition: str | None  # the row condition, rendered ("role == 'human'")
    invariant: str | None  # what the suite says the expectation stands for
    kwargs: Mapping[str, Any]  # the expectation's arguments, parameters resolved
    element_count: int | None
    unexpected_count: int | None
    unexpected_percent: float | None
    unexpected_values: tuple[Any, ...]  # a few offending values (GX's partial list)
    observed_value: Any  # for aggregate expectations
    error: str | None  # set when GX raised instead of evaluating

    @property
    def name(self) -> str:
        """``type(columns[ where condition])``: unique within a suite."""
        return expectation_name(self.expectation, self.columns, self.condition)

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.name}: could not be evaluated: {self.error}"
        detail = ""
        if self.unexpected_count is not None:
            detail = f"{self.unexpected_count} of {self.element_count} rows unexpected"
            if self.unexpected_values:
                detail += f", e.g. {list(self.unexpected_values)!r:.300}"
        elif self.observed_value is not None:
            detail = f"observed {self.observed_value!r:.200}"
        return f"{self.name}: {detail or 'failed'}"


@dataclass(frozen=True, slots=True)
class QualityResult:
    read_model: str
    suite: str
    success: bool
    row_count: int
    evaluated: int
    failures: tuple[ExpectationFailure, ...]

    @property
    def failed(self) -> tuple[str, ...]:
        """The expectation types that failed (may repeat for different columns)."""
        return tuple(f.expectation for f in self.failures)

    def failure(self, expectation: str, column: str | None = None) -> ExpectationFailure | None:
        """The first failure of ``expectation`` (on ``column`` if given), or None."""
        for f in self.failures:
            if f.expectation == expectation and (column is None or column in f.columns):
                return f
        return None

    def summary(self) -> str:
        head = (
            f"{self.read_model}: {self.evaluated - len(self.failures)}/{self.evaluated} "
            f"expectations met on {self.row_count} rows"
        )
        return "\n  ".join([head, *map(str, self.failures)])


# --------------------------------------------------------------------------------------------
# GX context (created once) and validation


_lock = threading.RLock()


@lru_cache(maxsize=1)
def _datasource() -> PandasDatasource:
    """The process's one ephemeral GX context (slow to import, so built once) and its pandas
    data source; the context lives as long as the data source refers to it."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx().get_context(mode="ephemeral")
    # No tqdm bars on stderr from inside flows and tests.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context.data_sources.add_pandas(_DATASOURCE)


_batch_definitions: dict[str, BatchDefinition] = {}


def _batch_definition(read_model: str) -> BatchDefinition:
    with _lock:
        bd = _batch_definitions.get(read_model)
        if bd is None:
            asset = _datasource().add_dataframe_asset(read_model)
            bd = _batch_definitions[read_model] = asset.add_batch_definition_whole_dataframe(
                "whole_frame"
            )
        return bd


def _as_utc(series: pd.Series) -> pd.Series:
    """Timestamps as tz-aware UTC; a naive value is UTC (the Cassandra driver's convention)."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert(UTC)
    if pd.api.types.is_datetime64_dtype(series.dtype):
        return series.dt.tz_localize(UTC)
    values = series.dropna()
    if series.dtype == object and len(values) and all(isinstance(v, datetime) for v in values):
        return pd.to_datetime(series, utc=True)
    return series


def _normalized(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy(deep=False)
    for col in out.columns:
        out[col] = _as_utc(out[col])
    return out.reset_index(drop=True)


def _error(exception_info: Any) -> str | None:
    """GX puts either one {raised_exception, exception_message} dict or one per metric."""
    if not isinstance(exception_info, Mapping):
        return None
    infos = (
        [exception_info]
        if "raised_exception" in exception_info
        else [v for v in exception_info.values() if isinstance(v, Mapping)]
    )
    messages = [
        str(i.get("exception_message") or "error") for i in infos if i.get("raised_exception")
    ]
    return "; ".join(dict.fromkeys(messages)) or None


def _failure(res: ExpectationValidationResult) -> ExpectationFailure:
    cfg = res.expectation_config
    kwargs = {k: v for k, v in (cfg.kwargs if cfg is not None else {}).items() if k != "batch_id"}
    columns = columns_of(kwargs)
    result = res.result or {}
    values = result.get("partial_unexpected_list") or ()
    meta = (cfg.meta if cfg is not None else None) or {}
    return ExpectationFailure(
        expectation=cfg.type if cfg is not None else "unknown",
        columns=columns,
        condition=render_condition(kwargs.get("row_condition")),
        invariant=meta.get("invariant"),
        kwargs=kwargs,
        element_count=result.get("element_count"),
        unexpected_count=result.get("unexpected_count"),
        unexpected_percent=result.get("unexpected_percent"),
        unexpected_values=tuple(values[:MAX_UNEXPECTED_VALUES]),
        observed_value=result.get("observed_value"),
        error=_error(res.exception_info),
    )


@dataclass(frozen=True, slots=True)
class Validation:
    """A validation's :class:`QualityResult` with what Data Docs render it from: the suite
    used and GX's result (SUMMARY format: counts and a few values, never the rows)."""

    result: QualityResult
    suite: ExpectationSuite
    gx_result: ExpectationSuiteValidationResult


def validate_frame(
    read_model: str,
    frame: pd.DataFrame,
    *,
    parameters: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
    suite: ExpectationSuite | None = None,
) -> QualityResult:
    """Validate rows of one read model against its suite.

    ``parameters`` override :func:`default_parameters` (computed from ``now`` and
    ``clock_skew``). Timestamp columns may be naive (taken as UTC) or tz-aware. An expectation
    that GX cannot evaluate (a missing column, say) counts as a failure with ``error`` set.
    """
    return run_validation(
        read_model, frame, parameters=parameters, now=now, clock_skew=clock_skew, suite=suite
    ).result


def run_validation(
    read_model: str,
    frame: pd.DataFrame,
    *,
    parameters: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
    suite: ExpectationSuite | None = None,
) -> Validation:
    """:func:`validate_frame`, keeping the suite and GX's result (for Data Docs)."""
    check_read_model(read_model)
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInput(f"expected a pandas DataFrame, got {type(frame).__name__}")
    suite = suite if suite is not None else load_suite(read_model)
    params = default_parameters(now, clock_skew) | dict(parameters or {})
    data = _normalized(frame)
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_UNEXPECTED_VALUES}
    with _lock:  # the GX context and its assets are shared, and not thread-safe
        batch = _batch_definition(read_model).get_batch(batch_parameters={"dataframe": data})
        outcome = batch.validate(suite, result_format=result_format, expectation_parameters=params)
    failures = tuple(_failure(r) for r in outcome.results if not r.success)
    result = QualityResult(
        read_model=read_model,
        suite=suite.name,
        success=bool(outcome.success) and not failures,
        row_count=len(data),
        evaluated=len(outcome.results),
        failures=failures,
    )
    return Validation(result=result, suite=suite, gx_result=outcome)
