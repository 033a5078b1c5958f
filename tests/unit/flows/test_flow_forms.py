"""What the Prefect UI's run form shows for each flow with parameters: every parameter has
the description --help gives, and a default that means what the parameter model's does."""

from __future__ import annotations

import inspect
from pathlib import PurePath
from typing import Any

import pytest
from pydantic import BaseModel

from flows.audit import audit_flow
from flows.backfill import backfill_flow
from flows.reconcile import reconcile_flow
from tasks.audit.params import AuditParams, ReconcileParams
from tasks.backfill.params import BackfillParams

FLOWS: list[tuple[Any, type[BaseModel]]] = [
    (backfill_flow, BackfillParams),
    (audit_flow, AuditParams),
    (reconcile_flow, ReconcileParams),
]


@pytest.mark.parametrize(("flow", "model"), FLOWS, ids=lambda x: getattr(x, "name", ""))
def test_every_parameter_is_described_in_the_ui(flow: Any, model: type[BaseModel]) -> None:
    props = flow.parameters.model_dump()["properties"]
    assert set(props) == set(model.model_fields)
    for name, schema in props.items():
        described = " ".join((model.model_fields[name].description or "").split())
        assert described and schema.get("description") == described, name


@pytest.mark.parametrize(("flow", "model"), FLOWS, ids=lambda x: getattr(x, "name", ""))
def test_form_defaults_mean_the_models_defaults(flow: Any, model: type[BaseModel]) -> None:
    for name, p in inspect.signature(flow.fn).parameters.items():
        wanted = model.model_fields[name].get_default()
        if p.default is None:
            continue  # None: "the default", which the model supplies
        if isinstance(wanted, tuple):
            wanted = list(wanted)
        if isinstance(wanted, PurePath):
            wanted = str(wanted)
        assert p.default == wanted, f"{flow.name}.{name}: form {p.default!r}, model {wanted!r}"
