"""tasks.audit.fingerprints without a stack: the fingerprint of a row is the one Postgres
computes in schemas/postgres/0010 (its SQL semantics written out here, independently), the
scanned and the expected side render a row identically, and each read model's shape (what is
scanned, in which order) follows the catalog and the SQL views."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest

from tasks.audit.fingerprints import (
    TOKEN_MAX,
    TOKEN_MIN,
    VERSION_COLUMN,
    fingerprint,
    fingerprint_scanned,
    render,
    shape,
)
from tasks.core import catalog
from tasks.core.catalog import READ_MODELS
from tasks.core.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[3]
SQL = (ROOT / "schemas" / "postgres" / "0010_audit_fingerprints.sql").read_text()

# --------------------------------------------------------------------------------------------
# The SQL of schemas/postgres/0010, written out in Python


def sql_fp_field(v: str | None) -> str:
    """cqrs_fp_field(v) = coalesce(length(v)::text || ':' || v, '~'): ``||`` with NULL gives
    NULL, so NULL becomes '~'; length() counts characters, not bytes."""
    return "~" if v is None else str(len(v)) + ":" + v


def sql_fp_hash(t: str) -> int:
    """cqrs_fp_hash(t) = ('x' || left(md5(t), 16))::bit(64)::bigint: md5() hashes the UTF-8
    bytes and gives 32 hex digits; 'x' || 16 of them is a bit-string literal of 64 bits, which
    ::bigint reads as a two's complement integer (the first 8 bytes, big-endian, signed)."""
    hex16 = hashlib.md5(t.encode("utf-8"), usedforsecurity=False).hexdigest()[:16]
    unsigned = int(hex16, 16)
    return unsigned - (1 << 64) if unsigned >= (1 << 63) else unsigned


def sql_fingerprint(fields: list[str | None], version_us: int) -> int:
    """cqrs_fp_hash(cqrs_fp_field(c1) || ... || cqrs_fp_field(version_us::text))."""
    return sql_fp_hash("".join(sql_fp_field(f) for f in fields) + sql_fp_field(str(version_us)))


# --------------------------------------------------------------------------------------------
# fingerprint, fingerprint_scanned


def test_a_known_vector_matches_the_sql_by_hand() -> None:
    fields = ["abc", None, "1700000000123"]
    version = 1700000000123456
    # The text Postgres hashes, concatenated by hand.
    text = "3:abc" + "~" + "13:1700000000123" + "16:1700000000123456"
    assert fingerprint(fields, version) == sql_fp_hash(text)
    digest = hashlib.md5(text.encode(), usedforsecurity=False).digest()
    assert fingerprint(fields, version) == int.from_bytes(digest[:8], "big", signed=True)


def test_non_ascii_text_is_prefixed_by_its_length_in_characters() -> None:
    # Postgres' length() counts characters: 'é' is 1 (2 bytes in UTF-8), '🙂' is 1 (4 bytes).
    assert fingerprint(["é", "🙂x"], 7) == sql_fp_hash("1:é2:🙂x1:7")
    assert fingerprint(["é"], 7) != sql_fp_hash("2:é1:7")


def test_random_rows_match_the_sql_and_both_signs_occur() -> None:
    rng = random.Random(11)
    alphabet = "ab~:0123456789 é\n"
    signs = set()
    for _ in range(300):
        fields: list[str | None] = [
            None
            if rng.random() < 0.2
            else "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
            for _ in range(rng.randrange(1, 8))
        ]
        version = rng.randrange(-(2**62), 2**62)
        fp = fingerprint(fields, version)
        assert fp == sql_fingerprint(fields, version)
        assert TOKEN_MIN <= fp <= TOKEN_MAX
        signs.add(fp < 0)
    assert signs == {True, False}  # the sign bit is read as Postgres' bigint reads it


def test_a_missing_version_is_null() -> None:
    assert fingerprint(["a"], None) == sql_fp_hash("1:a~")
    assert fingerprint(["a"], None) != fingerprint(["a"], 0)


def test_the_length_prefix_keeps_adjacent_fields_apart() -> None:
    assert fingerprint(["ab", "c"], 1) != fingerprint(["a", "bc"], 1)
    assert fingerprint(["ab", ""], 1) != fingerprint(["a", "b"], 1)


def test_null_empty_and_the_text_tilde_differ() -> None:
    fps = {fingerprint([v], 1) for v in (None, "", "~", "0:")}
    assert len(fps) == 4


