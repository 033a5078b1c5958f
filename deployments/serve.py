"""Serve every deployment from this one process against the configured Prefect server:

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve

Runs triggered from the UI execute here. For production, register deployments/prefect.yaml
on a work pool and start workers on as many machines as needed instead.
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.audit import FAILED_EVENT, audit_flow
from flows.backfill import backfill_flow
from flows.cdc import cdc_flow
from flows.reconcile import reconcile_flow
from flows.setup import setup_flow
from tasks.core.catalog import READ_MODELS


def main() -> None:
    # to_deployment is sync/async-compatible; called from sync code it returns the deployment.
    deployments: list[Any] = [
        cdc_flow.to_deployment(name="cdc", parameters={"report_interval_s": 10}),
        backfill_flow.to_deployment(name="backfill"),
        setup_flow.to_deployment(name="setup"),
        audit_flow.to_deployment(
            name="audit", schedule=Cron("17 * * * *", timezone="UTC"), tags=["audit"]
        ),
        reconcile_flow.to_deployment(
            name="reconcile",
            schedule=Cron(
                "43 3 * * *", timezone="UTC", parameters={"read_models": list(READ_MODELS)}
            ),
            triggers=[
                DeploymentEventTrigger(
                    expect={FAILED_EVENT},
                    match={"prefect.resource.id": "cqrs.audit.*"},
                    parameters={"audit_run": "{{ event.payload.audit_run }}"},
                )
            ],
            tags=["reconcile"],
        ),
    ]
    serve(*deployments)


if __name__ == "__main__":
    main()
