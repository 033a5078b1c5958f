"""Hostile input at the CDC consumer's own boundary (issue #14, "Hostile input").

Every message the consumer polls must end as projected and written mutations, as a
dead-letter entry whose error is classified (``RejectedData``: the consumer sets that one
message aside and goes on), or as one of the messages CDC ignores by design (a tombstone, a
heartbeat, a logical decoding message), and the consumer must commit past it: never an
unclassified crash, never a stuck consumer.

The fuzz drives the real ``CdcConsumer.run`` loop (``_prepare`` → ``ChangeBatch.add`` →
``decode_message`` → ``project``; ``BatchApplier.apply``; the commit; the metrics) and the real
``ScyllaWriter``, which binds every mutation with the Cassandra driver's own serializers. Only
the I/O is fake: the Kafka consumer serves the generated messages and records commits, the
Cassandra session prepares offline statements typed from the catalog and "executes" bound
requests, and the dead-letter topic records what the real producer would send (its headers are
built by the real ``dead_letter_headers``).
"""

from __future__ import annotations

import copy
import json
import math
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final
from unittest import mock

import pytest
from cassandra.query import BatchStatement, BoundStatement
from confluent_kafka import Message, TopicPartition
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from support.offline_scylla import OfflineSession
from tasks.adapters.scylla import ScyllaWriter
from tasks.cdc import consumer as consumer_module
from tasks.cdc.consumer import CdcConsumer, RunResult
from tasks.cdc.dead_letters import dead_letter_headers
from tasks.cdc.options import CdcOptions
from tasks.core.catalog import SOURCE_TABLES, SOURCES
from tasks.core.debezium import HEARTBEAT_TOPIC_PREFIX, MAX_EVENT_BYTES, decode_message
from tasks.core.errors import DecodeError, RejectedData
from tasks.settings import KafkaSettings, ScyllaSettings

KAFKA: Final = KafkaSettings(bootstrap_servers="127.0.0.1:1")
TOPICS: Final = {t: KAFKA.topic(t) for t in SOURCE_TABLES}
HEARTBEAT_TOPIC: Final = f"{HEARTBEAT_TOPIC_PREFIX}.cqrs"
KEYSPACE: Final = "fuzz"


# Deterministic (CI must not flake) and bounded: the whole module runs in about 15 s.
def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------
# Fakes for the I/O only


class FakeKafka:
    """The confluent-kafka Consumer as ``CdcConsumer.run`` uses it: serves ``queue``'s messages
    and records the offsets committed."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.queue: list[Message] = []
        self.commits: list[TopicPartition] = []
        self.on_commit = config["on_commit"]

    def subscribe(self, _topics: list[str], **_callbacks: Any) -> None:
        pass

    def poll(self, _timeout: float | None = None) -> Message | None:
        return self.queue.pop(0) if self.queue else None

    def consume(self, num_messages: int = 1, timeout: float | None = None) -> list[Message]:
        taken, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return taken

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.extend(offsets)
        self.on_commit(None, offsets)  # answered at once (the real one: on a later poll)

    def close(self) -> None:
        pass


class FakeDeadLetters:
    """What the real ``DeadLetters.send`` produces: the message byte for byte, and headers."""

    def __init__(self, _settings: KafkaSettings) -> None:
        self.sent: list[tuple[Message, BaseException, dict[str, bytes]]] = []

    def send(self, dead: list[tuple[Message, BaseException]]) -> None:
        for msg, exc in dead:
            headers = dead_letter_headers(msg, exc)
            assert all(isinstance(v, bytes) for _, v in headers), headers
            self.sent.append((msg, exc, {k: v for k, v in headers if isinstance(v, bytes)}))

    def close(self) -> None:
        pass


@dataclass
class Executed:
    """The bound values of every request the writer sent, in order."""

    values: list[list[bytes | None]] = field(default_factory=list)

    def __call__(
        self, _session: Any, requests: Iterable[tuple[Any, Any]], *_args: Any, **_kw: Any
    ) -> list[None]:
        out: list[None] = []
        for request, _ in requests:
            if isinstance(request, BoundStatement):
                self.values.append(list(request.values))
            elif isinstance(request, BatchStatement):
                for _is_prepared, _id, params in request._statements_and_parameters:
                    self.values.append(list(params))
            out.append(None)
        return out


@dataclass
class Outcome:
    result: RunResult
    dead: dict[int, tuple[BaseException, dict[str, bytes]]]  # by offset
    commits: dict[tuple[str, int], int]
    written: list[list[bytes | None]]
    seconds: float


@contextmanager
def offline_io() -> Iterator[Executed]:
    executed = Executed()
    with (
        mock.patch.object(consumer_module, "Consumer", FakeKafka),
        mock.patch.object(consumer_module, "DeadLetters", FakeDeadLetters),
        mock.patch("tasks.adapters.scylla.execute_windowed", executed),
    ):
        yield executed


def run_consumer(messages: list[tuple[str, bytes | None]]) -> Outcome:
    """The real consumer loop over these (topic, value) messages, one partition per topic,
    offsets from 0; stopped after 5 s if it has not finished (a stuck consumer)."""
    msgs = [
        Message(topic=topic, partition=0, offset=i, key=b'{"id":"k"}', value=value)
        for i, (topic, value) in enumerate(messages)
    ]
    with offline_io() as executed:
        writer = ScyllaWriter(OfflineSession(KEYSPACE), ScyllaSettings(), keyspace=KEYSPACE)  # type: ignore[arg-type]
        c = CdcConsumer(
            writer,
            CdcOptions(
                max_messages=len(msgs),
                batch_size=3,  # several batches: hostile and valid messages share some
                retry_initial_s=0.001,
                retry_max_s=0.001,
                report_interval_s=0.001,
            ),
            KAFKA,
        )
        fake: FakeKafka = c.consumer  # type: ignore[assignment]
        fake.queue = list(msgs)
        started = time.monotonic()
        result = c.run(
            topics=list(TOPICS.values()),
            should_stop=lambda: time.monotonic() - started > 5,
        )
    dlq: FakeDeadLetters = c.applier.dead_letters  # type: ignore[assignment]
    dead: dict[int, tuple[BaseException, dict[str, bytes]]] = {}
    for msg, exc, headers in dlq.sent:
        assert msg.offset() not in dead, f"message {msg.offset()} dead-lettered twice"
        dead[msg.offset() or 0] = (exc, headers)
    commits: dict[tuple[str, int], int] = {}
    for tp in fake.commits:
        commits[(tp.topic, tp.partition)] = max(commits.get((tp.topic, tp.partition), 0), tp.offset)
    return Outcome(result, dead, commits, executed.values, time.monotonic() - started)


def ignored_by_design(topic: str, value: bytes | None) -> bool:
    """A tombstone, a heartbeat or a logical decoding message: committed, nothing written."""
    if topic.startswith(HEARTBEAT_TOPIC_PREFIX) or value is None:
        return True
    try:
        body = json.loads(value)
    except (ValueError, RecursionError):
        return False
    if isinstance(body, dict) and body.keys() == {"schema", "payload"}:
        body = body["payload"]
    return isinstance(body, dict) and body.get("op") == "m"


def assert_every_message_accounted_for(
    messages: list[tuple[str, bytes | None]], out: Outcome
) -> None:
    res = out.result
    # Not stuck: every message consumed, and the run ended because they were all taken.
    assert res.stopped_by == "max_messages" and res.messages == len(messages), res
    # Committed past every message of every partition.
    last: dict[tuple[str, int], int] = {}
    for i, (topic, _) in enumerate(messages):
        last[(topic, 0)] = i + 1
    assert out.commits == last
    # Dead letters carry a classified error, named in their headers.
    for offset, (exc, headers) in out.dead.items():
        assert isinstance(exc, RejectedData), (offset, type(exc).__name__, exc)
        assert headers["dlq.error.class"] == type(exc).__name__.encode()
        assert headers["dlq.source.offset"] == str(offset).encode()
        assert headers["dlq.error"], "the error names the problem"
    ignored = sum(
        1
        for i, (topic, value) in enumerate(messages)
        if i not in out.dead and ignored_by_design(topic, value)
    )
    # Each message is exactly one of: applied, dead-lettered, ignored by design.
    assert res.dead_lettered == len(out.dead)
    assert res.changes + len(out.dead) + ignored == len(messages), (res, sorted(out.dead), ignored)


# --------------------------------------------------------------------------------------------
# Strategies

SID: Final = "6f1c3c1e-8d1a-4b7e-9d3f-0a1b2c3d4e5f"
T0: Final = "2026-11-28T07:47:42.123456Z"

# Every code point, lone surrogates included (hypothesis leaves them out by default).
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char, max_size=30)
# Huge, cheaply: one character repeated up to 1 MiB (the write model's cap on content).
huge_text = st.builds(lambda c, n: c * n, any_char, st.integers(0, 1 << 20))
big_int = st.integers(-(10**400), 10**400) | st.sampled_from([2**31, -(2**31) - 1, 2**63, -1, 0])
floats = st.floats(allow_nan=True, allow_infinity=True)
json_leaf = st.none() | st.booleans() | big_int | floats | any_text
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4),
    max_leaves=12,
)


hostile_timestamp = (
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00+00:01",  # before year 1 once in UTC
            "9999-12-31T23:59:59.999999Z",
            "9999-12-31T23:59:59.999999-00:01",  # after year 9999 once in UTC
            "0000-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T07:47:42.1234567891Z",
            "2026-11-28T07:47:42+99:99",
            "2026-11-28T07:47:42",  # no zone
            "1969-12-31T23:59:59.999999Z",
            "",
        ]
    )
    | any_text
)


def row(table: str, **values: Any) -> dict[str, Any]:
    """A valid after image of ``table`` as Debezium sends it (schemas.enable=false)."""
    base: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "created_at": T0,
        "updated_at": T0,
    }
    extra: dict[str, dict[str, Any]] = {
        "sessions": {
            "user_id": str(uuid.uuid4()),
            "title": "t",
            "last_message": "",
            "last_message_at": None,
            "turn_count": 0,
        },
        "human_turns": {"session_id": SID, "content": "hi"},
        "agent_turns": {"session_id": SID, "content": "hello", "model": "m"},
        "steps": {
            "agent_turn_id": str(uuid.uuid4()),
            "session_id": SID,
            "kind": "tool",
            "payload": '{"a": 1}',
        },
    }
    return base | extra[table] | values


def envelope(table: str, op: str, image: dict[str, Any], old: dict[str, Any] | None = None) -> Any:
    source = {
        "version": "3.6.1.Final",
        "connector": "postgresql",
        "name": "cqrs",
        "ts_ms": 1_795_851_000_000,
        "ts_us": 1_795_851_000_000_001,
        "snapshot": "false",
        "db": "cqrs",
        "schema": "public",
        "table": table,
        "txId": 771,
        "lsn": 24023928,
    }
    before, after = (image, None) if op == "d" else (old, image)
    return {
        "before": before,
        "after": after,
        "source": source,
        "op": op,
        "ts_ms": 1_795_851_000_040,
        "transaction": None,
    }


@st.composite
def valid_envelopes(draw: st.DrawFn) -> tuple[str, Any]:
    table = draw(st.sampled_from(SOURCE_TABLES))
    op = draw(st.sampled_from("crud"))
    image = row(table)
    old = row(table, id=image["id"]) if op == "u" and draw(st.booleans()) else None
    return table, envelope(table, op, image, old)


# Values of the wrong type or range for any field, tried first (shrinking goes to them too).
ODD_VALUES: Final[list[Any]] = [
    None,
    [],
    {},
    ["c"],
    {"op": "c"},
    "",
    "c",
    "u",
    "d",
    "r",
    "t",
    "m",
    "x",
    "sessions",
    "steps",
    "\ud800",
    True,
    -1,
    0,
    1.5,
    math.nan,
    math.inf,
    2**31,
    2**63,
    10**400,
    -(10**400),
]

# Where a hostile edit lands: top-level fields, the source block, and a column of an image.
Path = tuple[str, ...]
_ENVELOPE_FIELDS: Final[list[Path]] = [("op",), ("source",), ("before",), ("after",), ("ts_ms",)]
_SOURCE_FIELDS: Final[list[Path]] = [
    ("source", "table"),
    ("source", "ts_us"),
    ("source", "ts_ms"),
    ("source", "lsn"),
]
# Numbers a Debezium number field never holds: beyond an int64 and a float, not integers.
ODD_NUMBERS: Final[list[Any]] = [10**400, -(10**400), 2**63, -1, 1.5, math.nan, True, "1"]


@st.composite
def edited_envelopes(draw: st.DrawFn) -> tuple[str, Any]:
    """A valid envelope with a few fields removed or replaced by a value of the wrong type or
    range: in the envelope, in its source block, or a column of a row image."""
    table, env = draw(valid_envelopes())
    env = copy.deepcopy(env)
    columns: list[Path] = [
        (img, c.name) for img in ("before", "after") for c in SOURCES[table].columns
    ]
    # Mostly one edit: the rest of the envelope stays valid, so the edit reaches the deeper
    # steps (projection, the write, the commit, the metrics) instead of failing the decoding.
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        group = draw(st.sampled_from([_ENVELOPE_FIELDS, _SOURCE_FIELDS, columns]))
        path = draw(st.sampled_from(group))
        parent = env
        for p in path[:-1]:
            parent = parent.get(p) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        which = draw(st.integers(0, 9))
        if which == 0:
            parent.pop(path[-1], None)
        elif which <= 2 and group is _SOURCE_FIELDS:
            parent[path[-1]] = draw(st.sampled_from(ODD_NUMBERS))
        elif which <= 5:
            parent[path[-1]] = draw(st.sampled_from(ODD_VALUES))
        elif which <= 7:
            parent[path[-1]] = draw(hostile_timestamp)
        else:
            parent[path[-1]] = draw(json_value)
    if draw(st.integers(0, 3)) == 0:
        env = {"schema": None, "payload": env}  # schemas.enable=true, tolerated
    return table, env


def encode(obj: Any, mode: str) -> bytes:
    """JSON bytes of ``obj`` (NaN and Infinity as Python writes them, bare literals):
    ``escaped`` is ASCII (a lone surrogate as "\\ud800"), ``raw`` is UTF-8 with a lone
    surrogate as the bytes UTF-8 forbids."""
    if mode == "escaped":
        return json.dumps(obj, ensure_ascii=True).encode()
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def hostile_values(draw: st.DrawFn) -> bytes:
    """Bytes a Debezium topic should never hold, from noise to near-valid envelopes."""
    kind = draw(
        st.sampled_from(
            ["envelope"] * 6
            + ["skeleton"] * 3
            + ["odd source number"] * 2
            + ["noise", "json", "truncated", "deep", "huge-int", "non-object", "nul"]
        )
    )
    if kind == "noise":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return encode(draw(json_value), draw(st.sampled_from(["escaped", "raw"])))
    if kind == "odd source number":
        # One number of the source block out of type or range, the rest valid: the event
        # decodes and projects, so the number reaches the commit and the metrics.
        _, env = draw(valid_envelopes())
        field = draw(st.sampled_from(["ts_us", "ts_ms", "lsn"]))
        env = env | {"source": env["source"] | {field: draw(st.sampled_from(ODD_NUMBERS))}}
        return encode(env, "escaped")
    if kind == "skeleton":
        # The envelope's four fields, each absent, valid or odd: combinations of wrong types.
        _, env = draw(valid_envelopes())
        skeleton: dict[str, Any] = {}
        for name in ("op", "source", "before", "after"):
            choice = draw(st.integers(0, 3))
            if choice == 1:
                skeleton[name] = env[name]
            elif choice > 1:
                skeleton[name] = draw(st.sampled_from(ODD_VALUES))
        return encode(skeleton, draw(st.sampled_from(["escaped", "raw"])))
    _, env = draw(edited_envelopes())
    data = encode(env, draw(st.sampled_from(["escaped", "raw"])))
    if kind == "envelope":
        return data
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "deep":
        depth = draw(st.integers(500, 200_000))
        return b'{"op":"c","after":' * depth + b"1" + b"}" * depth
    if kind == "huge-int":
        # Beyond Python's 4300-digit limit for int(str): json.loads refuses them.
        digits = b"9" * draw(st.integers(4000, 6000))
        return data.replace(b'"ts_ms":', b'"ts_ms":' + digits, 1)
    if kind == "non-object":
        return draw(st.sampled_from([b"[]", b"1", b"-0", b"NaN", b"Infinity", b'"c"', b"null"]))
    return data.replace(b":", b":\x00", 1)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """One (topic, value): mostly hostile, sometimes a valid change, a tombstone or a
    heartbeat topic's message."""
    which = draw(st.integers(0, 9))
    if which == 0:
        table, env = draw(valid_envelopes())
        return TOPICS[table], encode(env, "escaped")
    topic = draw(st.sampled_from(list(TOPICS.values())))
    if which == 1:
        return draw(st.sampled_from([topic, HEARTBEAT_TOPIC])), draw(st.none() | hostile_values())
    return topic, draw(hostile_values())


