"""The Prefect UI in a real browser (issue #12): headless Chromium, driven by Playwright, on the
local stack's Prefect server while deployments/serve.py serves every deployment.

Runs are created through the deployments as the UI's "Run" button does (a small real backfill
of a few users, an audit), then the browser checks what an operator sees: every deployment of
deployments/prefect.yaml listed, the backfill's progress and summary artifacts on its run page,
the audit's markdown report, and a dry-run backfill started from the deployment's custom run
form, which the served deployment then runs to completion.

Each step is saved as a full-page screenshot in docs/screenshots/ (the README's UI tour).

Chromium is Debian's package (`apt-get install chromium`; .ci/run installs it), driven by the
`playwright` Python package from the dev extras; Playwright's own browser download is not used.
Without either the test fails, naming what is missing: it is never skipped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import psycopg
import pytest

from deployments.serve import specs
from tasks.settings import get_settings
from tests.integration import readmodels
from tests.integration.test_oracle import write_varied_data

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page, ViewportSize

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path(os.environ.get("CQRS_TEST_CHROMIUM", "/usr/bin/chromium"))
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}
MAX_SHOT_HEIGHT = 4000  # px: a full-page shot taller than this is cut (the audit's long tables)
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NAMES = [s["name"] for s in specs()]


def _api() -> str:
    return get_settings().prefect_api_url.rstrip("/")


def _ui() -> str:
    """The UI is served by the same server as the API, at its root."""
    return _api().removesuffix("/api")


def _deployments() -> dict[str, dict[str, Any]]:
    """The served deployments by name (this project's flows name their deployments alike)."""
    r = httpx.post(f"{_api()}/deployments/filter", json={"limit": 200}, timeout=10)
    r.raise_for_status()
    return {d["name"]: d for d in r.json() if d["name"] in NAMES}


def _flow_run(run_id: str) -> dict[str, Any]:
    r = httpx.get(f"{_api()}/flow_runs/{run_id}", timeout=10)
    r.raise_for_status()
    return dict(r.json())


def _create_run(deployment_id: str, parameters: dict[str, Any]) -> str:
    """What the UI's "Run" does: a flow run of the deployment, picked up by serve.py."""
    r = httpx.post(
        f"{_api()}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": parameters, "tags": ["ui-test"]},
        timeout=10,
    )
    r.raise_for_status()
    return str(r.json()["id"])


def _wait_final(run_id: str, timeout_s: float, log: Path) -> dict[str, Any]:
    done = readmodels.wait_for(lambda: _flow_run(run_id)["state_type"] in FINAL, timeout_s, 1.0)
    run = _flow_run(run_id)
    assert done, f"run {run['name']} still {run['state_name']} after {timeout_s} s\n{_tail(log)}"
    return run


def _artifacts(run_id: str) -> dict[str, dict[str, Any]]:
    """The newest artifact of each key of a run (its task runs' artifacts included)."""
    r = httpx.post(
        f"{_api()}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "sort": "CREATED_DESC"},
        timeout=10,
    )
    r.raise_for_status()
    newest: dict[str, dict[str, Any]] = {}
    for a in r.json():
        if a.get("key"):
            newest.setdefault(a["key"], a)
    return newest


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "serve.py's output, last lines:\n" + "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# The browser


def _launch_chromium() -> Any:
    """Playwright and Debian's Chromium, or a failure that says what to install."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's package "
            "(`apt-get install -y chromium`, as .ci/run does), or point CQRS_TEST_CHROMIUM "
            "at a Chromium binary. The UI test is never skipped.",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing: pip install -e '.[dev]' (do not run "
            "`playwright install`: the test drives Debian's Chromium)",
            pytrace=False,
        )
    return sync_playwright()


@pytest.fixture()
def page() -> Iterator[Page]:
    with _launch_chromium() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            pg = context.new_page()
            pg.set_default_timeout(30_000)
            yield pg
        finally:
            browser.close()


def _shot(page: Page, name: str) -> None:
    """A full-page screenshot. The UI scrolls inside a container, not the document, so the
    viewport is grown to the container's content for the shot, then set back."""
    page.wait_for_load_state("networkidle")
    overflow = page.evaluate(
        """() => {
            let most = 0;
            for (const el of document.querySelectorAll('*')) {
                const y = getComputedStyle(el).overflowY;
                if ((y === 'auto' || y === 'scroll') && el.clientHeight > 200)
                    most = Math.max(most, el.scrollHeight - el.clientHeight);
            }
            return most;
        }"""
    )
    height = min(VIEWPORT["height"] + int(overflow), MAX_SHOT_HEIGHT)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.wait_for_timeout(500)  # the layout (and the run graph) settles at the new size
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
    page.set_viewport_size(VIEWPORT)


