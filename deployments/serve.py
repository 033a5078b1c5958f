"""Serve every deployment from this one process against the configured Prefect server:

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve

Runs triggered from the UI execute here. For production, register deployments/prefect.yaml
on a work pool and start workers on as many machines as needed instead.

The deployments served are read from deployments/prefect.yaml, the one list of them: name,
entrypoint, description, tags, parameters, schedules, triggers and concurrency limit, so
serving locally and registering on a work pool cannot drift apart.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Final

import yaml
from prefect import Flow, serve
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

PREFECT_YAML: Final = Path(__file__).resolve().parent / "prefect.yaml"


def specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments of prefect.yaml, as written."""
    return list(yaml.safe_load(path.read_text())["deployments"])


def load_flow(entrypoint: str) -> Flow[Any, Any]:
    """``flows/audit.py:audit_flow`` → the flow object."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    if not isinstance(flow, Flow):
        raise TypeError(f"{entrypoint} is not a Prefect flow")
    return flow


def build(spec: dict[str, Any]) -> Any:
    """One deployment of prefect.yaml as a servable deployment."""
    schedules = [
        Cron(s["cron"], timezone=s.get("timezone"), parameters=s.get("parameters"))
        for s in spec.get("schedules") or ()
    ]
    triggers: list[Any] = [DeploymentEventTrigger(**t) for t in spec.get("triggers") or ()]
    # to_deployment is sync/async-compatible; called from sync code it returns the deployment.
    return load_flow(spec["entrypoint"]).to_deployment(
        name=spec["name"],
        description=spec.get("description"),
        tags=spec.get("tags"),
        parameters=spec.get("parameters"),
        schedules=schedules or None,
        triggers=triggers or None,
        concurrency_limit=spec.get("concurrency_limit"),
    )


def main() -> None:
    serve(*(build(s) for s in specs()))


if __name__ == "__main__":
    main()
