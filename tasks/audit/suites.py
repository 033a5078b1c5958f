"""The expectation suites of the read models: one per read model in
``expectations/<read_model>.json`` (GX 1.x suite JSON), loaded and checked here.

- The suites hold invariants only, no environment: values that depend on the clock or the
  configuration are suite parameters (``{"$PARAMETER": name}``) supplied at validation time
  by :func:`default_parameters` (``max_timestamp`` = now + the allowed clock skew, and the
  write API's text limits from :class:`~tasks.core.write_policy.DualWritePolicy`).
- Suites name the columns they check, never a table's full column list, so a column added to
  a read model later (e.g. a clustering column) does not break them.
- GX is imported lazily (the import takes seconds): only :func:`load_suite` and the validation
  (tasks/audit/quality.py) need it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from tasks.core.catalog import READ_MODELS
from tasks.core.errors import ConfigurationError, InvalidInput

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite

# GX reads this when it decides whether to send usage statistics. GX itself is imported lazily
# (below, after this line ran); 1.24 ships without an analytics client, and the ephemeral
# context never phones home, but say so anyway in case a later 1.x brings one back.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

EXPECTATIONS_DIR: Final = Path(__file__).resolve().parents[2] / "expectations"
DEFAULT_CLOCK_SKEW: Final = timedelta(minutes=5)


def gx() -> Any:
    """The ``great_expectations`` module, imported on first use."""
    import great_expectations

    return great_expectations


def check_read_model(read_model: str) -> str:
    """``read_model`` if the catalog has it, InvalidInput otherwise."""
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

    check_read_model(read_model)
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
        return gx().ExpectationSuite(**doc, expectations=expectations)
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

    walk(_suite_document(check_read_model(read_model), directory)["expectations"])
    return frozenset(found)


def expectation_names(read_model: str, directory: Path = EXPECTATIONS_DIR) -> tuple[str, ...]:
    """The names of the suite's expectations, as
    :attr:`tasks.audit.quality.ExpectationFailure.name` gives them."""
    doc = _suite_document(check_read_model(read_model), directory)
    return tuple(
        expectation_name(
            e.get("type", "unknown"),
            columns_of(e.get("kwargs") or {}),
            render_condition((e.get("kwargs") or {}).get("row_condition")),
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
# Names of expectations, as results and tests show them


def expectation_name(expectation: str, columns: tuple[str, ...], condition: str | None) -> str:
    where = f" where {condition}" if condition else ""
    return f"{expectation}({', '.join(columns)}{where})"


def columns_of(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    if "column_list" in kwargs:
        return tuple(kwargs["column_list"])
    if "column" in kwargs:
        return (kwargs["column"],)
    if "column_A" in kwargs and "column_B" in kwargs:
        return (kwargs["column_A"], kwargs["column_B"])
    return ()


def render_condition(cond: Any) -> str | None:
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
