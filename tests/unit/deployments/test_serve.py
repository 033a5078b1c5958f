"""deployments/prefect.yaml is the one list of deployments; deployments/serve.py serves
exactly it. Building a deployment contacts no server."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from deployments import serve

SPECS = serve.specs()


def test_every_path_has_a_deployment() -> None:
    assert {s["name"] for s in SPECS} == {"cdc", "backfill", "setup", "audit", "reconcile"}


@pytest.mark.parametrize("spec", SPECS, ids=[s["name"] for s in SPECS])
def test_each_deployment_builds_as_written(spec: dict[str, Any]) -> None:
    d = serve.build(spec)
    assert d.name == spec["name"]
    assert d.description and d.description == spec["description"]
    assert spec.get("tags") and d.tags == spec["tags"]
    assert d.concurrency_limit == spec.get("concurrency_limit")
    flow = serve.load_flow(spec["entrypoint"])
    # Parameters given in the yaml are parameters of the flow, with these defaults.
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(spec.get("parameters") or {}) <= accepted
    assert d.parameters == (spec.get("parameters") or {})
    crons = [(s.schedule.cron, s.schedule.timezone, s.parameters) for s in d.schedules or ()]
    assert crons == [
        (s["cron"], s.get("timezone"), s.get("parameters") or {})
        for s in spec.get("schedules") or ()
    ]
    for s in spec.get("schedules") or ():
        assert set(s.get("parameters") or {}) <= accepted
    assert len(d.triggers or ()) == len(spec.get("triggers") or ())
    for t in spec.get("triggers") or ():
        assert set(t.get("parameters") or {}) <= accepted


def test_a_failed_audit_triggers_reconcile_with_its_run_id() -> None:
    (reconcile,) = [s for s in SPECS if s["name"] == "reconcile"]
    (trigger,) = reconcile["triggers"]
    assert trigger["expect"] == ["cqrs.audit.failed"]
    assert trigger["parameters"] == {"audit_run": "{{ event.payload.audit_run }}"}
    from flows.audit import FAILED_EVENT

    assert FAILED_EVENT in trigger["expect"]


def test_a_crashed_consumer_is_restarted_with_its_group_and_bounds() -> None:
    """The cdc deployment's trigger: a Crashed run of it starts a run with the crashed
    run's optional parameters, rendered as the server renders them (types kept; a
    parameter the crashed run did not set is passed as None, its default)."""
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    from flows.cdc import cdc_flow

    (cdc,) = [s for s in SPECS if s["name"] == "cdc"]
    (trigger,) = cdc["triggers"]
    assert trigger["expect"] == ["prefect.flow-run.Crashed"]
    assert trigger["match_related"] == {
        "prefect.resource.role": "deployment",
        "prefect.resource.name": "cdc",
    }
    defaults = {n: p.default for n, p in inspect.signature(cdc_flow.fn).parameters.items()}
    assert all(defaults[n] is None for n in trigger["parameters"])

    crashed = {"consumer_group": "g2", "read_models": ["steps_by_turn"], "max_seconds": 30.5}
    parameters = dict(trigger["parameters"])
    RunDeployment._upgrade_v1_templates(parameters)
    rendered = hydrate(
        parameters,
        HydrationContext(
            render_jinja=True,
            raise_on_error=True,
            jinja_context={"flow_run": {"parameters": crashed}},
        ),
    )
    assert rendered == {**dict.fromkeys(trigger["parameters"]), **crashed}


def test_a_non_flow_entrypoint_is_refused() -> None:
    with pytest.raises(TypeError, match="not a Prefect flow"):
        serve.load_flow("flows/audit.py:FAILED_EVENT")
