"""Secrets and row content stay out of what operators and tools read (issue #14, item 4).

Every flow the product has runs for real against the local stack and its Prefect server, with
the stack's known secrets (the roles' passwords, the Scylla password if any, and a wrong
password given to one failing run) and a distinctive sentinel written as row content (a
session title, human turns, a step's JSON payload, through the dual-write library, its
Prefect tasks, and plain inserts CDC carries; a malformed change event holding it too):

- setup; the chat demo and the dual-write tasks in a flow; a real backfill of the test's own
  users; a bounded CDC run in a consumer group of its own with a dead-letter topic of its own,
  which dead-letters the malformed event; an audit; a reconcile dry run and a real reconcile
  of one key made to drift; and a backfill that fails, run as a subprocess with a wrong
  password for the reader role (error paths are where connection strings leak).

Then everything those runs left is searched: the Prefect API's logs, artifacts, flow runs
(parameters, state messages), task runs and events of these runs; every log record and
print of this process and the subprocess's stdout and stderr; the dead-letter message's
headers and value; and the stack's own log files (.stack/logs: Postgres, Kafka, Kafka
Connect, Cassandra, the Prefect server, the served deployments).

- No secret appears anywhere.
- The sentinel appears nowhere but in the dead-letter message's VALUE: that holds the
  failing change byte for byte by design (the change topics and the databases hold it too),
  so that nothing is lost. Its HEADERS say where it came from (topic, partition, offset),
  the error's class and a reason naming table and column, never a value: they are read by
  tools and people that have no business with the content.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cassandra.cluster import Session
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import NewTopic
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventOccurredFilter
from prefect.logging.handlers import APILogWorker
from prefect.states import State

import flows.cdc
import flows.chat_demo
from flows.audit import audit_flow
from flows.backfill import backfill_flow
from flows.cdc import cdc_flow
from flows.chat_demo import chat_demo_flow
from flows.reconcile import reconcile_flow
from flows.setup import setup_flow
from support.cdc_probe import position_group_at_end
from tasks.adapters import kafka
from tasks.core.write_policy import StepInput
from tasks.dual_write import service as dw
from tasks.dual_write import tasks as dw_tasks
from tasks.settings import Settings, get_settings
from tests.integration import readmodels

ROOT = Path(__file__).resolve().parents[2]
STACK_LOGS = ROOT / ".stack" / "logs"
Haystack = list[tuple[str, str]]  # (where, text)


def known_secrets(settings: Settings) -> dict[str, str]:
    """The secrets the stack runs with, by setting name."""
    pg = settings.postgres
    found = {
        "CQRS_PG_ADMIN_PASSWORD": pg.admin_password.get_secret_value(),
        "CQRS_PG_APP_PASSWORD": pg.app_password.get_secret_value(),
        "CQRS_PG_READER_PASSWORD": pg.reader_password.get_secret_value(),
        "CQRS_PG_DEBEZIUM_PASSWORD": pg.debezium_password.get_secret_value(),
    }
    if settings.scylla.password is not None:
        found["CQRS_SCYLLA_PASSWORD"] = settings.scylla.password.get_secret_value()
    # A password shorter than this would match by chance (and is a finding of its own).
    assert all(len(v) >= 6 for v in found.values()), "a configured password is too short"
    return found


class Recorder(logging.Handler):
    """Every log record of this process, formatted as a console would print it, traceback
    included: what a run's stdout/stderr would show, whichever handler is configured."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception as exc:  # a record that cannot be formatted is recorded as such
            self.lines.append(f"unformattable record from {record.name}: {exc!r}")


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    # The root logger and Prefect's, which does not propagate to the root.
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    handler = Recorder()
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def flow_run_id(state: State[Any]) -> uuid.UUID:
    run_id = state.state_details.flow_run_id
    assert run_id is not None, state
    return run_id


def human_turn_event(
    turn: uuid.UUID, session: uuid.UUID, content: Any, at: datetime
) -> dict[str, Any]:
    """A Debezium change event of a human turn, as the connector writes it."""
    iso = at.isoformat().replace("+00:00", "Z")
    micros = int(at.timestamp() * 1_000_000)
    return {
        "before": None,
        "after": {
            "id": str(turn),
            "session_id": str(session),
            "content": content,
            "created_at": iso,
            "updated_at": iso,
        },
        "source": {"table": "human_turns", "ts_us": micros, "lsn": 1},
        "op": "c",
        "ts_ms": micros // 1000,
    }


