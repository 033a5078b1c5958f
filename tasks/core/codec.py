"""One codec per column type: how a source value becomes a read-model cell, on each path.

A codec decodes what a source hands over (Debezium JSON values, psycopg values, an Arrow
column of the snapshot) into one canonical Python form, and turns that into the cell written:

- ``decode`` / ``cell``: one value, for the row path (``project``, ``project_row``);
- ``arrow_decode`` then ``arrow_cells``: a whole Arrow column as bind parameters, for
  ``project_arrow``;
- ``arrow_decode`` then ``arrow_cql``: the same column as an Arrow array in CQL terms, for
  ``project_arrow_columns`` (the SSTable writer).

The three outputs of one codec are built from the same few functions (``uuid_from_bytes``,
``canonical_json``, ``check_int``; ``millis`` and ``sub_millis`` of tasks/core/timestamps.py,
which take an int or a numpy array alike), so they agree by
construction; tests/unit/core/test_projection_arrow.py proves it on arbitrary rows. Values
are canonical so that what is written equals what is read back (docs/architecture.md,
"The one rule"): UUIDs, UTC datetimes truncated to the millisecond a CQL ``timestamp`` keeps,
JSON as canonical text.

pyarrow and numpy are imported inside the Arrow methods: CDC and dual-write never load them.
"""

from __future__ import annotations

import json
import operator
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import orjson

from tasks.core.timestamps import (
    EPOCH,
    MAX_US,
    MIN_US,
    ONE_MS,
    cql_timestamp,
    micros_of,
    millis,
    parse_iso,
    sub_millis,
    utc,
)

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

INT_MIN: Final = -(2**31)  # a CQL int
INT_MAX: Final = 2**31 - 1

# --------------------------------------------------------------------------------------------
# The shared primitives (the timestamp ones are in tasks/core/timestamps.py).


def uuid_from_bytes(b: bytes) -> uuid.UUID:
    """``uuid.UUID(bytes=b)`` without its argument checks, which dominate the conversion of
    a large column; callers guarantee 16 bytes (Arrow's binary(16))."""
    u = object.__new__(uuid.UUID)
    object.__setattr__(u, "int", int.from_bytes(b, "big"))
    object.__setattr__(u, "is_safe", _UNKNOWN_SAFETY)
    return u


_UNKNOWN_SAFETY: Final = uuid.SafeUUID.unknown  # an enum member lookup costs a property call


def check_int(i: int) -> int:
    if not INT_MIN <= i <= INT_MAX:
        raise ValueError("out of range for a CQL int")
    return i


def canonical_json(obj: Any) -> str:
    """The one text form of a JSON value, whichever path decoded it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# orjson's reading and sorted writing of a document agree with json's and ``canonical_json``'s
# when it holds no float (orjson reads an integer beyond 64 bits as one, and writes floats in
# another form) and is not nested deeper than this; tests/unit/core/test_fast_paths.py checks it.
_FAST_JSON_DEPTH: Final = 64


def _canonical_json_text(text: str) -> str | None:
    """``canonical_json(json.loads(text))`` by orjson, about 5x faster; None when orjson
    refuses the text or it holds what the two libraries treat differently (a float, deep
    nesting): the caller then takes json's path, which decides as before."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not _float_free(obj):
        return None
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:  # a lone surrogate in a string, an int beyond 64 bits
        return None


def _float_free(obj: Any) -> bool:
    """No float anywhere in ``obj`` and no nesting deeper than ``_FAST_JSON_DEPTH``. Level by
    level, each container's members typed at C speed (``set(map(type, ...))``): a Python loop
    over every member cost as much as the json path saved."""
    if type(obj) is float:
        return False
    level = [obj]
    for _ in range(_FAST_JSON_DEPTH):
        nested: list[Any] = []
        for c in level:
            members = c.values() if type(c) is dict else c if type(c) is list else ()
            kinds = set(map(type, members))
            if float in kinds:
                return False
            if dict in kinds or list in kinds:
                nested.extend(m for m in members if type(m) is dict or type(m) is list)
        if not nested:
            return True
        level = nested
    return False


