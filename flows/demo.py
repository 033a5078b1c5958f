"""The main job: the whole system at work on the local stack.

    make demo        (= make up, python -m flows.setup, python -m flows.demo)

1. starts a CDC consumer (the same code as the `cdc` flow) in a group of its own;
2. writes a sample conversation to Postgres (a session, human and agent turns, agent steps);
3. shows the Debezium change events arriving in Kafka, one line per event;
4. reads the conversation back from the Scylla read models, as the app would.
"""

from __future__ import annotations

import json
import time
import uuid

from confluent_kafka import Consumer
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from support.cdc_probe import LocalCdc, end_offsets
from tasks.adapters import kafka, postgres, scylla
from tasks.settings import get_settings


@task(cache_policy=NONE)
def write_sample_conversation() -> dict[str, str]:
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    human_id, agent_id = uuid.uuid4(), uuid.uuid4()
    with postgres.connect("app", get_settings().postgres) as conn:
        conn.execute(
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s)",
            (session_id, user_id, "Planning a trip to Lisbon"),
        )
        conn.execute(
            "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
            (human_id, session_id, "What should I see in Lisbon in two days?"),
        )
        conn.execute(
            "INSERT INTO agent_turns (id, session_id, content, model) VALUES (%s, %s, %s, %s)",
            (agent_id, session_id, "Day 1: Alfama and Belém; day 2: Sintra.", "demo-1"),
        )
        for kind, payload in (
            ("tool_call", {"tool": "search", "q": "Lisbon sights"}),
            ("tool_result", {"hits": 12}),
            ("answer", {"tokens": 48}),
        ):
            conn.execute(
                "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
                "VALUES (%s, %s, %s, %s, %s)",
                (uuid.uuid4(), agent_id, session_id, kind, json.dumps(payload)),
            )
        conn.execute(
            "UPDATE sessions SET title = %s WHERE id = %s", ("Two days in Lisbon", session_id)
        )
        conn.commit()
    return {"user_id": str(user_id), "session_id": str(session_id)}


@task(cache_policy=NONE)  # a live consumer is not hashable input
def show_change_events(
    consumer: Consumer, session_id: str, expected: int, timeout_s: float = 30
) -> int:
    log = get_run_logger()
    seen, deadline = 0, time.monotonic() + timeout_s
    while seen < expected and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error() or msg.value() is None:
            continue
        event = json.loads(msg.value() or b"null")
        row = event["after"] or event["before"]
        if str(row.get("session_id", row.get("id"))) != session_id:
            continue
        seen += 1
        lag_ms = time.time() * 1000 - event["source"]["ts_ms"]
        log.info(
            "%-28s op=%s lsn=%s commit→seen %.0f ms  %s",
            msg.topic(),
            event["op"],
            event["source"]["lsn"],
            lag_ms,
            {k: row[k] for k in list(row)[:4]},
        )
    return seen


@task(cache_policy=NONE)
def show_read_models(user_id: str, session_id: str, timeout_s: float = 30) -> int:
    """Read the conversation list and the timeline as the app does, once CDC applied them."""
    log = get_run_logger()
    cfg = get_settings().scylla
    with scylla.session(cfg, cfg.keyspace) as session:
        deadline = time.monotonic() + timeout_s
        header = None
        while time.monotonic() < deadline:
            header = session.execute(
                "SELECT * FROM sessions_by_id WHERE session_id = %s", (uuid.UUID(session_id),)
            ).one()
            if header is not None and header.title == "Two days in Lisbon":
                break
            time.sleep(0.1)
        convs = list(
            session.execute(
                "SELECT * FROM recent_conversations WHERE user_id = %s LIMIT 20",
                (uuid.UUID(user_id),),
            )
        )
        for c in convs:
            log.info(
                "conversation list: %r, %d turns, last message %r",
                c.title,
                c.turn_count,
                c.last_message,
            )
        turns = list(
            session.execute(
                "SELECT * FROM conversation_timeline WHERE session_id = %s",
                (uuid.UUID(session_id),),
            )
        )
        for t in turns:
            log.info("timeline: %s %-6s %s", t.created_at, t.role, t.content)
            if t.role == "agent":
                for s in session.execute(
                    "SELECT kind, payload FROM steps_by_turn WHERE agent_turn_id = %s", (t.turn_id,)
                ):
                    log.info("          step %-12s %s", s.kind, s.payload)
        return len(turns)


@flow(name="demo")
def demo_flow() -> None:
    log = get_run_logger()
    settings = get_settings()
    consumer = Consumer(
        kafka.consumer_config(settings.kafka, **{"group.id": f"demo-{uuid.uuid4()}"})
    )
    consumer.assign(end_offsets(consumer, kafka.change_topics(settings.kafka)))
    # The real consumer, in a group of its own, from the topics' end.
    cdc = LocalCdc(settings).start()
    ids = write_sample_conversation()
    log.info("wrote session %s for user %s to Postgres", ids["session_id"], ids["user_id"])
    # 1 session insert + 2 turns (each also updates the session header) + 3 steps + 1 rename.
    seen = show_change_events(consumer, ids["session_id"], expected=9)
    consumer.close()
    log.info(
        "%d change events arrived in Kafka (topic prefix %r)",
        seen,
        settings.kafka.topic_prefix,
    )
    turns = show_read_models(ids["user_id"], ids["session_id"])
    cdc.stop()
    if seen != 9 or turns != 2:
        raise RuntimeError(f"demo expected 9 change events and 2 turns, saw {seen} and {turns}")


if __name__ == "__main__":
    demo_flow()