def test_the_version_counts() -> None:
    assert fingerprint(["a"], 1) != fingerprint(["a"], 2)
    assert fingerprint(["a"], 12) != fingerprint(["a1"], 2)


def test_the_scanned_side_renders_like_postgres() -> None:
    """A scanned row: token, then the columns as CQL returns them (CAST uuids are text,
    toUnixTimestamp and int columns are ints, NULL is None), then the version's write time,
    then (ignored) the other write times."""
    sid, uid = "5b0c1f3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b", "0f0e0d0c-0b0a-4908-8706-050403020100"
    scanned = (42, sid, uid, "title", 1700000000123, None, -5, 3, 1700000000123456)
    text = (sid, uid, "title", "1700000000123", None, "-5", "3")
    fp = fingerprint_scanned(scanned, 7)
    assert fp == fingerprint(text, 1700000000123456)
    assert fp == sql_fingerprint(list(text), 1700000000123456)
    # Write times of the value cells after the version do not count.
    assert fingerprint_scanned((*scanned, 1, 2, 3), 7) == fp
    # Nor does the token.
    assert fingerprint_scanned((-1, *scanned[1:]), 7) == fp
    # But every column does, and the version.
    assert fingerprint_scanned((42, sid, uid, "title", 1700000000124, *scanned[5:]), 7) != fp
    assert fingerprint_scanned((*scanned[:-1], 1700000000123457), 7) != fp
    assert fingerprint_scanned((*scanned[:-1], None), 7) == fingerprint(text, None)


def test_an_int_and_its_decimal_text_are_the_same_cell() -> None:
    assert fingerprint_scanned((0, 7, "x", 9), 2) == fingerprint(["7", "x"], 9)
    assert fingerprint_scanned((0, "7", "x", 9), 2) == fingerprint(["7", "x"], 9)
    assert fingerprint_scanned((0, None, "x", 9), 2) == fingerprint([None, "x"], 9)
    assert fingerprint_scanned((0, None, "x", 9), 2) != fingerprint(["", "x"], 9)


def test_render() -> None:
    assert render(None) is None
    assert render("x") == "x"
    assert render(1700000000123) == "1700000000123"
    assert render(-3) == "-3"


# --------------------------------------------------------------------------------------------
# shape


# Read model → (partition column, key, values, version column, column the source's id fills).
SHAPES = {
    "recent_conversations": (
        "user_id",
        ("user_id", "created_at", "session_id"),
        ("title", "last_message", "last_message_at", "turn_count"),
        "turn_count",
        "session_id",
    ),
    "conversation_timeline": (
        "session_id",
        ("session_id", "created_at", "created_at_micros", "turn_id"),
        ("role", "content", "model"),
        "role",
        "turn_id",
    ),
    "sessions_by_id": (
        "session_id",
        ("session_id",),
        ("user_id", "title", "created_at", "last_message", "last_message_at", "turn_count"),
        "turn_count",
        "session_id",
    ),
    "steps_by_turn": (
        "agent_turn_id",
        ("agent_turn_id", "created_at", "created_at_micros", "step_id"),
        ("session_id", "kind", "payload"),
        "kind",
        "step_id",
    ),
}


def test_every_read_model_has_a_shape() -> None:
    assert set(SHAPES) == set(READ_MODELS) == set(VERSION_COLUMN)


@pytest.mark.parametrize("read_model", list(SHAPES))
def test_shape_follows_the_catalog(read_model: str) -> None:
    partition, key, values, version, source_id = SHAPES[read_model]
    sh = shape(read_model)
    assert sh.read_model == read_model
    assert sh.partition_column == partition
    assert sh.columns == key + values
    assert sh.key_width == len(key)
    assert sh.value_columns == values
    assert sh.version_column == version
    assert sh.source_id_column == source_id
    assert sh.view == f"audit_{read_model}"
    assert sh.columns == catalog.KEY_COLUMNS[read_model] + catalog.VALUE_COLUMNS[read_model]


@pytest.mark.parametrize("read_model", list(SHAPES))
def test_the_version_column_is_written_by_every_upsert(read_model: str) -> None:
    """Its write time dates the row: a value column (a key has no write time) that every
    feed of the read model fills, from a source column that is never NULL (or a constant)."""
    sh = shape(read_model)
    assert sh.version_column in sh.value_columns
    assert sh.version_column not in sh.columns[: sh.key_width]
    feeds = [f for fs in catalog.FEEDS.values() for f in fs if f.read_model == read_model]
    assert feeds
    for feed in feeds:
        constants = dict(feed.constants)
        values = dict(feed.values)
        assert sh.version_column in constants or sh.version_column in values
        if sh.version_column in values:
            table = next(t for t, fs in catalog.FEEDS.items() if feed in fs)
            assert not catalog.SOURCES[table].column(values[sh.version_column]).nullable