class CanonicalJson(str):
    """JSON text already in canonical form: decoding it again skips a parse and a dump."""

    __slots__ = ()


# --------------------------------------------------------------------------------------------
# Codecs


class Cell(Protocol):
    """How a canonical source value becomes the cell of a read-model column, on each path.
    Values are never None here: NULLs are handled by the caller."""

    cql_type: ClassVar[str]

    def cell(self, v: Any) -> Any: ...
    def arrow_cells(self, decoded: Any) -> list[Any]: ...
    def arrow_cql(self, decoded: Any) -> pa.Array: ...


class Codec:
    """A source column type. Subclasses convert; the base holds what the catalog reads."""

    name: ClassVar[str]  # the type's name in the catalog (tasks/core/catalog.py)
    pg_type: ClassVar[str]  # Postgres' name (pg_type.typname, information_schema udt_name)
    cql_type: ClassVar[str]  # the CQL type of a read-model column holding it as is
    null_is_a_value: ClassVar[bool] = False  # SQL NULL decodes to a value (JSON null)

    def decode(self, v: Any) -> Any:
        """A Debezium JSON value or a driver value → the canonical form; TypeError or
        ValueError when it is not one."""
        raise NotImplementedError

    def arrow_type(self) -> pa.DataType:
        """The type of the column in a snapshot's Arrow batches and Parquet files."""
        raise NotImplementedError

    def cell(self, v: Any) -> Any:
        """A canonical value → the bind parameter of a read-model cell."""
        return v

    def arrow_check(self, array: pa.Array) -> pa.Array:
        """The column once its Arrow type fits (ValueError otherwise)."""
        return array

    def arrow_decode(self, array: pa.Array) -> Any:
        """A checked Arrow column → the form ``arrow_cells`` and ``arrow_cql`` take."""
        return array

    def arrow_cells(self, decoded: Any) -> list[Any]:
        return list(decoded.to_pylist())

    def arrow_cql(self, decoded: Any) -> pa.Array:
        return decoded

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


# The slots' descriptors: setting through them skips UUID.__setattr__, which refuses (the
# constructor itself sets them with object.__setattr__).
_UUID_INT: Final[Any] = vars(uuid.UUID)["int"]
_UUID_IS_SAFE: Final[Any] = vars(uuid.UUID)["is_safe"]
# The uuids of recent rows by their text. A CDC event names the same few several times (a row's
# before and after images, the session of a turn, the turn of a step, a session's user), and a
# UUID is immutable, so one object serves them all. Bounded: cleared when full.
_UUIDS: Final[dict[str, uuid.UUID]] = {}
_UUIDS_MAX: Final = 4096


def uuid_from_text(v: str) -> uuid.UUID:
    """``uuid.UUID(v)``, faster for the canonical 36-character form, the one Debezium and
    Postgres write. For it, ``uuid.UUID`` drops the hyphens, checks 32 characters are left and
    reads them with ``int(_, 16)``: done here the same way, then set on the slots directly.
    Any other text (or one that ``int`` refuses) goes to ``uuid.UUID`` itself, so the result
    and the error are its own."""
    u = _UUIDS.get(v)
    if u is not None:
        return u
    if len(v) != 36:
        return uuid.UUID(v)
    digits = v.replace("-", "")
    # ":" "{" "}" (urn:uuid:, braces) are what uuid.UUID strips before the hyphens: the same
    # steps give the same digits only without them.
    if len(digits) != 32 or ":" in v or "{" in v or "}" in v:
        return uuid.UUID(v)
    try:
        value = int(digits, 16)
    except ValueError:
        return uuid.UUID(v)  # raises uuid's own error
    u = object.__new__(uuid.UUID)
    _UUID_INT.__set__(u, value)
    _UUID_IS_SAFE.__set__(u, _UNKNOWN_SAFETY)
    if len(_UUIDS) >= _UUIDS_MAX:
        _UUIDS.clear()
    _UUIDS[v] = u
    return u


