"""Pure tests of the dual-write policy and input validation, of the rule that validation
happens before any connection is taken, and of the Scylla step's wall-clock deadline."""

from __future__ import annotations

import math
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from tasks.core.catalog import KEY_COLUMNS, READ_MODELS
from tasks.core.cql import to_cql
from tasks.core.errors import InvalidInput, ServiceUnavailable, TransientError
from tasks.core.projection import PLACEHOLDER_TEXT, project_row
from tasks.core.write_policy import (
    DualWritePolicy,
    Operation,
    StepInput,
    as_uuid,
    check_content,
    check_steps,
    check_title,
)
from tasks.dual_write import service as dual_write
from tasks.dual_write.read_model import ScyllaHandle, warm_up_statements
from tasks.settings import ScyllaSettings

# The handles here never connect: they read only the batch limit.
SCYLLA = ScyllaSettings()

ENV_FIELDS = (
    "CREATE_SESSION",
    "RECORD_HUMAN_TURN",
    "RECORD_AGENT_TURN",
    "RENAME_SESSION",
    "DELETE_SESSION",
    "DEADLINE_MS",
    "MAX_CONTENT_BYTES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_FIELDS:
        monkeypatch.delenv(f"CQRS_DUAL_WRITE_{name}", raising=False)


# -- policy


def test_default_policy_dual_writes_user_facing_operations_only() -> None:
    p = DualWritePolicy()
    assert {op for op in Operation if p.dual_writes(op)} == {
        Operation.CREATE_SESSION,
        Operation.RECORD_HUMAN_TURN,
        Operation.RENAME_SESSION,
        Operation.DELETE_SESSION,
    }
    assert not p.dual_writes("record_agent_turn")
    assert p.deadline_s == pytest.approx(0.05)


def test_policy_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_DUAL_WRITE_RECORD_AGENT_TURN", "true")
    monkeypatch.setenv("CQRS_DUAL_WRITE_RECORD_HUMAN_TURN", "false")
    monkeypatch.setenv("CQRS_DUAL_WRITE_DEADLINE_MS", "80")
    monkeypatch.setenv("CQRS_DUAL_WRITE_MAX_CONTENT_BYTES", "1000")
    p = DualWritePolicy()
    assert p.dual_writes(Operation.RECORD_AGENT_TURN)
    assert not p.dual_writes(Operation.RECORD_HUMAN_TURN)
    assert p.dual_writes(Operation.CREATE_SESSION)
    assert p.deadline_s == pytest.approx(0.08)
    assert p.max_content_bytes == 1000


@pytest.mark.parametrize(
    "field,value",
    [("deadline_ms", 0), ("deadline_ms", -5), ("max_content_bytes", 0), ("max_steps", -1)],
)
def test_policy_rejects_nonsense_limits(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        DualWritePolicy(**{field: value})


def test_unknown_operation_is_named() -> None:
    with pytest.raises(InvalidInput, match="unknown operation 'drop_everything'"):
        DualWritePolicy().dual_writes("drop_everything")


# -- ids


def test_ids_accept_uuid_and_text() -> None:
    u = uuid.uuid4()
    assert as_uuid(u, "id") is u
    assert as_uuid(str(u), "id") == u


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 42, None, b"x" * 16, 1.5, True])
def test_bad_ids_are_rejected_without_echoing_them(bad: Any) -> None:
    with pytest.raises(InvalidInput, match="session_id must be a UUID") as err:
        as_uuid(bad, "session_id")
    if isinstance(bad, str) and bad:
        assert bad not in str(err.value)


# -- content


def test_content_at_the_limit_passes_and_one_byte_more_fails() -> None:
    p = DualWritePolicy(max_content_bytes=10)
    assert check_content("a" * 10, p) == "a" * 10
    with pytest.raises(InvalidInput, match="11 bytes, over the limit of 10"):
        check_content("a" * 11, p)


def test_content_limit_counts_utf8_bytes_not_characters() -> None:
    p = DualWritePolicy(max_content_bytes=10)
    check_content("é" * 5, p)  # 5 characters, 10 bytes
    with pytest.raises(InvalidInput, match="12 bytes"):
        check_content("é" * 6, p)  # 6 characters, 12 bytes


@pytest.mark.parametrize(
    "bad,why",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("a\x00b", "NUL"),
        ("\ud800", "lone surrogate"),
        (PLACEHOLDER_TEXT, "placeholder"),
        (None, "must be text"),
        (b"bytes", "must be text"),
    ],
)
def test_bad_content_is_rejected(bad: Any, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        check_content(bad, DualWritePolicy())


def test_error_for_oversized_content_does_not_echo_it() -> None:
    secret = "my password is hunter2 " * 100
    with pytest.raises(InvalidInput) as err:
        check_content(secret, DualWritePolicy(max_content_bytes=100))
    assert "hunter2" not in str(err.value)


def test_title_may_be_empty_but_not_too_long() -> None:
    p = DualWritePolicy(max_title_chars=5)
    assert check_title("", p) == ""
    assert check_title("abcde", p) == "abcde"
    with pytest.raises(InvalidInput, match="title is 6 characters"):
        check_title("abcdef", p)


# -- steps


def test_steps_keep_order_ids_and_canonical_json() -> None:
    sid = uuid.uuid4()
    steps = check_steps(
        [
            StepInput("tool_call", {"q": "x", "n": 1}),
            {"kind": "answer", "payload": [1, 2], "step_id": str(sid)},
            {"kind": "empty"},
        ],
        DualWritePolicy(),
    )
    assert [s.kind for s in steps] == ["tool_call", "answer", "empty"]
    assert steps[1].step_id == sid
    assert steps[0].payload_json == '{"q":"x","n":1}'
    assert steps[2].payload_json == "{}"
    assert len({s.step_id for s in steps}) == 3


@pytest.mark.parametrize(
    "steps,why",
    [
        ([{"kind": ""}], "kind is empty"),
        ([{"payload": {}}], "must have 'kind'"),
        ([{"kind": "x", "extra": 1}], "unknown"),
        ([{"kind": "x", "payload": math.nan}], "not a JSON value"),
        ([{"kind": "x", "payload": {"s": {1, 2}}}], "not a JSON value"),
        ([{"kind": "x", "payload": "a\x00b"}], "u0000"),
        ([{"kind": "x", "payload": "y" * 100}], "over the limit"),
        ([{"kind": "x", "step_id": "nope"}], "step_id must be a UUID"),
        ("not a list", "must be a sequence"),
        ([1], "StepInput or a mapping"),
    ],
)
def test_bad_steps_are_rejected(steps: Any, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        check_steps(steps, DualWritePolicy(max_step_payload_bytes=50))


def test_too_many_steps_and_repeated_step_ids_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="3 steps, over the limit of 2"):
        check_steps([{"kind": "a"}] * 3, DualWritePolicy(max_steps=2))
    same = uuid.uuid4()
    with pytest.raises(InvalidInput, match="repeats"):
        check_steps(
            [{"kind": "a", "step_id": same}, {"kind": "b", "step_id": same}], DualWritePolicy()
        )


# -- validation happens before any I/O


class _Untouchable:
    """Stands for the pool and the Scylla handle: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"I/O attempted ({name}) before the input was validated")


def _deps(policy: DualWritePolicy | None = None) -> dual_write.DualWriteDeps:
    return dual_write.DualWriteDeps(
        _Untouchable(),  # type: ignore[arg-type]
        _Untouchable(),  # type: ignore[arg-type]
        policy or DualWritePolicy(),
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda d: dual_write.create_session("nope", deps=d),
        lambda d: dual_write.create_session(uuid.uuid4(), "t" * 501, deps=d),
        lambda d: dual_write.record_human_turn(uuid.uuid4(), "", deps=d),
        lambda d: dual_write.record_human_turn(uuid.uuid4(), "x" * 70_000, deps=d),
        lambda d: dual_write.record_human_turn("123", "hello", deps=d),
        lambda d: dual_write.record_human_turn(uuid.uuid4(), "hello", turn_id=7, deps=d),  # type: ignore[arg-type]
        lambda d: dual_write.record_agent_turn(uuid.uuid4(), "ok", steps=[{"kind": ""}], deps=d),
        lambda d: dual_write.record_agent_turn(uuid.uuid4(), "ok", model=None, deps=d),  # type: ignore[arg-type]
        lambda d: dual_write.rename_session(uuid.uuid4(), "\x00", deps=d),
        lambda d: dual_write.delete_session("", deps=d),
    ],
)
def test_invalid_calls_fail_before_any_io(call: Any) -> None:
    with pytest.raises(InvalidInput):
        call(_deps())


# -- the statements warmed up are the ones the projection produces


def test_warm_up_covers_every_read_model_upsert_and_delete() -> None:
    texts = {to_cql(m, "ks")[0] for m in warm_up_statements()}
    for rm in READ_MODELS:
        assert any(t.startswith(f"INSERT INTO ks.{rm} ") for t in texts), rm
        assert any(t.startswith(f"DELETE FROM ks.{rm} ") for t in texts), rm
    # conversation_timeline is fed by two tables with different value columns.
    assert len([t for t in texts if "INTO ks.conversation_timeline" in t]) == 2
    assert all(k in " ".join(texts) for cols in KEY_COLUMNS.values() for k in cols)


# -- the Scylla step's deadline is a wall-clock bound, whatever the driver does


class _SlowWriter:
    """Blocks like the driver did when a pooled connection had just gone defunct (2 s).
    ``prepared`` and ``open_`` are what the handle checks before sending on the caller's
    thread; by default a statement is not prepared yet, so every write takes the worker."""

    def __init__(self, seconds: float, *, prepared: bool = False, open_: bool = True) -> None:
        self.seconds = seconds
        self.prepared = prepared
        self.open_ = open_
        self.calls = 0
        self.batches = 0
        self.threads: list[str] = []

    def bound(self, mutations: Any) -> list[Any]:
        return list(mutations)

    def prepared_statements(self, mutations: Any) -> list[Any] | None:
        return list(mutations) if self.prepared else None

    def connections_open(self) -> bool:
        return self.open_

    def send_batch(self, statements: Any, timeout: float | None) -> int:
        self.threads.append(threading.current_thread().name)
        return self.write_batch(statements, timeout)

    def write(self, mutations: Any, timeout: float | None = None) -> int:
        self.calls += 1
        if not self.threads or self.threads[-1] != threading.current_thread().name:
            self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return len(mutations)

    def write_batch(self, mutations: Any, timeout: float | None = None) -> int:
        self.batches += 1
        return self.write(mutations, timeout)


def test_scylla_step_returns_within_its_deadline_even_if_the_driver_blocks() -> None:
    handle = ScyllaHandle(SCYLLA, _SlowWriter(0.5), max_in_flight=2)  # type: ignore[arg-type]
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="exceeded the 50 ms deadline"):
            handle.write(warm_up_statements()[:3], 0.05)
        assert time.monotonic() - t0 < 0.2
        # A second slow write fills the in-flight budget; the third is refused at once
        # instead of queueing behind a slow cluster.
        with pytest.raises(TransientError):
            handle.write([], 0.01)
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="still in flight"):
            handle.write([], 0.05)
        assert time.monotonic() - t0 < 0.02
    finally:
        handle.close()


def test_scylla_step_succeeds_when_the_writer_is_fast() -> None:
    writer = _SlowWriter(0.0)
    handle = ScyllaHandle(SCYLLA, writer, max_in_flight=1)  # type: ignore[arg-type]
    try:
        for _ in range(3):  # the slot is given back after each write
            handle.write([], 0.5)
        assert writer.calls == 3
    finally:
        handle.close()


def test_scylla_step_batches_small_writes_and_not_large_ones() -> None:
    writer = _SlowWriter(0.0)
    handle = ScyllaHandle(SCYLLA, writer, batch_max_bytes=1000)  # type: ignore[arg-type]
    sid, now = uuid.uuid4(), datetime.now(UTC)
    turn = {"id": uuid.uuid4(), "session_id": sid, "created_at": now, "updated_at": now}
    try:
        handle.write(project_row("human_turns", {**turn, "content": "hi"}), 0.5)
        assert (writer.calls, writer.batches) == (1, 1)
        # Content over the byte budget: separate writes, never one oversized batch the
        # store would reject (Cassandra fails batches above 50 KiB).
        handle.write(project_row("human_turns", {**turn, "content": "x" * 1001}), 0.5)
        assert (writer.calls, writer.batches) == (2, 1)
    finally:
        handle.close()
    with pytest.raises(ServiceUnavailable, match="not connected"):
        ScyllaHandle(SCYLLA, connect=False).write([], 0.05)


@pytest.mark.parametrize(
    ("prepared", "open_", "inline"),
    [(True, True, True), (False, True, False), (True, False, False)],
    ids=[
        "prepared and open: caller's thread",
        "not prepared: worker",
        "a closed connection: worker",
    ],
)
def test_a_small_write_is_sent_on_the_callers_thread_only_when_nothing_can_block(
    prepared: bool, open_: bool, inline: bool
) -> None:
    writer = _SlowWriter(0.0, prepared=prepared, open_=open_)
    handle = ScyllaHandle(SCYLLA, writer)  # type: ignore[arg-type]
    try:
        handle.write(warm_up_statements()[:3], 0.5)
        caller = threading.current_thread().name
        assert (writer.batches, writer.threads[-1] == caller) == (1, inline), writer.threads
    finally:
        handle.close()


def test_a_write_that_would_block_keeps_its_deadline_when_a_connection_is_closed() -> None:
    # Statements prepared, but a connection closed: the driver would wait 2 s to borrow one,
    # so the write goes to a worker and the caller waits only the deadline.
    handle = ScyllaHandle(SCYLLA, _SlowWriter(0.5, prepared=True, open_=False))  # type: ignore[arg-type]
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="exceeded the 50 ms deadline"):
            handle.write(warm_up_statements()[:3], 0.05)
        assert time.monotonic() - t0 < 0.2
    finally:
        handle.close()


def test_large_writes_take_the_worker_even_when_the_pool_is_healthy() -> None:
    writer = _SlowWriter(0.0, prepared=True)
    handle = ScyllaHandle(SCYLLA, writer, batch_max_bytes=1000)  # type: ignore[arg-type]
    sid, now = uuid.uuid4(), datetime.now(UTC)
    turn = {"id": uuid.uuid4(), "session_id": sid, "created_at": now, "updated_at": now}
    try:
        handle.write(project_row("human_turns", {**turn, "content": "x" * 1001}), 0.5)
        assert writer.batches == 0
        assert writer.threads[-1].startswith("dual-write-scylla"), writer.threads
    finally:
        handle.close()
