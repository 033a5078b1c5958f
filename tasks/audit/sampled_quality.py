"""The audit's quality pass on a sample of read-model partitions (issue #11, deliverable 3):
each sampled read model's rows validated by its expectation suite (tasks/audit/quality.py),
the cross-model checks (tasks/audit/cross_model.py) on the sampled keys, and GX Data Docs of
the validations as static HTML in a folder the audit report names. Plain functions: the audit
flow wraps them.

Data Docs: each build uses a short-lived ephemeral GX context of its own, with in-memory
stores holding just this pass's suites and results and one site whose store backend is a
``TupleFilesystemStoreBackend`` at the folder. So the validation context of quality.py never
accumulates results across audits, and a site shows exactly the validations it was built for
(GX removes pages of results it no longer has). The context is built directly, not with
``gx.get_context``, which would also make it GX's "current" context for the whole process.
Nothing goes over the network; the pages link their CSS and JavaScript from public CDNs, which
only a browser viewing them fetches.
"""

from __future__ import annotations

import copy
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from tasks.audit.cross_model import (
    CrossModelFailure,
    chunks,
    cross_keys,
    cross_model_failures,
    recheck_keys,
)
from tasks.audit.quality import QualityResult, Validation, run_validation
from tasks.audit.rows import read_model_frame
from tasks.audit.suites import check_read_model
from tasks.core.cql import check_keyspace
from tasks.core.errors import InvalidInput, TerminalError
from tasks.core.write_policy import as_uuid

if TYPE_CHECKING:
    from cassandra.cluster import Session

__all__ = [
    "CrossModelFailure",
    "QualityPass",
    "build_data_docs",
    "cross_model_failures",
    "read_sample",
    "recheck_keys",
    "validate_samples",
]

log = logging.getLogger(__name__)

# Partitions read at once. The driver buffers up to one page per partition in flight beyond
# the rows kept, so this, not the table, bounds the overshoot of max_rows.
READ_CHUNK: Final = 16
DEFAULT_MAX_CROSS_KEYS: Final = 1000  # sessions (and agent turns) cross-checked per pass


@dataclass(frozen=True)
class QualityPass:
    results: Mapping[str, QualityResult]  # per read model validated
    cross_model: tuple[CrossModelFailure, ...]
    data_docs_index: Path | None  # None: not built (no rows validated, or data_docs_error)
    rows_validated: Mapping[str, int]
    data_docs_error: str | None = None  # why the Data Docs could not be built
    cross_model_keys: Mapping[str, int] | None = None  # session_id / agent_turn_id keys checked
    seconds: Mapping[str, float] | None = None  # read, validate, cross_model, data_docs

    @property
    def success(self) -> bool:
        return not self.cross_model and all(r.success for r in self.results.values())


# --------------------------------------------------------------------------------------------
# Data Docs


SITE_NAME: Final = "cqrs_audit"
INDEX_PAGE: Final = "index.html"
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_run_name(run_name: str) -> str:
    """``run_name`` as one path segment (GX puts it in the result pages' paths)."""
    name = _UNSAFE.sub("_", run_name).strip("._")
    if not name:
        raise InvalidInput(f"run name {run_name!r} has no usable characters")
    return name[:100]


def site_config(directory: Path) -> dict[str, Any]:
    """The Data Docs site: static HTML files under ``directory``, no "how to" buttons (they
    point at GX's hosted docs and setup commands, which mean nothing to an audit reader)."""
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(directory),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


def _context(directory: Path) -> Any:
    from great_expectations.data_context import EphemeralDataContext
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={SITE_NAME: site_config(directory)},
        analytics_enabled=False,  # besides GX_ANALYTICS_ENABLED=false (tasks/audit/suites.py)
    )
    return EphemeralDataContext(project_config=config)


