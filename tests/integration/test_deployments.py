"""Every deployment of deployments/prefect.yaml, triggered through the Prefect API as the
UI's Run button does, while `python -m deployments.serve` serves them: setup and a reconcile
dry run reach Completed; the CDC consumer reaches Running and, cancelled on request, ends
Cancelled. (Backfill and audit runs through their deployments: test_ui.py; reconcile
triggered by a failed audit: test_audit.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelling

from deployments import serve as served

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncPrefectClient]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "CQRS_AUDIT_REPORT_DIR": str(log.parent / "audits"),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with get_client(sync_client=True) as c:
            names = [
                f"{s['entrypoint'].rsplit(':', 1)[1].removesuffix('_flow')}/{s['name']}"
                for s in served.specs()
            ]
            deadline = time.monotonic() + 90
            for name in names:
                while True:
                    try:
                        c.read_deployment_by_name(name)
                        break
                    except Exception:
                        assert proc.poll() is None, log.read_text()[-3000:]
                        assert time.monotonic() < deadline, f"{name} not served"
                        time.sleep(0.5)
            yield c
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run(client: SyncPrefectClient, deployment: str, parameters: dict[str, Any]) -> FlowRun:
    dep = client.read_deployment_by_name(deployment)
    return client.create_flow_run_from_deployment(
        dep.id, parameters=parameters, tags=["deployment-test"]
    )


def wait(
    client: SyncPrefectClient, flow_run: FlowRun, timeout_s: float, running: bool = False
) -> FlowRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run.id)
        state = flow_run.state
        if state is not None and (state.is_final() or (running and state.is_running())):
            return flow_run
        time.sleep(0.5)
    raise AssertionError(f"{flow_run.name} still {flow_run.state_name} after {timeout_s} s")


@pytest.mark.parametrize(
    ("deployment", "parameters"),
    [
        ("setup/setup", {}),
        ("reconcile/reconcile", {"read_models": ["sessions_by_id"], "dry_run": True}),
    ],
    ids=["setup", "reconcile dry run"],
)
def test_a_deployment_run_completes(
    client: SyncPrefectClient, deployment: str, parameters: dict[str, Any]
) -> None:
    done = wait(client, run(client, deployment, parameters), 180)
    assert done.state is not None and done.state.is_completed(), done.state


def test_the_cdc_deployment_runs_until_cancelled(client: SyncPrefectClient) -> None:
    # A group of its own, positioned nowhere: it starts at the topics' start, harmlessly
    # (versions as write times), and is cancelled within seconds.
    flow_run = run(client, "cdc/cdc", {"consumer_group": f"deploy-test-{uuid.uuid4().hex[:8]}"})
    running = wait(client, flow_run, 120, running=True)
    assert running.state is not None and running.state.is_running(), running.state
    time.sleep(3)
    still = client.read_flow_run(flow_run.id)
    assert still.state is not None and still.state.is_running(), still.state
    client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    done = wait(client, flow_run, 90)
    assert done.state is not None and done.state.is_cancelled(), done.state


def flow_run_pids(flow_run_id: uuid.UUID) -> list[int]:
    """The processes the runner started for this flow run (its id is in their env)."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue  # gone, or not ours to read
    return pids


def test_a_crashed_cdc_run_is_started_again_by_its_trigger(client: SyncPrefectClient) -> None:
    """SIGKILL the consumer's process: its run ends Crashed, and the deployment's trigger
    starts a new run of the same consumer group, which reaches Running."""
    group = f"deploy-test-{uuid.uuid4().hex[:8]}"
    dep = client.read_deployment_by_name("cdc/cdc")
    first = wait(client, run(client, "cdc/cdc", {"consumer_group": group}), 120, running=True)
    assert first.state is not None and first.state.is_running(), first.state
    pids = flow_run_pids(first.id)
    assert pids, "no process found for the cdc run"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    crashed = wait(client, first, 60)
    assert crashed.state is not None and crashed.state.is_crashed(), crashed.state

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + 90
    restarted: FlowRun | None = None
    while restarted is None and time.monotonic() < deadline:
        for fr in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        ):
            if fr.id != first.id and fr.parameters.get("consumer_group") == group:
                restarted = fr
        time.sleep(1)
    assert restarted is not None, "no new run of the crashed consumer's group"
    try:
        again = wait(client, restarted, 120, running=True)
        assert again.state is not None and again.state.is_running(), again.state
        assert again.parameters["consumer_group"] == group
    finally:
        client.set_flow_run_state(restarted.id, Cancelling(), force=True)
        done = wait(client, restarted, 90)
    assert done.state is not None and done.state.is_cancelled(), done.state