class UuidCodec(Codec):
    name = "uuid"
    pg_type = "uuid"
    cql_type = "uuid"

    def decode(self, v: Any) -> uuid.UUID:
        if type(v) is str:
            return uuid_from_text(v)
        if isinstance(v, uuid.UUID):
            return v
        if isinstance(v, str):
            return uuid.UUID(v)
        if isinstance(v, bytes | bytearray) and len(v) == 16:  # pyarrow fixed_size_binary(16)
            return uuid_from_bytes(bytes(v))
        raise TypeError(f"expected a uuid, got {type(v).__name__}")

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        return pa.uuid()  # Parquet's logical type UUID: self-describing for other tools

    def arrow_check(self, array: pa.Array) -> pa.Array:
        import pyarrow as pa

        storage = array.storage if isinstance(array.type, pa.BaseExtensionType) else array
        if storage.type != pa.binary(16):
            raise ValueError(f"expected 16-byte uuids, got {array.type}")
        return storage  # CQL's uuid is these 16 bytes

    def arrow_cells(self, decoded: pa.Array) -> list[Any]:
        return [None if b is None else uuid_from_bytes(b) for b in decoded.to_pylist()]


@dataclass(frozen=True, slots=True)
class Micros:
    """A decoded timestamp column: µs since the epoch (int64, NULLs as 0) and where NULLs are."""

    us: np.ndarray[Any, Any]
    nulls: np.ndarray[Any, Any] | None


class TimestamptzCodec(Codec):
    name = "timestamptz"
    pg_type = "timestamptz"
    cql_type = "timestamp"

    def decode(self, v: Any) -> datetime:
        if type(v) is str:
            return parse_iso(v)
        if isinstance(v, datetime):
            return utc(v)
        if isinstance(v, str):
            return parse_iso(v)
        raise TypeError(f"expected a timestamp, got {type(v).__name__}")

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        return pa.timestamp("us", tz="UTC")

    def cell(self, v: datetime) -> datetime:
        return cql_timestamp(v)

    def arrow_check(self, array: pa.Array) -> pa.Array:
        import pyarrow as pa

        # Any zone: an Arrow timestamp with a zone stores UTC instants. Naive ones are refused
        # as the row path refuses naive datetimes.
        if not (pa.types.is_timestamp(array.type) and array.type.unit == "us" and array.type.tz):
            raise ValueError(f"expected timestamp[us] with a time zone, got {array.type}")
        return array

    def arrow_decode(self, array: pa.Array) -> Micros:
        import pyarrow as pa

        micros = array.cast(pa.int64())
        us = micros.fill_null(0).to_numpy()
        if len(us) and (us.min() < MIN_US or us.max() > MAX_US):
            raise ValueError("a timestamp beyond the years 1 to 9999")
        nulls = micros.is_null().to_numpy(zero_copy_only=False) if micros.null_count else None
        return Micros(us, nulls)

    def arrow_cells(self, decoded: Micros) -> list[Any]:
        cells = [EPOCH + ms * ONE_MS for ms in millis(decoded.us).tolist()]
        if decoded.nulls is not None:
            cells = [None if null else c for c, null in zip(cells, decoded.nulls, strict=True)]
        return cells

    def arrow_cql(self, decoded: Micros) -> pa.Array:
        import pyarrow as pa

        return pa.array(millis(decoded.us), pa.int64(), mask=decoded.nulls)  # CQL: ms


class TextCodec(Codec):
    name = "text"
    pg_type = "text"
    cql_type = "text"

    def decode(self, v: Any) -> str:
        if isinstance(v, str):
            return v if type(v) is str else str(v)
        raise TypeError(f"expected text, got {type(v).__name__}")

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        return pa.string()

    def arrow_check(self, array: pa.Array) -> pa.Array:
        import pyarrow as pa

        if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
            raise ValueError(f"expected text, got {array.type}")
        return array

    def arrow_cql(self, decoded: pa.Array) -> pa.Array:
        import pyarrow as pa

        return decoded.cast(pa.string())  # no copy when already string