def _tab(page: Page, name: str) -> None:
    """A tab of a run or deployment page (Prefect's tabs are list items in a tablist)."""
    page.get_by_role("tablist").get_by_text(name, exact=True).click()


def _field(page: Page, label: str, role: Literal["switch", "textbox"]) -> Locator:
    """The input of a form field: in the innermost element holding both the field's label and
    an input of that role (the UI does not tie its labels to the inputs for assistive
    technology, so get_by_label finds nothing)."""
    around = (
        page.locator("div")
        .filter(has=page.get_by_text(label, exact=True))
        .filter(has=page.get_by_role(role))
        .last
    )
    return around.get_by_role(role)


def _set_switch(page: Page, parameter: str, on: bool) -> None:
    switch = _field(page, f"{parameter} (Optional)", "switch")
    switch.scroll_into_view_if_needed()
    from playwright.sync_api import expect

    if (switch.get_attribute("aria-checked") == "true") != on:
        switch.click()
    expect(switch).to_have_attribute("aria-checked", "true" if on else "false")


# --------------------------------------------------------------------------------------------
# The test


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Path]:
    """deployments/serve.py in its own session, until the test ends; yields its log file."""
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "CQRS_AUDIT_REPORT_DIR": str(tmp_path / "audits"),
        # The consumer is not running here: no 2-minute wait for lag that never drains.
        "CQRS_AUDIT_FRESHNESS_WINDOW_S": "1",
    }
    started = datetime.now(UTC)
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # serve.py upserts every deployment, then polls for their runs: READY.
        ready = readmodels.wait_for(
            lambda: (
                {n for n, d in _deployments().items() if d.get("status") == "READY"} == set(NAMES)
            ),
            90,
            1.0,
        )
        assert server.poll() is None, f"serve.py exited {server.returncode}\n{_tail(log)}"
        assert ready, f"not every deployment is ready: {_deployments().keys()}\n{_tail(log)}"
        yield log
        _settle(started)  # a reconcile a failed audit triggered, say
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def _settle(since: datetime, timeout_s: float = 90) -> None:
    """Best effort: let runs of the served deployments started during the test end before
    serve.py is stopped, so none is left Running for ever in the UI."""
    ids = [d["id"] for d in _deployments().values()]

    def busy() -> bool:
        r = httpx.post(
            f"{_api()}/flow_runs/filter",
            json={
                "flow_runs": {
                    "deployment_id": {"any_": ids},
                    "state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}},
                    "start_time": {"after_": since.isoformat()},
                }
            },
            timeout=10,
        )
        r.raise_for_status()
        return bool(r.json())

    readmodels.wait_for(lambda: not busy(), timeout_s, 1.0)


