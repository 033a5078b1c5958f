"""Data-quality checks of the read models with Great Expectations (GX Core 1.x).

One suite per read model lives in ``expectations/<read_model>.json`` (GX 1.x suite JSON). This
module loads a suite, validates a pandas DataFrame of read-model rows against it, and reads the
rows of given partitions from Scylla into such a frame. Plain functions: flows wrap them.

- GX is imported lazily (the import takes seconds) and its ephemeral context is created once
  per process and reused; nothing is written to disk, nothing goes over the network.
- The suites hold invariants only, no environment: values that depend on the clock or the
  configuration are suite parameters (``{"$PARAMETER": name}``) supplied at validation time
  by :func:`default_parameters` (``max_timestamp`` = now + the allowed clock skew, and the
  write API's text limits from :class:`~tasks.core.write_policy.DualWritePolicy`).
- Suites name the columns they check, never a table's full column list, so a column added to
  a read model later (e.g. a clustering column) does not break them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from tasks.core.errors import ConfigurationError, InvalidInput, TransientError
from tasks.core.projection import KEY_COLUMNS, READ_MODELS
from tasks.core.write_policy import as_uuid

if TYPE_CHECKING:
    from cassandra.cluster import Session
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.core.expectation_validation_result import (
        ExpectationValidationResult,
    )
    from great_expectations.datasource.fluent import PandasDatasource

# GX reads this when it decides whether to send usage statistics. GX itself is imported lazily
# (below, after this line ran); 1.24 ships without an analytics client, and the ephemeral
# context never phones home, but say so anyway in case a later 1.x brings one back.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

EXPECTATIONS_DIR: Final = Path(__file__).resolve().parents[2] / "expectations"
DEFAULT_CLOCK_SKEW: Final = timedelta(minutes=5)
# Unexpected values kept per failed expectation (GX's partial_unexpected_count).
MAX_UNEXPECTED_VALUES: Final = 5
_DATASOURCE: Final = "cqrs_read_models"
_IDENT: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}\Z")


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
        return _name(self.expectation, self.columns, self.condition)

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
# Suites


def _check_read_model(read_model: str) -> str:
    if read_model not in READ_MODELS:
        raise InvalidInput(f"unknown read model {read_model!r}; known: {list(READ_MODELS)}")
    return read_model


@lru_cache(maxsize=32)
def _suite_document(read_model: str, directory: Path) -> Mapping[str, Any]:
    path = directory / f"{read_model}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"no expectation suite for {read_model}: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: cannot read the suite: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("expectations"), list):
        raise ConfigurationError(f"{path}: not a GX suite (an object with 'expectations')")
    if doc.get("name") != read_model:
        raise ConfigurationError(f"{path}: suite name {doc.get('name')!r} is not {read_model!r}")
    return doc


def load_suite(read_model: str, directory: Path = EXPECTATIONS_DIR) -> ExpectationSuite:
    """The read model's suite from ``expectations/<read_model>.json``, as a new
    ``ExpectationSuite`` (the file is parsed once; callers may modify what they get)."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    _check_read_model(read_model)
    doc = copy.deepcopy(dict(_suite_document(read_model, directory)))
    # ExpectationSuite(expectations=[dict...]) logs and *drops* an invalid expectation (a typo
    # in a type or kwarg would silently remove a check): build each one here so it raises.
    expectations = []
    for i, raw in enumerate(doc.pop("expectations")):
        try:
            expectations.append(ExpectationConfiguration(**raw).to_domain_obj())
        except Exception as exc:  # GX raises pydantic, marshmallow and its own errors
            what = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
            raise ConfigurationError(
                f"{read_model}: invalid expectation suite: expectations"
                f"[{i}] ({what}): {type(exc).__name__}: {exc}"
            ) from exc
    try:
        return _gx().ExpectationSuite(**doc, expectations=expectations)
    except Exception as exc:
        raise ConfigurationError(
            f"{read_model}: invalid expectation suite: {type(exc).__name__}: {exc}"
        ) from exc


