"""The main job: the whole system at work on the local stack, through its Prefect deployments.

    make demo        (= make up, python -m flows.setup, python -m flows.demo)
    python -m flows.demo [--rows 300000] [--chat-seconds 60]
    python -m flows.demo --stop     # cancel the demo's CDC run, stop the served deployments

1. generates a conversation data set in the write model (users, sessions, human and agent
   turns, steps with JSON payloads; new ids each time) through its triggers (support/dataset.py);
2. serves the deployments (``python -m deployments.serve`` in the background, outliving the
   demo, its log in .stack/logs/deployments-serve.log; reused when a demo's is serving) and
   runs a backfill of the new users through the ``backfill`` deployment, as a click in the UI;
3. starts the CDC consumer through the ``cdc`` deployment (a running one is reused) and waits
   until it has applied the data set's changes;
4. plays live chat traffic through the dual-write library (flows/chat_demo.py's script),
   measuring CDC's end-to-end latency of those changes (support/chat_latency.py);
5. runs an audit through the ``audit`` deployment;
6. prints a summary with the UI page of each run. The stack, the served deployments and the
   CDC run keep running.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from typing import Any

from confluent_kafka import Consumer
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from flows.chat_demo import SCRIPT, visible
from support.chat_latency import LatencyProbe, committed_lag
from support.dataset import DataSet, generate
from support.served import (
    ROOT,
    SERVE_LOG,
    active_runs,
    ensure_served,
    start_run,
    stop_served,
    table_artifact,
    ui_url,
    wait_for,
)
from tasks.adapters import kafka, scylla
from tasks.core.write_policy import StepInput
from tasks.dual_write import service as dw
from tasks.settings import Settings, get_settings

TAGS = ("demo",)  # on every run the demo starts: --stop cancels the active ones


@task(cache_policy=NONE)
def generate_data_set(rows: int, cfg: Settings) -> DataSet:
    data = generate(rows, cfg.postgres)
    get_run_logger().info(
        "generated %s rows (%s) for %d new users in %.1f s, through the write model's triggers",
        f"{data.rows:,}",
        ", ".join(f"{t} {n:,}" for t, n in data.counts.items()),
        len(data.user_ids),
        data.seconds,
    )
    return data


@task(cache_policy=NONE)
def serve_deployments() -> bool:
    """True when the serving process was started now, False when one was serving already."""
    pid, started = ensure_served(("backfill/backfill", "cdc/cdc", "audit/audit"))
    how = "started" if started else "reused"
    get_run_logger().info("deployments.serve %s: pid %d, log %s", how, pid, SERVE_LOG)
    return started


@task(cache_policy=NONE)
def backfill(data: DataSet, timeout_s: float = 600) -> dict[str, Any]:
    """A backfill run of the data set's users through the deployment: its rows and rate."""
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        run = start_run(client, "backfill/backfill", {"user_ids": data.user_ids}, TAGS)
        log.info("backfill: flow run %s %s", run.name, ui_url(run.id))
        run = wait_for(client, run, timeout_s)
        pairs = table_artifact(client, run.id, "backfill-summary")
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(
            f"the backfill ended {run.state_name}: {run.state and run.state.message}"
        )
    source = {p["table"]: p.get("snapshot_rows") or p["rows_read"] for p in pairs}
    seconds = max(run.total_run_time.total_seconds(), 1e-3)
    out = {
        "run": str(run.id),
        "rows": sum(source.values()),
        "rows_written": sum(p["rows_written"] for p in pairs),
        "seconds": round(seconds, 1),
        "rows_per_s": round(sum(source.values()) / seconds),
    }
    log.info("backfill completed: %s", out)
    return out


@task(cache_policy=NONE)
def start_cdc(serve_started: bool, timeout_s: float = 120) -> str:
    """The CDC run to rely on: the deployment's run already active, or a new one."""
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        for run in active_runs(client, "cdc/cdc"):
            if serve_started and set(TAGS) <= set(run.tags):
                # A demo's run whose serving process is gone (killed outright): it would hold
                # one of the deployment's concurrency slots for ever.
                client.set_flow_run_state(
                    run.id, Crashed(message="its serving process is gone"), force=True
                )
                log.warning("CDC run %s marked Crashed: its serving process is gone", run.name)
                continue
            log.info("CDC is running already: flow run %s %s", run.name, ui_url(run.id))
            return str(run.id)
        run = start_run(client, "cdc/cdc", tags=TAGS)
        log.info("CDC: flow run %s %s", run.name, ui_url(run.id))
        run = wait_for(client, run, timeout_s, until="running")
    if run.state is None or not run.state.is_running():
        raise RuntimeError(f"the CDC run ended {run.state_name} at once; see {SERVE_LOG}")
    return str(run.id)