messages_strategy = st.lists(messages(), min_size=1, max_size=7)

# --------------------------------------------------------------------------------------------
# Properties


@pytest.mark.slow
@fuzz(600)
@given(messages_strategy)
def test_hostile_messages_are_applied_ignored_or_dead_lettered_never_a_crash(
    messages: list[tuple[str, bytes | None]],
) -> None:
    with mock.patch("tasks.cdc.apply.log"), mock.patch("tasks.cdc.dead_letters.log"):
        out = run_consumer(messages)
    assert_every_message_accounted_for(messages, out)


# Column values a valid envelope may carry, hostile but within what Postgres stores.
legal_char = st.characters()  # hypothesis leaves lone surrogates out by default
legal_text = st.text(legal_char, max_size=40) | st.builds(
    lambda c, n: c * n, legal_char, st.integers(0, 1 << 20)
)
legal_timestamp = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999Z",
        "1969-12-31T23:59:59.999999Z",
        "1970-01-01T00:00:00Z",
        "2026-11-28T07:47:42.1234567Z",  # finer than Postgres keeps: truncated
        "2026-11-28T08:47:42.123456+01:00",
    ]
)


def nested(depth: int) -> Any:
    obj: Any = "leaf"
    for i in range(depth):
        obj = [obj] if i % 2 else {"k": obj}
    return obj


