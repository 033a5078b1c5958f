"""The consumer's error paths with a fake writer and a fake dead-letter topic: what is applied,
what is dead-lettered (once), what stops the run, and that a transient failure retries."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from cassandra import InvalidRequest
from confluent_kafka import Message

from tasks.cdc.apply import stops_the_run
from tasks.cdc.consumer import CdcConsumer
from tasks.cdc.options import CdcOptions
from tasks.core.errors import RejectedData, TerminalError, TransientError, classify
from tasks.core.projection import Mutation
from tasks.settings import KafkaSettings

T0 = "2026-11-28T08:15:21.518631Z"


def event(content: str, op: str = "c") -> bytes:
    return json.dumps(
        {
            "before": None,
            "op": op,
            "after": {
                "id": str(uuid.uuid4()),
                "session_id": str(uuid.uuid4()),
                "content": content,
                "created_at": T0,
                "updated_at": T0,
            },
            "source": {"table": "human_turns", "ts_us": 1, "lsn": 1},
        }
    ).encode()


def messages(*values: bytes) -> list[Message]:
    return [
        Message(topic="cqrs.public.human_turns", partition=0, offset=i, key=b"k", value=v)
        for i, v in enumerate(values)
    ]


class FakeWriter:
    """Raises ``fail(mutations)``'s error, if any, for a write; records what it wrote."""

    def __init__(self, fail: Any) -> None:
        self.fail, self.calls = fail, 0
        self.written: list[Mutation] = []

    def write(self, mutations: Sequence[Mutation], timeout: float | None = None) -> int:
        self.calls += 1
        error = self.fail(mutations, self.calls)
        if error is not None:
            raise error
        self.written.extend(mutations)
        return len(mutations)


class FakeDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[Message, BaseException]] = []

    def send(self, dead: list[tuple[Message, BaseException]]) -> None:
        self.sent.extend(dead)

    def close(self) -> None:
        pass


def consumer(writer: FakeWriter) -> CdcConsumer:
    c = CdcConsumer(
        writer,  # type: ignore[arg-type]
        CdcOptions(retry_initial_s=0.001, retry_max_s=0.002),
        KafkaSettings(bootstrap_servers="127.0.0.1:1"),
    )
    c.applier.dead_letters = FakeDeadLetters()  # type: ignore[assignment]
    return c


def dead_lettered(c: CdcConsumer) -> list[tuple[Message, BaseException]]:
    return c.applier.dead_letters.sent  # type: ignore[attr-defined,no-any-return]


def contents(mutations: Sequence[Mutation]) -> set[str]:
    return {dict(m.values)["content"] for m in mutations if hasattr(m, "values")}


def poison_if(word: str, error: Exception) -> Any:
    return lambda ms, _calls: error if word in contents(ms) else None


def test_a_change_the_store_rejects_is_dead_lettered_once_and_the_rest_applied() -> None:
    rejected = RejectedData("Scylla write failed: UnicodeEncodeError")
    w = FakeWriter(poison_if("bad", rejected))
    c = consumer(w)
    batch = c._prepare(messages(event("ok1"), event("bad"), event("ok2")))
    assert c._apply(batch)
    assert contents(w.written) >= {"ok1", "ok2"} and "bad" not in contents(w.written)
    assert [(m.offset(), e) for m, e in dead_lettered(c)] == [(1, rejected)]
    assert batch.changes == 2 and batch.offsets == {("cqrs.public.human_turns", 0): 3}


def test_an_unknown_error_about_one_change_does_not_stop_the_run() -> None:
    w = FakeWriter(poison_if("bad", InvalidRequest("some value the store refuses")))
    c = consumer(w)
    batch = c._prepare(messages(event("bad"), event("ok")))
    assert c._apply(batch)
    assert [m.offset() for m, _ in dead_lettered(c)] == [0]


def test_a_systemic_error_stops_the_run_naming_it_and_nothing_is_dead_lettered() -> None:
    missing = classify(InvalidRequest("table conversation_timeline does not exist"), "write")
    assert isinstance(missing, TerminalError) and stops_the_run(missing)
    c = consumer(FakeWriter(lambda ms, _n: missing))
    batch = c._prepare(messages(event("a"), event("b")))
    with pytest.raises(TerminalError, match="conversation_timeline"):
        c._apply(batch)
    assert dead_lettered(c) == []