def suite_parameters(read_model: str, directory: Path = EXPECTATIONS_DIR) -> frozenset[str]:
    """The suite parameter names (``$PARAMETER``) the read model's suite refers to."""
    found: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if isinstance(v.get("$PARAMETER"), str):
                found.add(v["$PARAMETER"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(_suite_document(_check_read_model(read_model), directory)["expectations"])
    return frozenset(found)


def expectation_names(read_model: str, directory: Path = EXPECTATIONS_DIR) -> tuple[str, ...]:
    """The names (as in :attr:`ExpectationFailure.name`) of the suite's expectations."""
    doc = _suite_document(_check_read_model(read_model), directory)
    return tuple(
        _name(
            e.get("type", "unknown"),
            _columns(e.get("kwargs") or {}),
            _render_condition((e.get("kwargs") or {}).get("row_condition")),
        )
        for e in doc["expectations"]
    )


def default_parameters(
    now: datetime | None = None, clock_skew: timedelta = DEFAULT_CLOCK_SKEW
) -> dict[str, Any]:
    """Values for every suite parameter the suites use."""
    from tasks.core.write_policy import DualWritePolicy

    if now is None:
        now = datetime.now(UTC)
    elif now.utcoffset() is None:
        raise InvalidInput("now must be timezone-aware")
    policy = DualWritePolicy()
    return {
        "max_timestamp": pd.Timestamp(now).tz_convert(UTC) + clock_skew,
        "max_title_chars": policy.max_title_chars,
        "max_model_chars": policy.max_model_chars,
        "max_kind_chars": policy.max_kind_chars,
    }


# --------------------------------------------------------------------------------------------
# GX context (created once) and validation


def _gx() -> Any:
    import great_expectations as gx

    return gx


_lock = threading.RLock()


@lru_cache(maxsize=1)
def _datasource() -> PandasDatasource:
    """The process's one ephemeral GX context (slow to import, so built once) and its pandas
    data source; the context lives as long as the data source refers to it."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = _gx().get_context(mode="ephemeral")
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


def _name(expectation: str, columns: tuple[str, ...], condition: str | None) -> str:
    where = f" where {condition}" if condition else ""
    return f"{expectation}({', '.join(columns)}{where})"


def _columns(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    if "column_list" in kwargs:
        return tuple(kwargs["column_list"])
    if "column" in kwargs:
        return (kwargs["column"],)
    if "column_A" in kwargs and "column_B" in kwargs:
        return (kwargs["column_A"], kwargs["column_B"])
    return ()


def _render_condition(cond: Any) -> str | None:
    if cond is None:
        return None
    if hasattr(cond, "dict") and not isinstance(cond, dict):
        cond = cond.dict()
    if isinstance(cond, dict) and cond.get("type") == "comparison":
        col = cond.get("column")
        name = col.get("name") if isinstance(col, dict) else col
        return f"{name} {cond.get('operator')} {cond.get('parameter')!r}"
    if isinstance(cond, dict) and cond.get("type") == "nullity":
        col = cond.get("column")
        name = col.get("name") if isinstance(col, dict) else col
        return f"{name} {'is null' if cond.get('is_null') else 'is not null'}"
    return str(cond)


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
    columns = _columns(kwargs)
    result = res.result or {}
    values = result.get("partial_unexpected_list") or ()
    meta = (cfg.meta if cfg is not None else None) or {}
    return ExpectationFailure(
        expectation=cfg.type if cfg is not None else "unknown",
        columns=columns,
        condition=_render_condition(kwargs.get("row_condition")),
        invariant=meta.get("invariant"),
        kwargs=kwargs,
        element_count=result.get("element_count"),
        unexpected_count=result.get("unexpected_count"),
        unexpected_percent=result.get("unexpected_percent"),
        unexpected_values=tuple(values[:MAX_UNEXPECTED_VALUES]),
        observed_value=result.get("observed_value"),
        error=_error(res.exception_info),
    )


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
    _check_read_model(read_model)
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
    return QualityResult(
        read_model=read_model,
        suite=suite.name,
        success=bool(outcome.success) and not failures,
        row_count=len(data),
        evaluated=len(outcome.results),
        failures=failures,
    )


# --------------------------------------------------------------------------------------------
# Reading read-model rows


def _row_dict(row: Any, columns: list[str]) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if hasattr(row, "_asdict"):
        return dict(row._asdict())
    return dict(zip(columns, row, strict=False))


def read_model_frame(
    session: Session,
    read_model: str,
    partition_keys: Iterable[Any],
    limit: int = 10_000,
    *,
    keyspace: str | None = None,
    concurrency: int = 16,
) -> pd.DataFrame:
    """Rows of the given partitions of a read model, at most ``limit`` in all (partitions in
    the order given, rows in clustering order), with every column of the table (whatever the
    schema holds now) and timestamps as tz-aware UTC."""
    from cassandra.concurrent import execute_concurrent_with_args

    from tasks.core.errors import classify
    from tasks.settings import get_settings

    _check_read_model(read_model)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
    ks = keyspace or session.keyspace or get_settings().scylla.keyspace
    if not _IDENT.match(ks):
        raise InvalidInput(f"invalid keyspace name {ks!r}")
    keys = list(dict.fromkeys(as_uuid(k, "partition key") for k in partition_keys))
    try:
        table = session.cluster.metadata.keyspaces[ks].tables[read_model]
    except KeyError:
        raise ConfigurationError(
            f"{ks}.{read_model} does not exist (migrations applied?)"
        ) from None
    columns = list(table.columns)
    # The partition key as the live schema has it (every read model has one uuid column).
    if len(table.partition_key) != 1 or table.partition_key[0].name != KEY_COLUMNS[read_model][0]:
        raise ConfigurationError(
            f"{ks}.{read_model}: partition key "
            f"{[c.name for c in table.partition_key]} is not "
            f"({KEY_COLUMNS[read_model][0]})"
        )
    pk = table.partition_key[0].name
    rows: list[dict[str, Any]] = []
    if keys:
        try:
            stmt = session.prepare(f"SELECT * FROM {ks}.{read_model} WHERE {pk} = ? LIMIT ?")
            results = execute_concurrent_with_args(
                session,
                stmt,
                [(k, limit) for k in keys],
                concurrency=concurrency,
                raise_on_first_error=True,
                results_generator=True,
            )
            for ok, rs in results:
                if not ok:  # not reached with raise_on_first_error; kept for safety
                    raise TransientError(f"reading {read_model} failed: {rs!r}")
                for row in rs:
                    rows.append(_row_dict(row, columns))
                    if len(rows) >= limit:
                        break
                if len(rows) >= limit:
                    break
        except Exception as exc:
            raise classify(exc, f"reading {len(keys)} partitions of {read_model}") from exc
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for name, col in table.columns.items():
        if col.cql_type == "timestamp":
            frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame
