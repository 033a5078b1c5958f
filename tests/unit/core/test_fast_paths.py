"""The decoding fast paths (issue #13) against the reference each one shortcuts: same result,
or the same error class and message, for every input tried.

- an envelope: orjson's reading, kept only where it equals ``json.loads``;
- a jsonb value: orjson's canonical text against ``canonical_json(json.loads(text))``;
- a uuid: ``uuid_from_text`` against ``uuid.UUID``;
- a timestamp: ``parse_iso``'s C-parser path against the pattern alone;
- a change: ``project`` of ``decode_message``'s normalized change against the same change
  normalized again, as ``project`` did before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tasks.core import codec
from tasks.core.codec import JSONB, canonical_json, uuid_from_text
from tasks.core.debezium import _parse, decode_message
from tasks.core.errors import DecodeError
from tasks.core.projection import PLACEHOLDER_TEXT, project
from tasks.core.timestamps import parse_iso, parse_iso_pattern

FAST = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def outcome(fn: Callable[[Any], Any], v: Any) -> tuple[str, str]:
    """What ``fn(v)`` gives: ("ok", repr of the result: an int and an equal float differ) or
    the error's class and message."""
    try:
        return "ok", repr(fn(v))
    except Exception as exc:
        return type(exc).__name__, str(exc)


# --------------------------------------------------------------------------------------------
# JSON

any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too
big_int = st.integers(-(10**30), 10**30) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**19)]
)
floats = st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    st.none() | st.booleans() | big_int | floats | any_text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4),
    max_leaves=16,
)


def nested(depth: int) -> Any:
    obj: Any = 1
    for i in range(depth):
        obj = [obj] if i % 2 else {"k": obj}
    return obj


def texts_of(obj: Any) -> list[str]:
    """The JSON texts of ``obj`` a source may send: ASCII-escaped or not, spaced or compact
    (Python's NaN and Infinity literals included, which json reads and orjson refuses)."""
    out = []
    for ensure_ascii in (True, False):
        for separators in ((", ", ": "), (",", ":")):
            with contextlib.suppress(ValueError, RecursionError):
                out.append(json.dumps(obj, ensure_ascii=ensure_ascii, separators=separators))
    return out


ODD_JSON = [
    "NaN",
    "[Infinity, -Infinity]",
    "1e400",
    '{"a": 123456789012345678901234567890}',
    '{"a": 18446744073709551616, "b": -9223372036854775809}',
    '{"a": 1.0, "b": 1}',
    '"\\ud800"',
    '{"\\udfff": 1}',
    '{"a": 1, "a": 2}',
    "\ufeff{}",
    "[" * 70 + "]" * 70,
    "[" * 2000 + "]" * 2000,
    "9" * 5000,
    '{"x": "\\u0000\\u001f\\u007f\\u2028"}',
]


@pytest.mark.parametrize("text", ODD_JSON)
def test_jsonb_text_fast_path_is_canonical_json_odd_inputs(text: str) -> None:
    assert outcome(JSONB.decode, text) == outcome(lambda t: canonical_json(json.loads(t)), text), (
        text
    )


@FAST
@given(json_values | st.integers(0, 300).map(nested))
def test_jsonb_text_fast_path_is_canonical_json(obj: Any) -> None:
    for text in texts_of(obj):
        assert outcome(JSONB.decode, text) == outcome(
            lambda t: canonical_json(json.loads(t)), text
        ), text


def test_jsonb_fast_path_is_taken_for_plain_json() -> None:
    # Not only correct but used: a float-free payload never reaches json.
    text = '{"b": [1, {"z": null, "a": true}], "a": "é\\n😀", "n": 18446744073709551615}'
    assert codec._canonical_json_text(text) == canonical_json(json.loads(text))
    for refused in ('{"a": 1.5}', '{"a": 123456789012345678901234567890}', "NaN"):
        assert codec._canonical_json_text(refused) is None


def envelope_texts(obj: Any) -> list[bytes]:
    return [t.encode("utf-8", "surrogatepass") for t in texts_of(obj)]