def test_a_transient_error_while_setting_aside_retries_without_duplicate_dead_letters() -> None:
    def fail(ms: Sequence[Mutation], calls: int) -> Exception | None:
        if "bad" in contents(ms):
            return RejectedData("rejected")
        if calls == 3:  # the store goes away in the middle of the one-by-one pass
            return TransientError("Scylla down")
        return None

    w = FakeWriter(fail)
    c = consumer(w)
    batch = c._prepare(messages(event("bad"), event("ok1"), event("ok2")))
    assert c._apply(batch)
    assert [m.offset() for m, _ in dead_lettered(c)] == [0]
    assert {"ok1", "ok2"} <= contents(w.written)


def test_undecodable_and_unprojectable_changes_are_dead_lettered_at_prepare() -> None:
    c = consumer(FakeWriter(lambda ms, n: None))
    batch = c._prepare(messages(b"{not json", event("x", op="zz"), event("fine")))
    assert [m.offset() for m, _ in batch.dead] == [0, 1]
    assert batch.changes == 1


def test_reports_and_cancellation_checks_that_fail_never_stop_the_consumer() -> None:
    c = consumer(FakeWriter(lambda ms, n: None))

    def broken_report(_rep: Any) -> None:
        raise TransientError("Postgres is restarting")

    def broken_check() -> bool:
        raise OSError("Prefect API unreachable")

    c._report, c._should_stop, c._last_report = broken_report, broken_check, 0.0
    assert c._report_due() is False


# --------------------------------------------------------------------------------------------
# Offset commits: asynchronous, one in flight, cleared only by their answer


class CommitRecorder:
    def __init__(self) -> None:
        self.sent: list[dict[tuple[str, int], int]] = []

    def commit(self, offsets: list[Any], asynchronous: bool = True) -> None:
        assert asynchronous, "a synchronous commit can block the loop for good"
        self.sent.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def close(self) -> None:
        pass


def _answer(c: CdcConsumer, offsets: dict[tuple[str, int], int], err: Any = None) -> None:
    from confluent_kafka import TopicPartition

    c._on_commit(err, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])


def test_commits_are_async_one_in_flight_and_cleared_only_by_their_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = consumer(FakeWriter(lambda _ms, _calls: None))
    c.consumer.close()
    c.consumer = rec = CommitRecorder()  # type: ignore[assignment]
    c._commit({("t", 0): 10})
    c._commit({("t", 0): 20, ("t", 1): 5})  # the first is unanswered: nothing sent
    assert rec.sent == [{("t", 0): 10}]
    _answer(c, {("t", 0): 10})  # answers the first; the newer offset 20 stays to commit
    assert c._uncommitted == {("t", 0): 20, ("t", 1): 5}
    c._commit({})
    assert rec.sent[-1] == {("t", 0): 20, ("t", 1): 5}
    _answer(c, {("t", 0): 20, ("t", 1): 5})
    assert c._uncommitted == {}
    # Unanswered past COMMIT_RESEND_S (a coordinator lost): sent again, never waited on.
    c._commit({("t", 0): 30})
    clock = time.monotonic() + 11
    monkeypatch.setattr("tasks.cdc.consumer.time.monotonic", lambda: clock)
    c._commit({})
    assert rec.sent[-2:] == [{("t", 0): 30}, {("t", 0): 30}]


def test_a_commit_the_group_refuses_for_good_stops_the_run() -> None:
    from confluent_kafka import KafkaError

    c = consumer(FakeWriter(lambda _ms, _calls: None))
    c.consumer.close()
    c.consumer = CommitRecorder()  # type: ignore[assignment]
    c._commit({("t", 0): 1})
    _answer(c, {("t", 0): 1}, KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    assert c._fatal is None and c._uncommitted == {("t", 0): 1}  # kept, sent again
    _answer(c, {("t", 0): 1}, KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))
    assert isinstance(c._fatal, TerminalError), c._fatal
