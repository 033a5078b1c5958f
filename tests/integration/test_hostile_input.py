"""Hostile messages on the real CDC topics (issue #14, "Hostile input"), between genuine
changes of the same partitions: each hostile one lands on the dead-letter topic with headers
naming its error, the genuine ones reach Cassandra, and the consumer's committed offsets move
past all of them. The categories are the nastiest of tests/unit/cdc/test_hostile_input.py,
including the two that crashed or misclassified before issue #14's fixes (a commit time beyond
a float, an op that is a JSON array with no source)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, Producer

from support.cdc_probe import ChangeTap, LocalCdc, TappedEvent, end_offsets
from tasks.adapters import kafka
from tasks.core.debezium import DecodedEvent
from tasks.settings import get_settings
from tests.integration.readmodels import agree, differences, wait_for
from tests.integration.test_cdc_faults import dlq_messages, headers_of

CFG = get_settings()
NOW: Final = "2026-11-28T07:47:42.123456Z"
# The broker's and the dead-letter producer's cap allow a copy of a record of this size.
PRODUCER_MAX_BYTES: Final = 17 * 1024 * 1024


@dataclass(frozen=True)
class Hostile:
    name: str
    table: str
    value: bytes | None
    error_class: str | None  # None: ignored by design (a tombstone), never dead-lettered
    error_says: str = ""


def envelope(table: str, after: dict[str, Any], **source: Any) -> dict[str, Any]:
    return {
        "before": None,
        "after": after,
        "op": "c",
        "source": {"table": table, "ts_us": int(time.time() * 1e6), "lsn": 1} | source,
    }


def turn_row(content: str, **values: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "content": content,
        "created_at": NOW,
        "updated_at": NOW,
    } | values


def step_row(payload: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "agent_turn_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "kind": "tool",
        "payload": payload,
        "created_at": NOW,
        "updated_at": NOW,
    }


def encoded(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # ASCII: a lone surrogate travels as "\ud800"


def hostile_messages() -> dict[str, list[Hostile]]:
    """By source table: what each topic gets between its genuine changes."""
    valid_turn = encoded(envelope("human_turns", turn_row("hi")))
    return {
        "sessions": [
            # Crashed the consumer run after its commit (OverflowError in the latency metric).
            Hostile(
                "commit time beyond a float",
                "sessions",
                encoded(
                    envelope(
                        "sessions",
                        {
                            "id": str(uuid.uuid4()),
                            "user_id": str(uuid.uuid4()),
                            "title": "t",
                            "last_message": "",
                            "last_message_at": None,
                            "turn_count": 0,
                            "created_at": NOW,
                            "updated_at": NOW,
                        },
                        ts_us=10**400,
                    )
                ),
                "DecodeError",
                "source.ts_us is not a time",
            ),
            # Was dead-lettered as an unclassified TypeError (unhashable op).
            Hostile(
                "op an array, no source",
                "sessions",
                b'{"op":[],"source":null}',
                "DecodeError",
                "no source object",
            ),
            Hostile("NaN literal", "sessions", b"NaN", "DecodeError", "must be a JSON object"),
            Hostile("tombstone", "sessions", None, None),
        ],
        "human_turns": [
            # json.loads reads bytes with "surrogatepass": these bytes become a lone
            # surrogate, which the driver cannot encode (set aside when the write is bound).
            Hostile(
                "a lone surrogate's bytes (invalid UTF-8) in content",
                "human_turns",
                valid_turn.replace(b'"hi"', b'"\xed\xa0\x80"'),
                "RejectedData",
                "content",
            ),
            Hostile(
                "invalid UTF-8",
                "human_turns",
                valid_turn.replace(b'"hi"', b'"\xff\xfe"'),
                "DecodeError",
                "invalid JSON",
            ),
            Hostile(
                "lone surrogate escape in content",
                "human_turns",
                valid_turn.replace(b'"hi"', b'"\\ud800"'),
                "RejectedData",
                "content",
            ),
            Hostile(
                "updated_at beyond year 9999",
                "human_turns",
                encoded(
                    envelope("human_turns", turn_row("x", updated_at="9999-12-31T23:59:59-00:01"))
                ),
                "DecodeError",
                "updated_at",
            ),
            Hostile(
                "truncated",
                "human_turns",
                valid_turn[: len(valid_turn) // 2],
                "DecodeError",
                "invalid JSON",
            ),
        ],
        "agent_turns": [
            Hostile(
                "nesting 100,000 deep",
                "agent_turns",
                b'{"op":"c","after":' * 100_000 + b"1" + b"}" * 100_000,
                "DecodeError",
                "recursion",
            ),
            Hostile(
                "a 5,000-digit integer",
                "agent_turns",
                b'{"op":"c","source":{"ts_ms":' + b"9" * 5000 + b"}}",
                "DecodeError",
                "invalid JSON",
            ),
            Hostile(
                "over the 16 MiB event cap",
                "agent_turns",
                b" " * (16 * 1024 * 1024 + 1),
                "DecodeError",
                "exceeds",
            ),
        ],
        "steps": [
            Hostile(
                "payload nested 5,000 deep",
                "steps",
                encoded(envelope("steps", step_row("[" * 5000 + "]" * 5000))),
                "DecodeError",
                "steps.payload",
            ),
            Hostile(
                "not a source table",
                "steps",
                encoded(envelope("users", step_row("{}"))),
                "DecodeError",
                "not a source table",
            ),
        ],
    }


def changed(table: str, **after: Any) -> Callable[[DecodedEvent], bool]:
    """The change of this row (with these values) in a ChangeTap."""

    def match(e: DecodedEvent) -> bool:
        c = e.change
        row = c.after or {} if c is not None else {}
        return c is not None and c.table == table and all(row.get(k) == v for k, v in after.items())

    return match


@dataclass(frozen=True)
class Produced:
    hostile: Hostile
    topic: str
    partition: int
    offset: int


def produce_into(partition_of: TappedEvent, hostiles: list[Hostile]) -> list[Produced]:
    """Produce into the partition of a genuine change (after it), and say where each landed."""
    producer = Producer(
        kafka.producer_config(CFG.kafka, **{"message.max.bytes": PRODUCER_MAX_BYTES})
    )
    landed: list[Message] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        landed.append(msg)

    for h in hostiles:
        producer.produce(
            partition_of.topic,
            key=b'{"id":"hostile"}',
            value=h.value,
            partition=partition_of.partition,
            on_delivery=delivered,
        )
        producer.flush(60)  # one at a time: landed[i] is hostiles[i]
    assert producer.flush(60) == 0 and len(landed) == len(hostiles)
    return [
        Produced(h, m.topic() or "", m.partition() or 0, m.offset() or 0)
        for h, m in zip(hostiles, landed, strict=True)
    ]


def test_hostile_messages_are_dead_lettered_and_the_genuine_changes_around_them_applied(
    cdc_consumer: LocalCdc, cql: Any, pg_app: psycopg.Connection[Any]
) -> None:
    c = Consumer(kafka.consumer_config(CFG.kafka, **{"group.id": f"t-{uuid.uuid4()}"}))
    dlq_start = end_offsets(c, [CFG.kafka.dead_letter_topic])
    c.close()
    pg_app.autocommit = True
    hostile = hostile_messages()
    user, session, human, agent, step = (uuid.uuid4() for _ in range(5))
    # Genuine changes whose values are hostile but legal: astral, bidi and control characters,
    # a title at its 10,000-character cap, a payload nested 200 deep with odd keys and numbers.
    content = "hé 😀 \x01\x7f \u202e ﷽ " + "\U0010fffd" * 3
    title = "t" * 10_000
    nested: Any = {"": None}
    for i in range(200):
        nested = [nested] if i % 2 else {"\u202ek" if i == 7 else "k": nested, "n": -(2**63)}
    writes: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
        (
            "sessions",
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s)",
            (session, user, title),
            {"id": session},
        ),
        (
            "human_turns",
            "INSERT INTO human_turns (id, session_id, content) VALUES (%s, %s, %s)",
            (human, session, content),
            {"id": human},
        ),
        (
            "agent_turns",
            "INSERT INTO agent_turns (id, session_id, content, model) VALUES (%s, %s, %s, 'm')",
            (agent, session, content * 1000),
            {"id": agent},
        ),
        (
            "steps",
            "INSERT INTO steps (id, agent_turn_id, session_id, kind, payload) "
            "VALUES (%s, %s, %s, 'tool', %s)",
            (step, agent, session, json.dumps(nested)),
            {"id": step},
        ),
        (
            "sessions",
            "UPDATE sessions SET title = 'renamed' WHERE id = %s",
            (session,),
            {"id": session, "title": "renamed"},
        ),
    ]
    genuine: list[TappedEvent] = []
    produced: list[Produced] = []
    for table, sql, params, row in writes:
        # A tap per write, from the topics' end: it never reads the hostile messages.
        tap = ChangeTap(CFG.kafka)
        pg_app.execute(sql, params)
        (event,) = tap.collect(changed(table, **row), 1, 60)
        tap.close()
        genuine.append(event)
        # Hostile messages right after it in its partition, before the next genuine one.
        produced += produce_into(event, hostile.pop(table, []))
    assert not hostile

    # Not stuck: the group committed past every genuine and every hostile message...
    positions = genuine + [
        TappedEvent(p.topic, p.partition, p.offset, DecodedEvent("skip", None, None, None))
        for p in produced
    ]  # ``applied`` reads only the positions
    assert wait_for(lambda: cdc_consumer.applied(positions), 120), (
        f"offsets did not move past; {cdc_consumer.where()}"
    )
    assert not cdc_consumer.errors
    # ...the genuine changes reached Cassandra (the oracle: the SQL views)...
    if not wait_for(lambda: agree(cql, [user], [session], (agent,)), 60):
        assert differences(cql, [user], [session], (agent,)) == []
    # ...as they were written (literal values, not the projection's).
    header = cql.execute("SELECT * FROM sessions_by_id WHERE session_id = %s", (session,)).one()
    assert (header.title, header.turn_count) == ("renamed", 2)
    timeline = {
        r.turn_id: (r.role, r.content)
        for r in cql.execute(
            "SELECT * FROM conversation_timeline WHERE session_id = %s", (session,)
        )
    }
    assert timeline == {human: ("human", content), agent: ("agent", content * 1000)}
    (written,) = cql.execute("SELECT payload FROM steps_by_turn WHERE agent_turn_id = %s", (agent,))
    assert json.loads(written.payload) == nested

    # Every hostile message is on the dead-letter topic, byte for byte, its error named.
    wanted = {(p.topic, p.partition, p.offset): p for p in produced}
    seen: set[tuple[str, int, int]] = set()

    def first_copy(m: Message) -> bool:
        # Another consumer of the topics (a served `cdc` deployment) may dead-letter them too.
        where = source_of(m)
        if where not in wanted or where in seen:
            return False
        seen.add(where)
        return True

    expected = [p for p in produced if p.hostile.error_class]
    dead = dlq_messages(dlq_start, first_copy, len(expected), timeout_s=60)
    missing = sorted(
        p.hostile.name for p in expected if (p.topic, p.partition, p.offset) not in seen
    )
    assert not missing, f"not dead-lettered: {missing}"
    for m in dead:
        p = wanted[source_of(m)]
        h = headers_of(m)
        assert h["dlq.error.class"] == p.hostile.error_class, (p.hostile.name, h)
        assert p.hostile.error_says in h["dlq.error"], (p.hostile.name, h["dlq.error"])
        assert m.value() == p.hostile.value, p.hostile.name
    # The tombstone was committed past (above) and not dead-lettered.
    assert all(p.hostile.error_class for p in produced if (p.topic, p.partition, p.offset) in seen)


def source_of(m: Message) -> tuple[str, int, int]:
    h = headers_of(m)
    return (
        h.get("dlq.source.topic", ""),
        int(h.get("dlq.source.partition", "-1")),
        int(h.get("dlq.source.offset", "-1")),
    )