legal_payload = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | legal_text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(legal_text, kids, max_size=4),
    max_leaves=12,
) | st.integers(0, 400).map(nested)


@dataclass(frozen=True)
class Case:
    table: str
    envelope: Any
    hostile: str | None  # why it must be dead-lettered; None: it must be applied
    text: str | None = None  # a text value that must be written as is
    payload: Any = None  # a payload that must be written as equal JSON


@st.composite
def hostile_column_cases(draw: st.DrawFn) -> Case:
    """A valid envelope of each table whose column values are hostile: huge or odd text,
    deeply nested payloads, timestamps at and beyond the range a datetime holds, and lone
    surrogates, which no Postgres text holds and no driver can encode."""
    table = draw(st.sampled_from(SOURCE_TABLES))
    op = draw(st.sampled_from("cru"))
    text_col = {
        "sessions": "title",
        "human_turns": "content",
        "agent_turns": "content",
        "steps": "kind",
    }[table]
    values: dict[str, Any] = {}
    hostile: str | None = None
    text = draw(legal_text)
    values[text_col] = text
    if table == "agent_turns":
        values["model"] = draw(legal_text)
    payload: Any = None
    if table == "steps":
        payload = draw(legal_payload)
        values["payload"] = json.dumps(payload)
    ts = draw(legal_timestamp)
    values[draw(st.sampled_from(["created_at", "updated_at"]))] = ts
    if table == "sessions":
        values["last_message_at"] = draw(st.none() | legal_timestamp)
        values["turn_count"] = draw(st.sampled_from([0, 2**31 - 1, -(2**31)]))
    spoil = draw(st.sampled_from([None, "surrogate", "timestamp", "int", "payload", "depth"]))
    if spoil == "surrogate":
        values[text_col] = text + draw(st.sampled_from(["\ud800", "\udfff", "a\udc80b"]))
        hostile, text = "lone surrogate", None
    elif spoil == "timestamp":
        values["updated_at"] = draw(
            st.sampled_from(
                ["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01", "0000-01-01T00:00:00Z"]
            )
        )
        hostile = "timestamp beyond years 1..9999"
    elif spoil == "int" and table == "sessions":
        values["turn_count"] = draw(st.sampled_from([2**31, -(2**31) - 1, 10**30]))
        hostile = "int beyond a CQL int"
    elif spoil == "payload" and table == "steps":
        values["payload"] = draw(st.sampled_from(["{", "NaN", "[1,]", "{'a': 1}", "\ud800x"]))
        hostile, payload = "payload is not JSON", None
        if values["payload"] == "NaN":
            # Python's json reads NaN and writes it back: the read model holds the text NaN,
            # not JSON. No real change carries it (Postgres' jsonb cannot hold NaN).
            hostile, payload = None, math.nan
    elif spoil == "depth" and table == "steps":
        values["payload"] = "[" * 5000 + "]" * 5000
        hostile, payload = "payload nested deeper than the decoder's recursion limit", None
    image = row(table, **values)
    old = row(table, id=image["id"]) if op == "u" else None
    return Case(table, envelope(table, op, image, old), hostile, text, payload)


