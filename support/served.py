"""The deployments served locally, driven through the Prefect API as the UI would (demo support).

- :func:`ensure_served` starts ``python -m deployments.serve`` in a session of its own (it
  outlives the caller; its log in .stack/logs/deployments-serve.log, its pid in
  .stack/run/deployments-serve.pid), or reuses the one a previous call started;
- :func:`start_run` creates a flow run of a deployment (what a click on "Run" does) and
  :func:`wait_for` follows its state;
- :func:`stop_served` cancels the active runs a tag marks and stops the serving process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelling

from tasks.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
SERVE_LOG = ROOT / ".stack" / "logs" / "deployments-serve.log"
SERVE_PID = ROOT / ".stack" / "run" / "deployments-serve.pid"
ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


def ui_url(run_id: uuid.UUID | str | None = None) -> str:
    """The Prefect UI, or one flow run's page in it."""
    ui = get_settings().prefect_api_url.rstrip("/").removesuffix("/api")
    return ui if run_id is None else f"{ui}/runs/flow-run/{run_id}"


def serving_pid() -> int | None:
    """The pid of the ``deployments.serve`` process started here, if it is still alive."""
    try:
        pid = int(SERVE_PID.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"deployments.serve" in cmdline else None


def ensure_served(deployments: Iterable[str], timeout_s: float = 120) -> tuple[int, bool]:
    """(pid, started now) of the process serving prefect.yaml's deployments, once each of
    ``deployments`` ("flow/deployment") is registered with the server."""
    pid = serving_pid()
    started = pid is None
    if pid is None:
        SERVE_LOG.parent.mkdir(parents=True, exist_ok=True)
        SERVE_PID.parent.mkdir(parents=True, exist_ok=True)
        # Runs are picked up within 2 s instead of the default 10 s (unless set otherwise).
        env = {"PREFECT_RUNNER_POLL_FREQUENCY": "2", **os.environ, "CQRS_SYNC_HOME": str(ROOT)}
        with SERVE_LOG.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deployments.serve"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: it outlives the caller
            )
        pid = proc.pid
        SERVE_PID.write_text(str(pid))
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        for name in deployments:
            while True:
                with contextlib.suppress(Exception):
                    client.read_deployment_by_name(name)
                    break
                if time.monotonic() > deadline or serving_pid() != pid:
                    raise RuntimeError(f"deployment {name} is not served; see {SERVE_LOG}")
                time.sleep(0.5)
    return pid, started


def start_run(
    client: SyncPrefectClient,
    deployment: str,
    parameters: dict[str, Any] | None = None,
    tags: Iterable[str] = (),
) -> FlowRun:
    """What a click on "Run" in the UI does: a flow run of the deployment, which the process
    serving it picks up."""
    dep = client.read_deployment_by_name(deployment)
    return client.create_flow_run_from_deployment(dep.id, parameters=parameters, tags=list(tags))


def wait_for(
    client: SyncPrefectClient, run: FlowRun, timeout_s: float, until: str = "final"
) -> FlowRun:
    """The run once in a final state (``until="final"``) or running or final ("running");
    TimeoutError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.read_flow_run(run.id)
        state = run.state
        if state is not None and (state.is_final() or (until == "running" and state.is_running())):
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run.name} still {run.state_name} after {timeout_s} s")
        time.sleep(0.5)


def active_runs(
    client: SyncPrefectClient,
    deployment: str | None = None,
    tags: Iterable[str] = (),
    states: Iterable[StateType] = ACTIVE,
) -> list[FlowRun]:
    """Flow runs in ``states`` (scheduled, pending, running), of a deployment, with all of
    ``tags``."""
    dep = client.read_deployment_by_name(deployment) if deployment else None
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))),
            tags=FlowRunFilterTags(all_=list(tags)) if tags else None,
        ),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])) if dep else None,
    )


def table_artifact(client: SyncPrefectClient, run_id: uuid.UUID, key: str) -> list[Any]:
    """The rows of a run's table artifact (its latest version), or []."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[key])
        )
    )
    data = found[-1].data if found else None
    if isinstance(data, str):
        data = json.loads(data)
    return list(data) if isinstance(data, list) else []


def stop_served(tags: Iterable[str], timeout_s: float = 30) -> list[str]:
    """Cancel the active runs with ``tags`` (a CDC run commits its offsets and ends
    Cancelled), then stop the serving process started here (SIGTERM to its process group).
    What was done, as sentences."""
    done = []
    with get_client(sync_client=True) as client:
        for run in active_runs(client, tags=tags):
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            done.append(f"cancelling flow run {run.name} ({ui_url(run.id)})")
        # The serving process stops each one (SIGTERM); a CDC run commits and ends Cancelled.
        deadline, ending = time.monotonic() + timeout_s, [*ACTIVE, StateType.CANCELLING]
        while active_runs(client, tags=tags, states=ending) and time.monotonic() < deadline:
            time.sleep(1)
    pid = serving_pid()
    if pid is None:
        done.append("no deployments.serve process started by a demo is running")
        return done
    os.killpg(pid, signal.SIGTERM)
    SERVE_PID.unlink(missing_ok=True)
    done.append(f"stopped the deployments.serve process (process group {pid})")
    return done