@FAST
@given(
    st.fixed_dictionaries(
        {"op": json_values, "source": json_values, "after": json_values},
        optional={"before": json_values, "ts_ms": big_int | floats},
    )
    | json_values
)
@example({"op": "c", "source": {"ts_us": 10**25}, "after": {"turn_count": 2**64}})
@example({"op": "c", "source": {"ts_us": 1.5}, "after": {}})
@example({"schema": None, "payload": {"op": "c", "source": {}, "after": {"a": [1]}}})
def test_envelope_parse_is_json_loads(obj: Any) -> None:
    for data in envelope_texts(obj):
        assert outcome(_parse, data) == outcome(json.loads, data), data[:200]


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"c","source":{"ts_us":123456789012345678901234567890}}',
        b'{"op":"c","source":{},"after":{"turn_count":-9223372036854775809}}',
        b'{"op":"c","source":{},"after":{"payload":{"a":[1,{"b":1e400}]}}}',
        b'{"op":"c","after":' * 900 + b"1" + b"}" * 900,
        b"\xef\xbb\xbf{}",
        b'{"a":"\xed\xa0\x80"}',
        b'{"a":"\\ud800"}',
        b'{"a":NaN}',
        b"[]",
        b"123456789012345678901234567890",
    ],
)
def test_envelope_parse_is_json_loads_odd_inputs(data: bytes) -> None:
    assert outcome(_parse, data) == outcome(json.loads, data)


# --------------------------------------------------------------------------------------------
# uuids

HEXISH = "0123456789abcdefABCDEF-_ +x:{}urn٣\x00"


@FAST
@given(
    st.uuids().map(str)
    | st.uuids().map(lambda u: str(u).upper())
    | st.text(st.sampled_from(HEXISH), min_size=30, max_size=42)
    | st.lists(st.sampled_from(["-", "_", " ", "+", "0x", "{", "}", "urn:", "uuid:"]))
    .map("".join)
    .flatmap(lambda extra: st.uuids().map(lambda u: (extra + str(u))[:36]))
)
@example("0x" + "1" * 30 + "----")
@example("{12345678-1234-1234-1234-12345678901}")
@example("urn:12345678-1234-1234-1234-1234567")
def test_uuid_from_text_is_uuid_uuid(text: str) -> None:
    def same(u: uuid.UUID) -> tuple[int, uuid.SafeUUID]:
        assert type(u) is uuid.UUID
        return u.int, u.is_safe

    codec._UUIDS.clear()
    for _ in range(2):  # computed, then from the cache
        assert outcome(lambda t: same(uuid_from_text(t)), text) == outcome(
            lambda t: same(uuid.UUID(t)), text
        ), text


def test_uuid_cache_is_bounded() -> None:
    codec._UUIDS.clear()
    for i in range(codec._UUIDS_MAX + 10):
        uuid_from_text(str(uuid.UUID(int=i)))
    assert len(codec._UUIDS) <= codec._UUIDS_MAX


# --------------------------------------------------------------------------------------------
# timestamps

DIGITISH = "0123456789٣ +-_"


@st.composite
def debezium_shaped(draw: st.DrawFn) -> str:
    """Text of Debezium's timestamp shape, its digits sometimes replaced by odd characters."""
    digit = st.sampled_from("0123456789") | st.sampled_from(DIGITISH)

    def digits(n: int) -> str:
        return "".join(draw(digit) for _ in range(n))

    fraction = draw(st.sampled_from(["", *(f".{'x' * n}" for n in range(0, 10))]))
    fraction = "".join(draw(digit) if c == "x" else c for c in fraction)
    return (
        f"{digits(4)}-{digits(2)}-{digits(2)}"
        f"{draw(st.sampled_from('TT t'))}{digits(2)}:{digits(2)}:{digits(2)}"
        f"{fraction}{draw(st.sampled_from(['Z', 'Z', 'z', '+00:00', '']))}"
    )


@FAST
@given(debezium_shaped() | st.datetimes().map(lambda d: d.isoformat() + "Z"))
@example("2026-11-28T24:00:00Z")
@example("2026-11-28T23:59:60Z")
@example("2026-02-30T00:00:00Z")
@example("0000-01-01T00:00:00Z")
@example("9999-12-31T23:59:59.999999Z")
@example("0001-01-01T00:00:00Z")
@example("2026-11-28T07:47:42.Z")
@example("2026-11-28T07:47:42.1234567Z")
@example("2026-11-28T07:47:42,123Z")
@example("2026-11-28T07:47:4٣.123Z")
def test_parse_iso_fast_path_is_the_pattern(text: str) -> None:
    assert outcome(parse_iso, text) == outcome(parse_iso_pattern, text), text


# --------------------------------------------------------------------------------------------
# A change normalized once


SID = "6f1c3c1e-8d1a-4b7e-9d3f-0a1b2c3d4e5f"
T = "2026-11-28T07:47:42.123456Z"
ROWS: dict[str, dict[str, Any]] = {
    "sessions": {
        "id": SID,
        "user_id": str(uuid.UUID(int=7)),
        "title": "t",
        "created_at": T,
        "updated_at": "2026-11-28T07:47:43Z",
        "last_message": "hi",
        "last_message_at": T,
        "turn_count": 3,
    },
    "human_turns": {
        "id": str(uuid.UUID(int=1)),
        "session_id": SID,
        "content": "hi",
        "created_at": T,
        "updated_at": T,
    },
    "agent_turns": {
        "id": str(uuid.UUID(int=2)),
        "session_id": SID,
        "content": "hello",
        "model": "m",
        "created_at": T,
        "updated_at": "2026-11-28T07:47:42.5Z",
    },
    "steps": {
        "id": str(uuid.UUID(int=3)),
        "agent_turn_id": str(uuid.UUID(int=2)),
        "session_id": SID,
        "kind": "tool",
        "payload": '{"b": [1.5, 2], "a": {"x": null}}',
        "created_at": T,
        "updated_at": T,
    },
}


def cases() -> list[tuple[str, str, Any, Any]]:
    out: list[tuple[str, str, Any, Any]] = []
    for table, row in ROWS.items():
        newer = row | {"updated_at": "2026-11-28T08:00:00.000001Z"}
        text_col = {"sessions": "title", "steps": "kind"}.get(table, "content")
        out += [
            (table, "c", None, row),
            (table, "u", row, newer),
            (table, "u", None, newer),
            (table, "u", row, newer | {text_col: PLACEHOLDER_TEXT}),
            (table, "d", row, None),
        ]
    moved = ROWS["human_turns"] | {"session_id": str(uuid.UUID(int=9))}
    out.append(("human_turns", "u", ROWS["human_turns"], moved))
    return out


@pytest.mark.parametrize(("table", "op", "before", "after"), cases())
def test_a_decoded_change_projects_as_when_normalized_again(
    table: str, op: str, before: Any, after: Any
) -> None:
    env = {"before": before, "after": after, "op": op, "source": {"table": table}}
    change = decode_message(f"cqrs.public.{table}", None, json.dumps(env).encode()).change
    assert change is not None and change.normalized
    again = dataclasses.replace(change, normalized=False)
    assert project(change) == project(again)
    assert project(change, ("conversation_timeline",)) == project(again, ["conversation_timeline"])


def test_nan_payload_still_reads_as_before() -> None:
    # json reads NaN and canonical_json writes it back; orjson refuses it: json's path decides.
    assert JSONB.decode("NaN") == "NaN" and math.isnan(json.loads(JSONB.decode("NaN")))


def test_an_integer_orjson_reads_as_a_float_is_judged_as_the_integer_it_is() -> None:
    env = {"op": "c", "source": {"table": "human_turns", "ts_us": 10**25}, "after": {}}
    with pytest.raises(DecodeError, match=r"source\.ts_us is not a time"):
        decode_message("cqrs.public.human_turns", None, json.dumps(env).encode())