def headers_of(m: Message) -> dict[str, str]:
    raw: list[tuple[str, Any]] = list(m.headers() or [])  # type: ignore[arg-type]
    return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw}


def read_topic(settings: Settings, topic: str, count: int, timeout_s: float = 20) -> list[Message]:
    c = Consumer(kafka.consumer_config(settings.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and not msg.error():
                got.append(msg)
        return got
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# What the Prefect API keeps of the runs


def prefect_records(
    client: SyncPrefectClient, run_ids: list[uuid.UUID], since: datetime
) -> Haystack:
    APILogWorker.drain_all(timeout=10)  # logs go in batches: make sure the last ones arrived
    out: Haystack = []
    logs: list[Any] = []
    while True:
        page = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), limit=200, offset=len(logs)
        )
        logs += page
        if len(page) < 200:
            break
    out += [(f"log of run {x.flow_run_id} ({x.name})", x.message) for x in logs]
    seen = {x.flow_run_id for x in logs}
    assert seen == set(run_ids), f"no log at all from runs {set(run_ids) - seen}"

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
    )
    assert artifacts, "the runs published no artifact"
    out += [(f"artifact {a.key or a.id} ({a.type})", a.model_dump_json()) for a in artifacts]

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    assert len(runs) == len(run_ids)
    out += [(f"flow run {r.name} ({r.id}): parameters", json.dumps(r.parameters)) for r in runs]
    out += [(f"flow run {r.name} ({r.id})", r.model_dump_json()) for r in runs]

    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)), limit=200
    )
    out += [(f"task run {t.name} ({t.id})", t.model_dump_json()) for t in tasks]

    events = EventFilter(
        occurred=EventOccurredFilter.model_validate({"since": since - timedelta(seconds=5)}),
        any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{i}" for i in run_ids]),
    )
    events_page = client.read_events(events, limit=50)  # the API's maximum
    found = list(events_page.events)
    while events_page.next_page is not None and len(found) < 2000:
        events_page = client.read_events_page(str(events_page.next_page))
        found += events_page.events
    out += [(f"event {e.event} ({e.id})", e.model_dump_json()) for e in found]
    return out


def stack_logs() -> Haystack:
    return [
        (f".stack/logs/{p.name}", p.read_text(errors="replace"))
        for p in sorted(STACK_LOGS.glob("*.log"))
    ]


def hits(needles: dict[str, str], haystack: Haystack) -> list[str]:
    return [
        f"{name} in {where}: ...{text[max(0, i - 120) : i + 120]!r}..."
        for name, needle in needles.items()
        for where, text in haystack
        if (i := text.find(needle)) >= 0
    ]


# --------------------------------------------------------------------------------------------
# The runs


def start_failing_backfill(user: uuid.UUID, wrong: str, tmp: Path) -> subprocess.Popen[bytes]:
    """A backfill with a wrong reader password, as an operator's typo would give: it fails
    at its first Postgres connection, a terminal error, with no retry."""
    env = {
        **os.environ,
        "CQRS_PG_READER_PASSWORD": wrong,
        "PREFECT_LOGGING_LEVEL": "DEBUG",  # the most a run prints
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.backfill",
            "--user-ids",
            str(user),
            "--snapshot-root",
            str(tmp / "failing"),
        ],
        cwd=ROOT,
        env=env,
        stdout=(tmp / "failing.out").open("wb"),
        stderr=(tmp / "failing.err").open("wb"),
    )


@pytest.fixture()
def private_dlq() -> Iterator[str]:
    """A dead-letter topic of the test's own, removed afterwards."""
    topic = f"secrets-test-dlq-{uuid.uuid4().hex[:12]}"
    admin = kafka.admin(get_settings().kafka)  # held: futures fail if it is collected first
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result()
    try:
        yield topic
    finally:
        for fut in admin.delete_topics([topic]).values():
            fut.result()