@pytest.mark.slow
@fuzz(300)
@given(st.lists(hostile_column_cases(), min_size=1, max_size=4))
@example([Case("human_turns", envelope("human_turns", "c", row("human_turns")), None, "hi")])
def test_valid_envelopes_with_hostile_values_are_written_as_is_or_dead_lettered(
    cases: list[Case],
) -> None:
    messages: list[tuple[str, bytes | None]] = [
        (TOPICS[c.table], encode(c.envelope, "escaped")) for c in cases
    ]
    with mock.patch("tasks.cdc.apply.log"), mock.patch("tasks.cdc.dead_letters.log"):
        out = run_consumer(messages)
    assert_every_message_accounted_for(messages, out)
    written = [v for values in out.written for v in values]
    for i, case in enumerate(cases):
        if case.hostile is not None:
            assert i in out.dead, f"{case.hostile}: not dead-lettered"
            continue
        assert i not in out.dead, (case, out.dead[i][0])
        if case.text is not None:
            # As is, byte for byte, in the bound values the driver would send.
            assert case.text.encode() in written
        if case.payload is not None and not (
            isinstance(case.payload, float) and math.isnan(case.payload)
        ):
            assert any(json_equal(v, case.payload) for v in written), case.payload


def json_equal(cell: bytes | None, payload: Any) -> bool:
    try:
        return cell is not None and bool(json.loads(cell) == payload)
    except (ValueError, RecursionError):
        return False