def test_the_prefect_ui_shows_deployments_runs_artifacts_and_starts_a_custom_run(
    served: Path, page: Page, pg_app: psycopg.Connection[Any], tmp_path: Path
) -> None:
    deployments = _deployments()

    # Runs through the deployments: a small real backfill of a few users, an audit.
    data = write_varied_data(pg_app)
    backfill_id = _create_run(
        deployments["backfill"]["id"],
        {
            "user_ids": [str(u) for u in data.users],
            "chunk_size": 3,  # a few chunks: the progress artifacts move
            "resume": False,
            "snapshot_root": str(tmp_path / "snapshots"),
        },
    )
    backfill = _wait_final(backfill_id, 180, served)
    assert backfill["state_type"] == "COMPLETED", (backfill["state"], _tail(served))
    keys = _artifacts(backfill_id)
    assert {"backfill-snapshot-progress", "backfill-load-progress", "backfill-summary"} <= set(
        keys
    ), keys.keys()

    audit_id = _create_run(
        deployments["audit"]["id"], {"read_models": ["sessions_by_id"], "quality": True}
    )
    # Failed is fine here: drift other tests left behind fails it, and the report is there.
    audit = _wait_final(audit_id, 240, served)
    assert audit["state_type"] in {"COMPLETED", "FAILED"}, (audit["state"], _tail(served))
    assert "audit-report" in _artifacts(audit_id)

    ui = _ui()

    # 1. The deployments page lists every deployment of prefect.yaml.
    page.goto(f"{ui}/deployments")
    for name in NAMES:
        links = page.get_by_role("link", name=name, exact=True)  # the deployment, its flow
        links.first.wait_for()
        hrefs = {links.nth(i).get_attribute("href") for i in range(links.count())}
        assert f"/deployments/deployment/{deployments[name]['id']}" in hrefs, (name, hrefs)
    page.get_by_text("Ready", exact=True).first.wait_for()
    _shot(page, "deployments.png")

    # 2. The backfill's run: its artifacts (the summary table on the flow run; the progress
    # bar and the rows / rate / ETA table on the load task's run), each opened.
    page.goto(f"{ui}/runs/flow-run/{backfill_id}")
    page.get_by_text(backfill["name"], exact=True).first.wait_for()
    page.get_by_text("Completed", exact=True).first.wait_for()
    _tab(page, "Artifacts")
    page.get_by_role("link", name="backfill-summary").first.wait_for()
    _shot(page, "backfill-run.png")
    page.get_by_role("link", name="backfill-summary").first.click()
    page.get_by_role("columnheader", name="rows_written").wait_for()
    for read_model in ("recent_conversations", "sessions_by_id", "steps_by_turn"):
        page.get_by_role("table").get_by_text(read_model, exact=True).first.wait_for()
    _shot(page, "backfill-summary.png")

    page.goto(f"{ui}/runs/flow-run/{backfill_id}")
    _tab(page, "Task Runs")
    page.get_by_role("link", name="load_snapshot").first.click()
    page.get_by_text("Task inputs").wait_for()  # the task run's page
    _tab(page, "Artifacts")
    page.get_by_role("link", name="backfill-load-progress").click()
    page.get_by_text("Progress: 100%").wait_for()
    _shot(page, "backfill-load-progress.png")
    page.go_back()
    # The load's last rows / rate / ETA report (the same key holds one per update).
    last = keys["backfill-progress"]
    assert last["description"] == "backfill load: rows, rate, ETA", last
    page.get_by_role("link", name="backfill-progress").first.wait_for()
    page.locator(f'a[href="/artifacts/artifact/{last["id"]}"]').click()
    page.get_by_role("heading", name="Backfill load").wait_for()
    chunks = page.get_by_role("row", name=re.compile(r"^chunks ")).get_by_role("cell").nth(1)
    done, _, total = chunks.inner_text().partition(" / ")
    assert done == total != "", f"the last report says chunks {done} / {total}"
    _shot(page, "backfill-progress.png")

    # 3. The audit's report, as markdown.
    page.goto(f"{ui}/runs/flow-run/{audit_id}")
    page.get_by_text(audit["name"], exact=True).first.wait_for()
    _tab(page, "Artifacts")
    page.get_by_role("link", name="audit-report").first.click()
    page.get_by_role("heading", name=f"Audit {audit_id}").wait_for()
    page.get_by_role("cell", name="sessions_by_id", exact=True).first.wait_for()
    page.get_by_role("heading", name="Freshness").wait_for()
    _shot(page, "audit-report.png")

    # 4. A dry run from the backfill deployment's custom run form. resume off as well: the
    # plan is of a new snapshot, whatever snapshots/ holds on this machine.
    page.goto(f"{ui}/deployments/deployment/{deployments['backfill']['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("link", name="Custom run").click()
    page.get_by_role("heading", name="Parameters").wait_for()
    _set_switch(page, "dry_run", True)
    _set_switch(page, "resume", False)
    run_name = f"ui-dry-run-{uuid.uuid4().hex[:8]}"
    _field(page, "Run Name", "textbox").fill(run_name)
    _shot(page, "backfill-run-form.png")
    page.get_by_role("button", name="Submit", exact=True).click()

    def submitted() -> dict[str, Any] | None:
        r = httpx.post(
            f"{_api()}/flow_runs/filter",
            json={"flow_runs": {"name": {"any_": [run_name]}}},
            timeout=10,
        )
        r.raise_for_status()
        runs = r.json()
        return dict(runs[0]) if runs else None

    assert readmodels.wait_for(lambda: submitted() is not None, 30), "no run was created"
    run = submitted()
    assert run is not None
    assert run["deployment_id"] == deployments["backfill"]["id"]
    assert run["parameters"].get("dry_run") is True, run["parameters"]
    assert run["parameters"].get("resume") is False, run["parameters"]
    dry = _wait_final(run["id"], 180, served)
    assert dry["state_type"] == "COMPLETED", (dry["state"], _tail(served))
    assert "backfill-plan" in _artifacts(run["id"])
    # Its run page, completed.
    page.goto(f"{ui}/runs/flow-run/{run['id']}")
    page.get_by_text(run_name, exact=True).first.wait_for()
    page.get_by_text("Completed", exact=True).first.wait_for()
    _shot(page, "backfill-dry-run.png")
