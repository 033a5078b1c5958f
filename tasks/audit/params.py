"""The audit and reconcile flows' parameters, checked before any work (a bad one fails the run
with a message naming it, before anything is read or written)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.catalog import READ_MODELS, read_models_named
from tasks.core.errors import ConfigurationError, describe_invalid

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class AuditParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    read_models: tuple[str, ...] = Field(
        READ_MODELS, description=f"read models to audit (default: all of {list(READ_MODELS)})"
    )
    freshness_window_s: float | None = Field(
        None,
        ge=0,
        le=3600,
        description="re-check a difference once after this many seconds when its source "
        "changed this recently (default: derived from the CDC consumer's lag)",
    )
    quality: bool = Field(
        True, description="also validate sampled rows with the expectation suites (GX)"
    )
    reconcile_on_drift: bool = Field(
        False, description="when the audit finds differences, run reconcile on them at once"
    )
    max_differences: int | None = Field(
        None, ge=0, description="differences tolerated before the audit fails (default: 0)"
    )

    @field_validator("read_models", mode="before")
    @classmethod
    def _read_models(cls, v: Any) -> Any:
        return read_models_named(v)


class ReconcileParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    audit_run: str | None = Field(
        None, description="repair the differences this audit run found (its run id)"
    )
    partitions: tuple[str, ...] | None = Field(
        None,
        description="repair these partitions, each 'read_model:partition_key' "
        "(e.g. sessions_by_id:5b0c...)",
    )
    read_models: tuple[str, ...] | None = Field(
        None, description="diff these whole read models now and repair what differs"
    )
    dry_run: bool = Field(False, description="report what would change, change nothing")
    max_keys: int | None = Field(
        None, ge=1, description="rows repaired per run at most (default: the setting, 10000)"
    )

    @field_validator("read_models", mode="before")
    @classmethod
    def _read_models(cls, v: Any) -> Any:
        return None if v is None else read_models_named(v)

    @field_validator("audit_run")
    @classmethod
    def _audit_run(cls, v: str | None) -> str | None:
        if v is not None and not _RUN_ID.fullmatch(v):
            raise ValueError(f"{v!r} is not an audit run id (letters, digits, '-', '_', '.')")
        return v

    @field_validator("partitions", mode="before")
    @classmethod
    def _partitions(cls, v: Any) -> Any:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else list(v)
        if not items:
            raise ValueError("must name at least one partition (or omit it)")
        for item in items:
            model, _, key = str(item).partition(":")
            if model not in READ_MODELS:
                raise ValueError(
                    f"{item!r}: unknown read model {model!r}; known: {list(READ_MODELS)}"
                )
            try:
                uuid.UUID(key)
            except ValueError:
                raise ValueError(f"{item!r}: {key!r} is not a uuid partition key") from None
        return tuple(items)

    @model_validator(mode="after")
    def _one_target(self) -> ReconcileParams:
        given = [n for n in ("audit_run", "partitions", "read_models") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                "name exactly one of audit_run, partitions, read_models"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    def partition_keys(self) -> dict[str, list[uuid.UUID]]:
        out: dict[str, list[uuid.UUID]] = {}
        for item in self.partitions or ():
            model, _, key = item.partition(":")
            out.setdefault(model, []).append(uuid.UUID(key))
        return out


def validate_audit(params: Mapping[str, Any]) -> AuditParams:
    try:
        return AuditParams.model_validate({k: v for k, v in params.items() if v is not None})
    except ValidationError as exc:
        raise ConfigurationError(describe_invalid(exc, "invalid audit parameters")) from None


def validate_reconcile(params: Mapping[str, Any]) -> ReconcileParams:
    try:
        return ReconcileParams.model_validate({k: v for k, v in params.items() if v is not None})
    except ValidationError as exc:
        raise ConfigurationError(describe_invalid(exc, "invalid reconcile parameters")) from None