class IntCodec(Codec):
    name = "int"
    pg_type = "int4"
    cql_type: ClassVar[str] = "int"

    def decode(self, v: Any) -> int:
        if isinstance(v, bool) or not hasattr(type(v), "__index__"):
            raise TypeError(f"expected an integer, got {type(v).__name__}")
        return check_int(operator.index(v))  # operator.index: numpy integers too

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        return pa.int32()

    def arrow_check(self, array: pa.Array) -> pa.Array:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not pa.types.is_integer(array.type):
            raise ValueError(f"expected an integer, got {array.type}")
        lo, hi = pc.min_max(array).values()
        for bound in (lo.as_py(), hi.as_py()):
            if bound is not None:
                check_int(bound)
        return array

    def arrow_cql(self, decoded: pa.Array) -> pa.Array:
        import pyarrow as pa

        return decoded.cast(pa.int32())


class JsonbCodec(Codec):
    """jsonb: canonical JSON text. SQL NULL is JSON null (the column is NOT NULL anyway)."""

    name = "jsonb"
    pg_type = "jsonb"
    cql_type = "text"
    null_is_a_value = True

    def decode(self, v: Any) -> CanonicalJson:
        if isinstance(v, CanonicalJson):
            return v
        if type(v) is str and (text := _canonical_json_text(v)) is not None:
            return CanonicalJson(text)
        if isinstance(v, str | bytes | bytearray):
            # JSON text: Debezium sends jsonb as text, and so does `payload::text`. A psycopg
            # jsonb value that is a bare JSON string would be ambiguous here: read it as text.
            obj = json.loads(v)
        elif v is None or isinstance(v, dict | list | int | float):
            obj = v  # decoded JSON (psycopg's jsonb loader); None is JSON null
        else:
            raise TypeError(f"expected JSON, got {type(v).__name__}")
        return CanonicalJson(canonical_json(obj))

    def arrow_type(self) -> pa.DataType:
        import pyarrow as pa

        return pa.string()  # JSON text, as Debezium sends it

    def cell(self, v: CanonicalJson) -> str:
        return str(v)

    def arrow_decode(self, array: pa.Array) -> list[str]:
        decode, cell = self.decode, self.cell
        return [cell(decode("null" if v is None else v)) for v in array.to_pylist()]

    def arrow_cells(self, decoded: list[str]) -> list[Any]:
        return list(decoded)

    def arrow_cql(self, decoded: list[str]) -> pa.Array:
        import pyarrow as pa

        return pa.array(decoded, pa.string())


class SubMillis:
    """A timestamp's microseconds below its millisecond, into a CQL int column."""

    cql_type: ClassVar[str] = "int"

    def cell(self, v: datetime) -> int:
        return sub_millis(v.microsecond)

    def arrow_cells(self, decoded: Micros) -> list[Any]:
        return list(sub_millis(decoded.us).tolist())  # key columns: never NULL

    def arrow_cql(self, decoded: Micros) -> pa.Array:
        import pyarrow as pa

        return pa.array(sub_millis(decoded.us), pa.int32())


class Version:
    """A row's version (``updated_at`` in µs since the epoch): the ``USING TIMESTAMP``."""

    cql_type: ClassVar[str] = "bigint"

    def cell(self, v: datetime) -> int:
        return micros_of(v)

    def arrow_cells(self, decoded: Micros) -> list[Any]:
        return list(decoded.us.tolist())

    def arrow_cql(self, decoded: Micros) -> pa.Array:
        import pyarrow as pa

        return pa.array(decoded.us, pa.int64())


UUID: Final = UuidCodec()
TIMESTAMPTZ: Final = TimestamptzCodec()
TEXT: Final = TextCodec()
INT: Final = IntCodec()
JSONB: Final = JsonbCodec()
SUB_MILLIS: Final = SubMillis()
VERSION: Final = Version()

CODECS: Final[Mapping[str, Codec]] = {c.name: c for c in (UUID, TIMESTAMPTZ, TEXT, INT, JSONB)}
# Cells of another CQL type than the codec's own, derived from a source column.
_DERIVED: Final[Mapping[tuple[str, str], Cell]] = {("timestamptz", "int"): SUB_MILLIS}


def cell_of(source: Codec, cql_type: str) -> Cell:
    """How a source column of this codec fills a read-model column of ``cql_type``."""
    if cql_type == source.cql_type:
        return source
    try:
        return _DERIVED[source.name, cql_type]
    except KeyError:
        raise ValueError(f"no conversion from {source.name} to CQL {cql_type}") from None