# --------------------------------------------------------------------------------------------
# The nastiest inputs, one by one (fast: `make test-unit` runs these)

HT: Final = TOPICS["human_turns"]
_VALID: Final = json.dumps(envelope("human_turns", "c", row("human_turns"))).encode()

NASTY: Final[list[tuple[str, str, bytes | None, type[BaseException] | None]]] = [
    ("tombstone", HT, None, None),
    ("heartbeat junk", HEARTBEAT_TOPIC, b"\xff" * 10, None),
    ("empty", HT, b"", DecodeError),
    ("invalid utf-8", HT, _VALID.replace(b'"hi"', b'"\xff\xfe"'), DecodeError),
    (
        "surrogate bytes in a table name",
        HT,
        b'{"op":"c","source":{"table":"\xed\xa0\x80"}}',
        DecodeError,
    ),
    # json.loads reads bytes with "surrogatepass": these become a lone surrogate in a str,
    # which the driver refuses to encode when the write is bound.
    ("surrogate bytes in content", HT, _VALID.replace(b'"hi"', b'"\xed\xa0\x80"'), RejectedData),
    ("array", HT, b"[1,2,3]", DecodeError),
    ("number", HT, b"12345", DecodeError),
    ("NaN literal", HT, b"NaN", DecodeError),
    ("huge int", HT, b'{"op":"c","ts_ms":' + b"9" * 5000 + b"}", DecodeError),
    ("deep nesting", HT, b"[" * 100_000 + b"]" * 100_000, DecodeError),
    ("truncated", HT, _VALID[: len(_VALID) // 2], DecodeError),
    ("over the size cap", HT, b" " * (MAX_EVENT_BYTES + 1), DecodeError),
    ("unknown op", HT, json.dumps({"op": "z", "source": {}}).encode(), DecodeError),
    ("op an array, no source", HT, b'{"op":[],"source":null}', DecodeError),
    ("op an object, no source", HT, b'{"op":{},"source":null}', DecodeError),
    ("unknown table", HT, _VALID.replace(b'"human_turns"', b'"users"'), DecodeError),
    ("source a string", HT, b'{"op":"c","source":"x","after":{}}', DecodeError),
    ("after an array", HT, _VALID.replace(b'"after": {', b'"after": [{', 1), DecodeError),
    (
        "commit time beyond a float",
        HT,
        _VALID.replace(b'"ts_us": 1', b'"ts_us": 1' + b"0" * 400),
        DecodeError,
    ),
    # Beyond 64 bits but within a float: orjson reads it as a float, json as the int it is.
    (
        "commit time an integer beyond 64 bits",
        HT,
        _VALID.replace(b'"ts_us": 1', b'"ts_us": 1' + b"0" * 25),
        DecodeError,
    ),
    ("NaN in an image", HT, _VALID.replace(b'"content": "hi"', b'"content": NaN'), DecodeError),
    ("truncate of a source table", HT, b'{"op":"t","source":{"table":"steps"}}', RejectedData),
    ("lone surrogate content", HT, _VALID.replace(b'"hi"', b'"\\ud800"'), RejectedData),
]


@pytest.mark.parametrize(
    ("topic", "value", "error"), [n[1:] for n in NASTY], ids=[n[0] for n in NASTY]
)
def test_each_nasty_input_is_dead_lettered_with_a_classified_error(
    topic: str, value: bytes | None, error: type[BaseException] | None
) -> None:
    # Between two valid changes: they are applied whatever the middle one does.
    messages: list[tuple[str, bytes | None]] = [(HT, _VALID), (topic, value), (HT, _VALID)]
    with mock.patch("tasks.cdc.apply.log"), mock.patch("tasks.cdc.dead_letters.log"):
        out = run_consumer(messages)
    assert_every_message_accounted_for(messages, out)
    assert out.result.changes == 2
    if error is None:
        assert not out.dead
    else:
        assert list(out.dead) == [1] and isinstance(out.dead[1][0], error), out.dead


def test_a_heartbeat_whose_time_is_not_a_time_only_advances_offsets() -> None:
    # Heartbeat times feed float arithmetic too (latency, freshness): beyond a float's range
    # they are dropped, as a malformed heartbeat is, never raised.
    for ts_ms in (b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1" + b"0" * 20):
        event = decode_message(HEARTBEAT_TOPIC, None, b'{"ts_ms": ' + ts_ms + b"}")
        assert event.kind == "heartbeat" and event.commit_ts_us is None
    assert decode_message(HEARTBEAT_TOPIC, None, b'{"ts_ms": 1700000000000}').commit_ts_us == (
        1_700_000_000_000_000
    )
