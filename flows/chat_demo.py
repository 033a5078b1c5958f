"""Chat traffic through the dual-write library, showing read-your-writes.

    python -m flows.chat_demo [--exchanges 4] [--no-local-cdc]

Plays a short conversation as app code would: human turns are dual-written (the policy's
default), so the read model shows each one the moment the call returns; agent turns are left
to CDC, so they show up only once Debezium → Kafka → the CDC consumer has carried them, and
the demo measures how long that took. By default it runs its own CDC consumer in-process
(a fresh consumer group starting at the topics' end); with ``--no-local-cdc`` it relies on a
CDC flow already running (``make cdc``).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from typing import Any

from cassandra.cluster import Session
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from support.cdc_probe import LocalCdc
from tasks.adapters import scylla
from tasks.core.write_policy import StepInput
from tasks.dual_write import service as dw
from tasks.settings import get_settings

SCRIPT = [
    (
        "What should I see in Lisbon in two days?",
        "Day 1: Alfama, the castle and a tram ride; day 2: Belém and the LX Factory.",
    ),
    ("Is Sintra worth a half day?", "Yes: take the early train and start with Pena Palace."),
    ("Where do locals eat pastéis de nata?", "Manteigaria in Chiado, fresh every few minutes."),
    ("How do I get from the airport?", "The metro's red line, then change to the green line."),
    ("Any fado recommendation?", "A small tasca in Mouraria rather than the big houses."),
]


def visible(cql: Session, session_id: uuid.UUID, turn_id: uuid.UUID) -> bool:
    rows = cql.execute(
        "SELECT turn_id FROM conversation_timeline WHERE session_id = %s", (session_id,)
    )
    return any(r.turn_id == turn_id for r in rows)


def staleness_ms(
    cql: Session,
    session_id: uuid.UUID,
    turn_id: uuid.UUID,
    returned: float,
    timeout_s: float = 30.0,
) -> float | None:
    """Milliseconds from the call's return until the turn is in the read model (None: not
    within the timeout). 0 when the first read, right after the return, already has it."""
    if visible(cql, session_id, turn_id):
        return 0.0
    deadline = returned + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.002)
        if visible(cql, session_id, turn_id):
            return (time.monotonic() - returned) * 1000
    return None


def _fmt(v: float | None) -> str:
    return "not visible" if v is None else f"{v:.0f} ms"


@flow(name="chat-demo")
def chat_demo_flow(exchanges: int = 4, local_cdc: bool = True) -> list[dict[str, Any]]:
    log = get_run_logger()
    settings = get_settings()
    rows: list[dict[str, Any]] = []
    # Closed in reverse order: the local CDC consumer, the session, then the deps.
    with (
        contextlib.closing(dw.connect_deps(settings)) as deps,
        scylla.session(settings.scylla, settings.scylla.keyspace) as cql,
        LocalCdc(settings) if local_cdc else contextlib.nullcontext(),
    ):
        session = dw.create_session(uuid.uuid4(), "Weekend in Lisbon", deps=deps)
        sid = session.session_id
        log.info("session %s created (dual-written: %s)", sid, session.read_model_updated)
        for i, (question, answer) in enumerate(SCRIPT[:exchanges], 1):
            t0 = time.monotonic()
            human = dw.record_human_turn(sid, question, deps=deps)
            returned = time.monotonic()
            stale = staleness_ms(cql, sid, human.ids("human_turns")[0], returned)
            rows.append(
                {
                    "turn": f"{i} human",
                    "path": "dual-write",
                    "call_ms": (returned - t0) * 1000,
                    "staleness_ms": stale,
                }
            )
            log.info(
                "human turn %d [dual-write] call %.1f ms (postgres %.1f + scylla %.1f): "
                "in conversation_timeline right after the call: %s (staleness %s)",
                i,
                (returned - t0) * 1000,
                human.postgres_ms,
                human.scylla_ms or 0.0,
                "YES" if stale == 0 else "no",
                _fmt(stale),
            )

            t0 = time.monotonic()
            agent = dw.record_agent_turn(
                sid,
                answer,
                model="demo-1",
                deps=deps,
                steps=[
                    StepInput("tool_call", {"tool": "search", "q": question[:40]}),
                    StepInput("answer", {"tokens": len(answer.split())}),
                ],
            )
            returned = time.monotonic()
            stale = staleness_ms(cql, sid, agent.ids("agent_turns")[0], returned)
            path = "CDC only" if agent.dual_write == "skipped" else "dual-write"
            rows.append(
                {
                    "turn": f"{i} agent",
                    "path": path,
                    "call_ms": (returned - t0) * 1000,
                    "staleness_ms": stale,
                }
            )
            log.info(
                "agent turn %d [%s] call %.1f ms: in conversation_timeline right after "
                "the call: %s; visible after %s",
                i,
                rows[-1]["path"],
                (returned - t0) * 1000,
                "YES" if stale == 0 else "no",
                _fmt(stale),
            )
        renamed = dw.rename_session(sid, "Two days in Lisbon", deps=deps)
        header = cql.execute(
            "SELECT title, turn_count FROM sessions_by_id WHERE session_id = %s", (sid,)
        ).one()
        log.info(
            "renamed [dual-write: %s]: sessions_by_id right after the call says %r, %s turns",
            renamed.read_model_updated,
            header.title,
            header.turn_count,
        )
    table = "\n".join(
        f"| {r['turn']} | {r['path']} | {r['call_ms']:.1f} | {_fmt(r['staleness_ms'])} |"
        for r in rows
    )
    markdown = "| turn | path | call (ms) | staleness after the call |\n|---|---|---|---|\n" + table
    create_markdown_artifact(
        key="chat-demo", markdown=markdown, description="read-your-writes: dual-write vs CDC only"
    )
    print(markdown)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.chat_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--exchanges", type=int, default=4, choices=range(1, len(SCRIPT) + 1))
    p.add_argument(
        "--no-local-cdc",
        action="store_true",
        help="rely on a CDC flow already running instead of an in-process one",
    )
    args = p.parse_args(argv)
    chat_demo_flow(exchanges=args.exchanges, local_cdc=not args.no_local_cdc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