def test_no_secret_or_row_content_in_logs_artifacts_parameters_or_dlq_headers(
    private_dlq: str,
    recorder: Recorder,
    capfd: pytest.CaptureFixture[str],
    cql: Session,
    pg_app: psycopg.Connection[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = datetime.now(UTC)
    settings = get_settings()
    tag = uuid.uuid4().hex[:12]
    sentinel = f"ROWCONTENT{tag}"
    wrong = f"wrong pw' host=x {tag}"  # a space and a quote: conninfo quoting is exercised
    secrets = {**known_secrets(settings), "the wrong reader password": wrong}
    user = uuid.uuid4()
    runs: dict[str, uuid.UUID] = {}

    failing = start_failing_backfill(user, wrong, tmp_path)  # runs alongside the rest

    state: State[Any] = setup_flow(return_state=True)
    assert state.is_completed(), state
    runs["setup"] = flow_run_id(state)

    # A consumer group and a dead-letter topic of this test's own: the group starts at the
    # change topics' current end, so the CDC run below reads this test's changes (and any
    # other traffic of the moment), and the dead letters of this run are the only ones there.
    group = f"secrets-test-{tag}"
    dlq = private_dlq
    position_group_at_end(settings.kafka.model_copy(update={"consumer_group": group}))

    # Row content through the app's write paths: the dual-write library...
    deps = dw.connect_deps(settings)
    try:
        dual = dw.create_session(user, f"title {sentinel}", deps=deps)
        dw.record_human_turn(dual.session_id, f"human {sentinel}", deps=deps)
        dw.record_agent_turn(
            dual.session_id,
            f"agent {sentinel}",
            model="m",
            steps=[StepInput("tool_call", {"q": sentinel, "nested": [sentinel]})],
            deps=deps,
        )
    finally:
        deps.close()
    # ... and plain inserts, which only CDC carries to the read models.
    plain = uuid.uuid4()
    pg_app.execute(
        "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s)",
        (plain, user, f"plain title {sentinel}"),
    )
    pg_app.execute(
        "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
        (uuid.uuid4(), plain, f"plain turn {sentinel}"),
    )
    pg_app.commit()

    # A malformed change on a real change topic: its content is an object, not text, so it
    # cannot be decoded and is dead-lettered (by every consumer group that reads it).
    poison = json.dumps(
        human_turn_event(uuid.uuid4(), plain, {"text": sentinel}, datetime.now(UTC))
    ).encode()
    producer = Producer(kafka.producer_config(settings.kafka))
    producer.produce(settings.kafka.topic("human_turns"), key=b'{"id": "poison"}', value=poison)
    assert producer.flush(30) == 0

    # The chat demo, its script carrying the sentinel (the step payload keeps 40 characters
    # of the question: the sentinel is within them).
    script = [(f"q {sentinel}", f"a {sentinel}")]
    monkeypatch.setattr(flows.chat_demo, "SCRIPT", script)
    state = chat_demo_flow(exchanges=1, local_cdc=True, return_state=True)
    assert state.is_completed(), state
    runs["chat demo"] = flow_run_id(state)

    # The dual-write library's Prefect tasks, as a flow that writes calls them: the content
    # is a task argument, which the task run must not keep.
    @flow(name="secrets-test-dual-write-tasks")
    def dual_write_tasks_flow(user_id: uuid.UUID) -> list[dict[str, Any]]:
        sid, human, agent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        return [
            dw_tasks.create_session_task(sid, user_id, f"task title {sentinel}"),
            dw_tasks.record_human_turn_task(human, sid, f"task turn {sentinel}"),
            dw_tasks.record_agent_turn_task(
                agent,
                sid,
                f"task answer {sentinel}",
                steps=[{"kind": "note", "payload": {"s": sentinel}}],
            ),
        ]

    state = dual_write_tasks_flow(user, return_state=True)
    assert state.is_completed(), state
    runs["dual-write tasks"] = flow_run_id(state)

    state = backfill_flow(
        user_ids=[str(user)], chunk_size=5, snapshot_root=str(tmp_path), return_state=True
    )
    assert state.is_completed(), state
    runs["backfill"] = flow_run_id(state)
    backfilled: dict[str, Any] = state.result()
    assert backfilled["rows_read"] >= 8, backfilled

    # The CDC flow, bounded; dead letters go to this test's topic.
    cdc_settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"dead_letter_topic": dlq})}
    )
    monkeypatch.setattr(flows.cdc, "get_settings", lambda: cdc_settings)
    state = cdc_flow(
        consumer_group=group,
        idle_exit_s=3,
        max_seconds=40,
        report_interval_s=1,
        return_state=True,
    )
    monkeypatch.undo()
    assert state.is_completed(), state
    runs["cdc"] = flow_run_id(state)
    cdc = state.result()
    assert isinstance(cdc, dict) and cdc["dead_lettered"] >= 1, cdc
    # CDC carried the plain inserts.
    assert readmodels.wait_for(
        lambda: (
            cql.execute("SELECT title FROM sessions_by_id WHERE session_id = %s", (plain,)).one()
            is not None
        ),
        10,
    )

    # The audit of one read model (the whole keyspace is shared and large; the paths that
    # publish are the same for each). A shared stack may hold drift or dead letters other
    # tests left: a Failed audit is an outcome here, not a test failure.
    state = audit_flow(
        read_models=["sessions_by_id"], freshness_window_s=1, quality=True, return_state=True
    )
    assert state.is_completed() or state.is_failed(), state
    runs["audit"] = flow_run_id(state)

    partitions = [f"sessions_by_id:{plain}", f"conversation_timeline:{plain}"]
    state = reconcile_flow(partitions=partitions, dry_run=True, return_state=True)
    assert state.is_completed(), state
    runs["reconcile dry run"] = flow_run_id(state)
    # A real reconcile of one key made to drift: its row removed from the read model.
    cql.execute("DELETE FROM sessions_by_id WHERE session_id = %s", (plain,))
    state = reconcile_flow(partitions=[f"sessions_by_id:{plain}"], return_state=True)
    runs["reconcile"] = flow_run_id(state)
    # Asserted after the search: a failed run's records are searched all the same.
    repaired: dict[str, Any] | State[Any] = state.result() if state.is_completed() else state

    assert failing.wait(120) != 0, "the backfill with a wrong password did not fail"
    failing_output = [
        ("the failing backfill's stdout", (tmp_path / "failing.out").read_text(errors="replace")),
        ("the failing backfill's stderr", (tmp_path / "failing.err").read_text(errors="replace")),
    ]
    assert "password authentication failed" in failing_output[1][1], failing_output

    # ---------------------------------------------------------------------------- collect
    dead = read_topic(settings, dlq, 1)
    assert dead, f"nothing in the dead-letter topic {dlq}"
    ours = [m for m in dead if m.value() == poison]
    assert ours, [headers_of(m) for m in dead]
    dlq_headers: Haystack = [
        (f"DLQ {dlq}[0]@{m.offset()} headers", json.dumps(headers_of(m))) for m in dead
    ]
    assert "human_turns.content" in headers_of(ours[0])["dlq.error"], headers_of(ours[0])
    dlq_values: Haystack = [
        (f"DLQ {dlq}[0]@{m.offset()} key and value", repr(m.key()) + repr(m.value())) for m in dead
    ]

    with get_client(sync_client=True) as client:
        # The failing run: a backfill started since, with this test's snapshot root.
        candidates = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["backfill"])),
            flow_run_filter=FlowRunFilter(
                start_time=FlowRunFilterStartTime.model_validate(
                    {"after_": started - timedelta(seconds=5)}
                )
            ),
        )
        failed = [
            r for r in candidates if r.parameters.get("snapshot_root") == str(tmp_path / "failing")
        ]
        assert len(failed) == 1 and failed[0].state is not None, candidates
        assert failed[0].state.is_failed(), failed[0].state
        runs["failing backfill"] = failed[0].id
        prefect = prefect_records(client, list(runs.values()), started)

    out, err = capfd.readouterr()
    process: Haystack = [
        ("this process's log records", "\n".join(recorder.lines)),
        ("this process's stdout", out),
        ("this process's stderr", err),
        *failing_output,
    ]
    logs = stack_logs()

    everywhere = prefect + process + dlq_headers + dlq_values + logs
    secret_hits = hits(secrets, everywhere)
    content_hits = hits(
        {"the row-content sentinel": sentinel}, prefect + process + dlq_headers + logs
    )
    sizes = {where: len(text) for where, text in everywhere}
    assert sum(sizes.values()) > 0
    print(f"searched {len(everywhere)} places, {sum(sizes.values()):,} characters; runs {runs}")
    assert secret_hits == [], "\n".join(secret_hits)
    assert content_hits == [], "\n".join(content_hits)
    assert isinstance(repaired, dict), repaired
    assert repaired["rewritten"] + repaired["new_version"] == 1, repaired