@task(cache_policy=NONE)
def wait_until_caught_up(cfg: Settings, timeout_s: float = 240, tolerance: int = 50) -> float:
    """Seconds until the CDC group has applied all but ``tolerance`` changes."""
    log = get_run_logger()
    started = last_log = time.monotonic()
    with contextlib.closing(Consumer(kafka.consumer_config(cfg.kafka))) as offsets:
        while True:
            lag = committed_lag(offsets, cfg.kafka)[1]
            waited = time.monotonic() - started
            if lag <= tolerance or waited > timeout_s:
                log.info("CDC is %d changes behind after %.1f s", lag, waited)
                return waited
            if time.monotonic() - last_log >= 5:
                log.info("CDC is %s changes behind", f"{lag:,}")
                last_log = time.monotonic()
            time.sleep(0.5)


@task(cache_policy=NONE)
def play_chat(cfg: Settings, seconds: float, conversations: int = 20) -> dict[str, Any]:
    """Chat traffic through the dual-write library for ``seconds``: human turns dual-written
    (read back at once), agent turns and their steps left to CDC."""
    log = get_run_logger()
    probe = LatencyProbe(cfg.kafka)
    exchanges = at_once = 0
    with (
        contextlib.closing(dw.connect_deps(cfg)) as deps,
        scylla.session(cfg.scylla, cfg.scylla.keyspace) as cql,
    ):
        sids = [
            dw.create_session(uuid.uuid4(), f"Live chat {i + 1}", deps=deps).session_id
            for i in range(conversations)
        ]
        probe.sessions.update(str(s) for s in sids)
        probe.start()
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            sid = sids[exchanges % conversations]
            question, answer = SCRIPT[exchanges % len(SCRIPT)]
            human = dw.record_human_turn(sid, question, deps=deps)
            at_once += visible(cql, sid, human.ids("human_turns")[0])
            steps = [
                StepInput("tool_call", {"tool": "search", "q": question[:40]}),
                StepInput("answer", {"tokens": len(answer.split())}),
            ]
            dw.record_agent_turn(sid, answer, model="demo-1", steps=steps, deps=deps)
            exchanges += 1
            if exchanges % 200 == 0:
                log.info("%d exchanges, %d changes applied", exchanges, len(probe.latencies_ms))
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    probe.stop()
    out = {
        "exchanges": exchanges,
        "seconds": round(elapsed, 1),
        "human_turns_visible_at_once": at_once,
        "changes": len(probe.latencies_ms) + len(probe.pending),
        "changes_applied": len(probe.latencies_ms),
        "latency_p50_ms": probe.percentile_ms(0.50),
        "latency_p99_ms": probe.percentile_ms(0.99),
    }
    log.info("chat traffic: %s", out)
    return out


@task(cache_policy=NONE)
def audit(timeout_s: float = 600, trigger_wait_s: float = 20) -> dict[str, Any]:
    """An audit run through the deployment: Completed means no drift and fresh read models.
    A failed one emits cqrs.audit.failed, whose automation starts a reconcile run of it."""
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        run = start_run(client, "audit/audit", tags=TAGS)
        log.info("audit: flow run %s %s", run.name, ui_url(run.id))
        run = wait_for(client, run, timeout_s)
        verdict: dict[str, Any] = {"run": str(run.id), "state": run.state_name, "why": None}
        if run.state is not None and run.state.is_completed():
            log.info("audit Completed: no drift, read models fresh")
            return verdict
        message = (run.state.message if run.state else None) or "no message"
        verdict["why"] = message.splitlines()[0][:400]
        report = ROOT / get_settings().audit.report_dir / str(run.id) / "report.md"
        if report.exists():
            verdict["report"] = str(
                report.relative_to(ROOT) if report.is_relative_to(ROOT) else report
            )
        log.warning("audit %s: %s", run.state_name, verdict["why"])
        deadline = time.monotonic() + trigger_wait_s
        while time.monotonic() < deadline and "reconcile" not in verdict:
            for r in active_runs(client, "reconcile/reconcile", states=list(StateType)):
                if r.parameters.get("audit_run") == str(run.id):
                    verdict["reconcile"] = str(r.id)
                    log.info("reconcile triggered by the audit's event: %s", ui_url(r.id))
            time.sleep(1)
    return verdict