@pytest.mark.parametrize("read_model", list(SHAPES))
def test_the_source_id_column_is_fed_by_the_source_id(read_model: str) -> None:
    sh = shape(read_model)
    feeds = [f for fs in catalog.FEEDS.values() for f in fs if f.read_model == read_model]
    for feed in feeds:
        assert dict(feed.key)[sh.source_id_column] == "id"
    assert sh.source_id_column in sh.columns[: sh.key_width]


def _view_fingerprint_columns(read_model: str) -> list[str]:
    view = re.search(
        rf"CREATE VIEW audit_{read_model} AS(.*?)AS fingerprint", SQL, re.DOTALL | re.IGNORECASE
    )
    assert view is not None, f"no view audit_{read_model} in 0010"
    return re.findall(r"cqrs_fp_field\(([\w:]+)\)", view.group(1))


@pytest.mark.parametrize("read_model", list(SHAPES))
def test_the_sql_view_hashes_the_columns_in_the_shapes_order(read_model: str) -> None:
    """The expected side's fingerprint (schemas/postgres/0010) hashes the same columns in the
    same order, then the version: otherwise every bucket would differ."""
    assert _view_fingerprint_columns(read_model) == [*shape(read_model).columns, "version_us::text"]


def test_unknown_read_model_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"unknown read model 'users'"):
        shape("users")


# --------------------------------------------------------------------------------------------
# The scan's CQL


def test_scan_cql_of_sessions_by_id() -> None:
    assert shape("sessions_by_id").scan_cql("cqrs") == (
        "SELECT token(session_id), CAST(session_id AS text), CAST(user_id AS text), title, "
        "toUnixTimestamp(created_at), last_message, toUnixTimestamp(last_message_at), "
        "turn_count, WRITETIME(turn_count) FROM cqrs.sessions_by_id "
        "WHERE token(session_id) >= ? AND token(session_id) <= ?"
    )


def _selectors(cql: str) -> list[str]:
    m = re.fullmatch(r"SELECT (.*) FROM \w+\.\w+ WHERE (.*)", cql)
    assert m is not None, cql
    return m.group(1).split(", ")


@pytest.mark.parametrize("read_model", list(SHAPES))
@pytest.mark.parametrize("writetimes", [False, True])
def test_scan_cql_selects_what_the_fingerprint_reads(read_model: str, writetimes: bool) -> None:
    """token, then each column as text or an int in the shape's order, then the version
    column's write time (and the value columns' write times): the layout fingerprint_scanned
    and the drill-down read."""
    sh = shape(read_model)
    table = catalog.TABLES[read_model]
    types = {c.name: c.cql_type for c in (*table.key, *table.values)}
    sel = _selectors(sh.scan_cql("ks1", writetimes=writetimes))
    assert sel[0] == f"token({sh.partition_column})"
    expected = []
    for c in sh.columns:
        if types[c] == "uuid":
            expected.append(f"CAST({c} AS text)")
        elif types[c] == "timestamp":
            expected.append(f"toUnixTimestamp({c})")
        else:
            expected.append(c)
    assert sel[1 : len(sh.columns) + 1] == expected
    assert sel[len(sh.columns) + 1] == f"WRITETIME({sh.version_column})"
    rest = sel[len(sh.columns) + 2 :]
    assert rest == ([f"WRITETIME({c})" for c in sh.value_columns] if writetimes else [])
    cql = sh.scan_cql("ks1", writetimes=writetimes)
    assert f"FROM ks1.{read_model} " in cql
    assert cql.endswith(
        f"WHERE token({sh.partition_column}) >= ? AND token({sh.partition_column}) <= ?"
    )


@pytest.mark.parametrize("keyspace", ["bad-name", "ks; DROP TABLE x", "", "a.b", "1abc"])
def test_scan_cql_refuses_a_bad_keyspace(keyspace: str) -> None:
    with pytest.raises(InvalidInput, match="invalid keyspace name"):
        shape("sessions_by_id").scan_cql(keyspace)
