"""Decoding Debezium PostgreSQL envelopes (JsonConverter, schemas.enable=false)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tasks.core.debezium import MAX_EVENT_BYTES, DecodedEvent, decode_message
from tasks.core.errors import DecodeError
from tasks.core.projection import (
    PLACEHOLDER_TEXT,
    UNAVAILABLE,
    Upsert,
    project,
    tombstone_version,
)

TOPIC = "cqrs.public.agent_turns"
SID = "6f1c3c1e-8d1a-4b7e-9d3f-0a1b2c3d4e5f"
TID = "0b8e6a52-3f6d-4c1e-8a7b-2d4c6e8f0a1b"
AFTER = {
    "id": TID,
    "session_id": SID,
    "content": "Sure, here is the plan.",
    "model": "gpt-x",
    "created_at": "2026-11-28T07:47:42.123456Z",
    "updated_at": "2026-11-28T07:47:42.123456Z",
}
COMMIT_US = 1_795_851_000_000_001


def envelope(
    op: str, before: dict[str, Any] | None, after: dict[str, Any] | None, **source: Any
) -> dict[str, Any]:
    src = {
        "version": "3.6.1.Final",
        "connector": "postgresql",
        "name": "cqrs",
        "ts_ms": COMMIT_US // 1000,
        "ts_us": COMMIT_US,
        "ts_ns": COMMIT_US * 1000,
        "snapshot": "false",
        "db": "cqrs",
        "sequence": '["24023928","24023928"]',
        "schema": "public",
        "table": "agent_turns",
        "txId": 771,
        "lsn": 24023928,
        "xmin": None,
    } | source
    return {
        "before": before,
        "after": after,
        "source": src,
        "op": op,
        "ts_ms": COMMIT_US // 1000 + 40,
        "ts_us": COMMIT_US + 40_000,
        "ts_ns": (COMMIT_US + 40_000) * 1000,
        "transaction": None,
    }


def decode(env: Any, topic: str = TOPIC) -> DecodedEvent:
    key = json.dumps({"id": TID}).encode()
    return decode_message(topic, key, json.dumps(env).encode())


def test_create() -> None:
    ev = decode(envelope("c", None, AFTER))
    assert ev.kind == "change" and ev.commit_ts_us == COMMIT_US and ev.lsn == 24023928
    ch = ev.change
    assert ch is not None and ch.table == "agent_turns" and ch.op == "c" and ch.before is None
    assert ch.after is not None and ch.after["id"] == uuid.UUID(TID)
    assert ch.after["created_at"] == datetime(2026, 11, 28, 7, 47, 42, 123456, tzinfo=UTC)
    updated = datetime(2026, 11, 28, 7, 47, 42, 123456, tzinfo=UTC)
    assert ch.version_us == (updated - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        microseconds=1
    )


def test_update_with_key_change_and_delete_projection() -> None:
    moved = AFTER | {
        "session_id": str(uuid.UUID(int=9)),
        "updated_at": "2026-11-28T07:47:43.000001Z",
    }
    ev = decode(envelope("u", AFTER, moved))
    assert ev.change is not None and ev.change.before is not None
    kinds = [type(m).__name__ for m in project(ev.change)]
    assert kinds == ["Delete", "Upsert"]


def test_delete_version_is_the_deleted_version_plus_one_microsecond() -> None:
    ev = decode(envelope("d", AFTER, None))
    assert ev.kind == "change" and ev.change is not None
    assert ev.change.op == "d" and ev.change.after is None
    assert ev.change.before is not None
    assert ev.change.version_us == tombstone_version(ev.change.before)
    assert ev.commit_ts_us == COMMIT_US  # the commit time still measures latency
    env = envelope("d", AFTER, None)
    del env["source"]["ts_us"]
    assert decode(env).change == ev.change
    without = envelope("d", {k: v for k, v in AFTER.items() if k != "updated_at"}, None)
    with pytest.raises(DecodeError, match="updated_at"):
        decode(without)


def test_snapshot_read() -> None:
    ev = decode(envelope("r", None, AFTER, snapshot="true"))
    assert ev.kind == "change" and ev.change is not None and ev.change.op == "r"


def test_tombstone_and_heartbeat() -> None:
    assert decode_message(TOPIC, b'{"id":"x"}', None) == DecodedEvent("tombstone", None, None, None)
    hb = decode_message(
        "__debezium-heartbeat.cqrs", b'{"serverName":"cqrs"}', b'{"ts_ms": 1700000000000}'
    )
    assert hb == DecodedEvent("heartbeat", None, 1_700_000_000_000_000, None)
    assert decode_message("__debezium-heartbeat.cqrs", None, b"junk").kind == "heartbeat"


def test_truncate_names_its_table_and_a_message_is_skipped() -> None:
    # A truncate is decoded (the consumer refuses it loudly), not skipped.
    assert decode(envelope("t", None, None)) == DecodedEvent(
        "truncate", None, COMMIT_US, 24023928, "agent_turns"
    )
    other = envelope("t", None, None)
    other["source"]["table"] = "pg_something"
    with pytest.raises(DecodeError, match="not a source table"):
        decode(other)
    msg = {
        "op": "m",
        "ts_ms": 1,
        "source": {"ts_us": COMMIT_US, "lsn": 5},
        "message": {"prefix": "p", "content": "eA=="},
    }
    assert decode(msg) == DecodedEvent("skip", None, COMMIT_US, 5)


def test_toast_placeholder_and_unknown_column() -> None:
    after = AFTER | {
        "content": PLACEHOLDER_TEXT,
        "tokens": 1234,
        "updated_at": "2026-11-28T07:47:44Z",
    }
    ev = decode(envelope("u", None, after))
    assert ev.change is not None and ev.change.after is not None
    assert ev.change.after["content"] is UNAVAILABLE and "tokens" not in ev.change.after
    (up,) = project(ev.change)
    assert isinstance(up, Upsert) and "content" not in dict(up.values)
    # With REPLICA IDENTITY FULL the before image fills it in.
    (up,) = project(decode(envelope("u", AFTER, after)).change)  # type: ignore[arg-type]
    assert isinstance(up, Upsert) and dict(up.values)["content"] == AFTER["content"]


def test_table_falls_back_to_topic() -> None:
    env = envelope("c", None, AFTER)
    del env["source"]["table"]
    ev = decode(env, "cqrs.public.agent_turns")
    assert ev.change is not None and ev.change.table == "agent_turns"


def test_schemas_enabled_envelope_is_tolerated() -> None:
    ev = decode({"schema": {"type": "struct"}, "payload": envelope("c", None, AFTER)})
    assert ev.kind == "change"


@pytest.mark.parametrize(
    "value,message",
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
        (json.dumps(envelope("x", None, AFTER)).encode(), "unknown op 'x'"),
        (json.dumps(envelope(None, None, AFTER)).encode(), "unknown op"),  # type: ignore[arg-type]
        (json.dumps({"op": "c", "after": AFTER}).encode(), "no source"),
        (json.dumps(envelope("c", None, AFTER, table="users")).encode(), "not a source table"),
        (json.dumps(envelope("c", None, None)).encode(), "without after"),
        (
            json.dumps(envelope("c", None, [1])).encode(),  # type: ignore[arg-type]
            "after must be an object",
        ),
        (json.dumps(envelope("d", None, None)).encode(), "REPLICA IDENTITY FULL"),
        (json.dumps(envelope("c", None, AFTER, ts_us="soon")).encode(), "source.ts_us"),
        (
            json.dumps(envelope("c", None, AFTER | {"session_id": 42})).encode(),
            r"agent_turns\.session_id: expected a uuid",
        ),
        (
            json.dumps(envelope("c", None, AFTER | {"created_at": 1764316062123})).encode(),
            r"agent_turns\.created_at",
        ),
        (json.dumps(envelope("c", None, {"id": TID})).encode(), "required column missing"),
        (json.dumps(envelope("u", None, AFTER | {"id": PLACEHOLDER_TEXT})).encode(), None),
    ],
)
def test_undecodable_messages(value: bytes, message: str | None) -> None:
    if message is None:  # decodes, but cannot be projected: placeholder in a key column
        ev = decode_message(TOPIC, None, value)
        assert ev.change is not None
        with pytest.raises(DecodeError, match="placeholder"):
            project(ev.change)
        return
    with pytest.raises(DecodeError, match=message) as info:
        decode_message(TOPIC, None, value)
    assert TOPIC in str(info.value)


def test_huge_payload_is_refused_before_parsing() -> None:
    value = b" " * (MAX_EVENT_BYTES + 1)
    with pytest.raises(DecodeError, match="exceeds"):
        decode_message(TOPIC, None, value)