def summary(
    data: DataSet,
    filled: dict[str, Any],
    cdc: dict[str, Any],
    chat: dict[str, Any],
    verdict: dict[str, Any],
) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    lines = [
        "",
        "== cqrs-sync demo ==",
        f"data set   {data.rows:,} rows in Postgres ({len(data.user_ids):,} new users), "
        f"generated in {data.seconds:.1f} s",
        f"backfill   {filled['rows']:,} rows ({filled['rows_written']:,} read-model rows) in "
        f"{filled['seconds']:.1f} s: {filled['rows_per_s']:,} rows/s",
        f"           {ui_url(filled['run'])}",
        f"CDC        {cdc['applied']:,} changes applied during the demo, the data set's "
        f"included (caught up {cdc['caught_up_s']:.0f} s after the backfill); keeps running",
        f"           {ui_url(cdc['run'])}",
        f"chat       {chat['exchanges']:,} exchanges in {chat['seconds']:.0f} s through the "
        f"dual-write library ({chat['human_turns_visible_at_once']:,} human turns readable at "
        "once)",
        f"           {chat['changes_applied']:,} of {chat['changes']:,} changes applied by CDC; "
        f"end-to-end latency p50 {ms(chat['latency_p50_ms'])}, p99 {ms(chat['latency_p99_ms'])}",
        f"audit      {verdict['state']}"
        + (": no drift, read models fresh" if verdict["why"] is None else f": {verdict['why']}"),
        f"           {ui_url(verdict['run'])}",
    ]
    if verdict.get("report"):
        lines.append(f"           report: {verdict['report']}")
    if verdict.get("reconcile"):
        lines.append(
            f"           reconcile, triggered by its event: {ui_url(verdict['reconcile'])}"
        )
    lines += [
        "",
        f"Still running: the stack, the served deployments (log {SERVE_LOG.relative_to(ROOT)})"
        f" and the CDC run. Prefect UI: {ui_url()}",
        "Stop the served deployments and CDC:  make demo-stop",
        "Stop the stack:                       make down",
    ]
    return "\n".join(lines)


@flow(name="demo")
def demo_flow(rows: int = 300_000, chat_seconds: float = 60.0) -> dict[str, Any]:
    """A data set generated, backfilled, carried by CDC under live chat traffic, audited: all
    through the deployments, as an operator would from the UI."""
    cfg = get_settings()
    with contextlib.closing(Consumer(kafka.consumer_config(cfg.kafka))) as offsets:
        applied_before = committed_lag(offsets, cfg.kafka)[0]
        data = generate_data_set(rows, cfg)
        serve_started = serve_deployments()
        filled = backfill(data)
        cdc = {"run": start_cdc(serve_started), "caught_up_s": wait_until_caught_up(cfg)}
        chat = play_chat(cfg, chat_seconds)
        cdc["applied"] = committed_lag(offsets, cfg.kafka)[0] - applied_before
    verdict = audit()
    text = summary(data, filled, cdc, chat, verdict)
    create_markdown_artifact(f"```\n{text.strip()}\n```", key="demo-summary")
    print(text, flush=True)
    return {"data_set": data.counts, "backfill": filled, "cdc": cdc, "chat": chat, "audit": verdict}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=300_000, help="rows in the data set (~300,000)")
    p.add_argument("--chat-seconds", type=float, default=60.0, help="seconds of chat traffic")
    p.add_argument(
        "--stop", action="store_true", help="cancel the demo's runs, stop the served deployments"
    )
    args = p.parse_args(argv)
    if args.stop:
        for line in stop_served(TAGS):
            print(line)
        return 0
    demo_flow(rows=args.rows, chat_seconds=args.chat_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