def build_data_docs(
    directory: Path,
    validations: Sequence[Validation],
    *,
    run_name: str,
    run_time: datetime | None = None,
) -> Path:
    """Write Data Docs for ``validations`` (one per read model) into ``directory`` (created
    if missing) and return the path of its index page. A page GX failed to render raises
    TerminalError (GX itself only logs such errors)."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    names = [v.suite.name for v in validations]
    if len(set(names)) != len(names):
        raise InvalidInput(f"one validation per suite, got suites {names}")
    if run_time is None:
        run_time = datetime.now(UTC)
    elif run_time.utcoffset() is None:
        raise InvalidInput("run_time must be timezone-aware")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    context = _context(directory)
    run_id = RunIdentifier(run_name=safe_run_name(run_name), run_time=run_time)
    pages: list[Path] = []
    for v in validations:
        # A copy: adding a suite to a context binds it there, and the caller keeps its own.
        context.suites.add(copy.deepcopy(v.suite))
        result = copy.deepcopy(v.gx_result)
        # What ValidationDefinition.run records; batch.validate (quality.py) leaves it out.
        result.meta["run_id"] = run_id
        result.meta["validation_time"] = run_id.run_time
        suite_id = ExpectationSuiteIdentifier(name=v.suite.name)
        key = ValidationResultIdentifier(
            expectation_suite_identifier=suite_id,
            run_id=run_id,
            batch_identifier=v.result.read_model,
        )
        context.validation_results_store.set(key, result)
        pages.append(directory / "expectations" / f"{v.suite.name}.html")
        pages.append(
            directory.joinpath("validations", *key.to_tuple()[:-1], f"{key.to_tuple()[-1]}.html")
        )
    context.build_data_docs(site_names=[SITE_NAME])
    index = directory / INDEX_PAGE
    missing = [str(p.relative_to(directory)) for p in (index, *pages) if not p.is_file()]
    if missing:
        raise TerminalError(
            f"Data Docs in {directory}: GX did not render {missing} (its log says why)"
        )
    return index


# --------------------------------------------------------------------------------------------
# The pass


def read_sample(
    session: Session, keyspace: str, read_model: str, keys: Sequence[Any], max_rows: int
) -> pd.DataFrame:
    """Rows of the sampled partitions (in the order given), at most ``max_rows``: READ_CHUNK
    partitions at a time, each limited to the rows still wanted. Memory holds at most about
    2 x max_rows rows (the chunks, then their concatenation) plus READ_CHUNK pages in flight,
    whatever the tables and partitions hold."""
    unique = list(dict.fromkeys(as_uuid(k, "partition key") for k in keys))
    frames: list[pd.DataFrame] = []
    total = 0
    for chunk in chunks(unique, READ_CHUNK):
        if total >= max_rows:
            break
        frame = read_model_frame(
            session, read_model, chunk, max_rows - total, keyspace=keyspace, concurrency=READ_CHUNK
        )
        frames.append(frame)
        total += len(frame)
    filled = [f for f in frames if len(f)]
    if not filled:  # still the table's columns, for a validation of no rows
        return (
            frames[0] if frames else read_model_frame(session, read_model, [], 1, keyspace=keyspace)
        )
    return pd.concat(filled, ignore_index=True) if len(filled) > 1 else filled[0]


def validate_samples(
    session: Session,
    keyspace: str,
    samples: Mapping[str, Sequence[uuid.UUID]],
    *,
    max_rows: int,
    data_docs_dir: Path,
    now: datetime | None = None,
    run_name: str = "audit",
    max_cross_keys: int = DEFAULT_MAX_CROSS_KEYS,
) -> QualityPass:
    """Validate each sampled read model's rows (at most ``max_rows`` each, one model in memory
    at a time), run the cross-model checks on the sampled keys and build Data Docs of the
    validations into ``data_docs_dir``. ``max_rows`` 0 validates nothing (the cross-model
    checks still run). A Data Docs build that fails is reported in ``data_docs_error``, not
    raised: the checks' results matter more than their pages."""
    ks = check_keyspace(keyspace)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
        raise InvalidInput(f"max_rows must be a non-negative integer, got {max_rows!r}")
    for read_model in samples:
        check_read_model(read_model)
    run_name = safe_run_name(run_name)
    now = now or datetime.now(UTC)
    seconds = dict.fromkeys(("read", "validate", "cross_model", "data_docs"), 0.0)
    validations: list[Validation] = []
    recent_sessions: list[Any] = []
    for read_model, keys in samples.items() if max_rows else ():
        t0 = time.perf_counter()
        frame = read_sample(session, ks, read_model, keys, max_rows)
        t1 = time.perf_counter()
        validations.append(run_validation(read_model, frame, now=now))
        seconds["read"] += t1 - t0
        seconds["validate"] += time.perf_counter() - t1
        if read_model == "recent_conversations":
            recent_sessions = frame["session_id"].dropna().unique().tolist()[:max_cross_keys]
        del frame  # the next model's rows replace this one's
    t0 = time.perf_counter()
    session_ids, turn_ids = cross_keys(samples, recent_sessions, max_cross_keys)
    cross = cross_model_failures(session, ks, session_ids, turn_ids)
    seconds["cross_model"] = time.perf_counter() - t0
    index: Path | None = None
    error: str | None = None
    if validations:
        t0 = time.perf_counter()
        try:
            index = build_data_docs(
                Path(data_docs_dir), validations, run_name=run_name, run_time=now
            )
        except Exception as exc:  # GX raises its own, pydantic's and OS errors
            error = f"{type(exc).__name__}: {exc}"
            log.warning("Data Docs not built in %s: %s", data_docs_dir, error)
        seconds["data_docs"] = time.perf_counter() - t0
    return QualityPass(
        results={v.result.read_model: v.result for v in validations},
        cross_model=tuple(cross),
        data_docs_index=index,
        rows_validated={v.result.read_model: v.result.row_count for v in validations},
        data_docs_error=error,
        cross_model_keys={"session_id": len(session_ids), "agent_turn_id": len(turn_ids)},
        seconds=seconds,
    )
