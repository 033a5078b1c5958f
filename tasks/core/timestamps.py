"""Timestamps as the project keeps them, written once: a row's version is its ``updated_at`` in
microseconds since the Unix epoch; a CQL ``timestamp`` keeps milliseconds, and the read
models keep the microseconds below them in ``created_at_micros`` (docs/architecture.md,
"The one rule"). ``millis`` and ``sub_millis`` work on an int and on a numpy int64 array
alike, so the row path and the columnar paths split a timestamp the same way."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    import numpy as np

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US: Final = timedelta(microseconds=1)
ONE_MS: Final = timedelta(milliseconds=1)
# The instants a datetime holds (the row path fails beyond them; Arrow would not).
MIN_US: Final = -62_135_596_800_000_000  # 0001-01-01
MAX_US: Final = 253_402_300_799_999_999  # 9999-12-31 23:59:59.999999

N = TypeVar("N", int, "np.ndarray[Any, Any]")


def micros_of(dt: datetime) -> int:
    """An aware datetime as microseconds since the Unix epoch (a row's version)."""
    return (dt - EPOCH) // ONE_US


def millis(us: N) -> N:
    """Microseconds since the epoch → the milliseconds a CQL timestamp keeps (toward the
    past, as a CQL timestamp read back is)."""
    return us // 1000


def sub_millis(us: N) -> N:
    """The microseconds below the millisecond (0-999): ``created_at_micros`` of the read
    models, which keeps rows written within one millisecond in their real order."""
    return us % 1000


def cql_timestamp(dt: datetime) -> datetime:
    """An aware datetime as Cassandra reads it back from a ``timestamp`` column."""
    return dt.replace(microsecond=millis(dt.microsecond) * 1000)


def utc(v: datetime) -> datetime:
    """An aware datetime as a plain ``datetime`` in UTC; ValueError for a naive one."""
    if v.utcoffset() is None:
        # A naive value is ambiguous (local? UTC?): refuse rather than guess.
        raise ValueError("naive datetime; timestamps must be timezone-aware")
    u = v.astimezone(UTC)
    # Rebuild subclasses (pandas.Timestamp) as a plain datetime, dropping nanoseconds.
    if type(u) is datetime:
        return u
    return datetime(u.year, u.month, u.day, u.hour, u.minute, u.second, u.microsecond, tzinfo=UTC)


_ISO: Final = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d\d(?::?\d\d)?)\Z"
)


# What Debezium writes for a timestamptz: YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z (the fraction without
# its trailing zeros), ASCII: 20 characters, or 22 to 27 with a fraction.
_FAST_LENGTHS: Final = frozenset({20, 22, 23, 24, 25, 26, 27})
_fromisoformat: Final = datetime.fromisoformat


def parse_iso(v: str) -> datetime:
    """ISO-8601 text with a UTC offset (Debezium's form of a ``timestamptz``) in UTC, to the
    microsecond Postgres keeps; ValueError for anything else."""
    # Debezium's own form, through the C parser (20x faster than the pattern below): for text
    # of exactly that shape, ``datetime.fromisoformat`` reads the same fields and refuses the
    # same values (an hour 24, a 30 February, year 0); tests/unit/core/test_fast_paths.py
    # compares the two. It refuses non-digits with a message that quotes the text: that case
    # goes on to the pattern, whose error names no value.
    n = len(v)
    if (
        n in _FAST_LENGTHS
        and v[-1] == "Z"
        and v[10] == "T"
        and v[4] == "-"
        and v[7] == "-"
        and v[13] == ":"
        and v[16] == ":"
        and (v[19] == "." if n > 20 else True)
        and v.isascii()
    ):
        try:
            return _fromisoformat(v)
        except ValueError:
            pass
    return parse_iso_pattern(v)


def parse_iso_pattern(v: str) -> datetime:
    """``parse_iso`` by the pattern alone: the reference its fast path is tested against."""
    m = _ISO.match(v)
    if m is None:
        raise ValueError("not an ISO-8601 timestamp with a UTC offset")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    micros = int((frac or "").ljust(9, "0")[:6])  # finer digits dropped
    offset = timedelta(0)
    if tz != "Z":
        digits = tz[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
        offset = -offset if tz[0] == "-" else offset
    return datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), micros, tzinfo=UTC) - offset
