"""Buckets of the token ring and a parallel, paged scan of token ranges in Scylla.

A bucket is the top ``bits`` bits of a partition's Murmur3 token, so Postgres (which computes
the token of a key in SQL, schemas/postgres/0010) and Scylla (which stores partitions in token
order) put a row in the same bucket, and a run of buckets is one contiguous token range that
Scylla can read without touching the rest of the ring.

The scan keeps at most ``concurrency`` requests in flight and hands back one page at a time;
the next page of a range is asked for only after the caller took the previous one, so memory
is bounded by ``concurrency x fetch_size`` rows whatever the table's size.
"""

from __future__ import annotations

import contextlib
import math
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tasks.core.errors import InvalidInput, TransientError, classify

if TYPE_CHECKING:
    from cassandra.cluster import ResponseFuture, Session
    from cassandra.query import PreparedStatement

TOKEN_BITS: Final = 64
AUDIT_PROFILE: Final = "cqrs-audit-scan"
# The interpreter's thread switch interval while scans run (CPython's default is 5 ms).
SCAN_SWITCH_INTERVAL_S: Final = 0.0005


@dataclass(frozen=True, slots=True)
class Buckets:
    """2**bits buckets of the token ring: bucket ``b`` (signed, ``token >> shift``) holds the
    tokens from ``b << shift`` to ``((b + 1) << shift) - 1``."""

    bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise InvalidInput(f"bucket bits must be within 1..32, got {self.bits}")

    @property
    def shift(self) -> int:
        return TOKEN_BITS - self.bits

    @property
    def count(self) -> int:
        return 1 << self.bits

    @property
    def first(self) -> int:
        return -(1 << (self.bits - 1))

    def of(self, token: int) -> int:
        return token >> self.shift

    def token_range(self, first_bucket: int, last_bucket: int | None = None) -> tuple[int, int]:
        """The inclusive token range of buckets first..last."""
        last = first_bucket if last_bucket is None else last_bucket
        return first_bucket << self.shift, ((last + 1) << self.shift) - 1

    def ranges(self, parts: int) -> list[tuple[int, int]]:
        """The ring cut into ``parts`` (a power of two, at most ``count``) aligned ranges."""
        if parts < 1 or parts & (parts - 1):
            raise InvalidInput(f"ranges: parts must be a power of two, got {parts}")
        parts = min(parts, self.count)
        per = self.count // parts
        return [self.token_range(b, b + per - 1) for b in range(self.first, -self.first, per)]

    def runs(self, buckets: Iterable[int]) -> list[tuple[int, int]]:
        """Token ranges covering exactly these buckets, adjacent buckets merged."""
        out: list[tuple[int, int]] = []
        start = prev = None
        for b in sorted(set(buckets)):
            if prev is not None and b == prev + 1:
                prev = b
                continue
            if start is not None and prev is not None:
                out.append(self.token_range(start, prev))
            start = prev = b
        if start is not None and prev is not None:
            out.append(self.token_range(start, prev))
        return out


def bucket_bits(rows: int, rows_per_bucket: int, max_bits: int) -> int:
    """Enough bits that a bucket holds about ``rows_per_bucket`` rows."""
    wanted = math.ceil(math.log2(max(rows, 1) / rows_per_bucket)) if rows > rows_per_bucket else 1
    return max(1, min(wanted, max_bits))


def scan_parts(buckets: Buckets, rows: int, fetch_size: int, concurrency: int) -> int:
    """How many ranges to scan: about a page each, and enough to keep every slot busy."""
    want = max(concurrency * 4, math.ceil(max(rows, 1) / fetch_size))
    return min(buckets.count, 1 << math.ceil(math.log2(want)))


def ensure_profile(session: Session, consistency_level: int, timeout_s: float) -> str:
    """An execution profile whose rows are plain tuples (no namedtuple per row)."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, ExecutionProfile
    from cassandra.query import tuple_factory

    cluster = session.cluster
    if AUDIT_PROFILE not in cluster.profile_manager.profiles:
        default = cluster.profile_manager.profiles[EXEC_PROFILE_DEFAULT]
        cluster.add_execution_profile(
            AUDIT_PROFILE,
            ExecutionProfile(
                load_balancing_policy=default.load_balancing_policy,
                request_timeout=timeout_s,
                consistency_level=consistency_level,
                row_factory=tuple_factory,
            ),
        )
    return AUDIT_PROFILE


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def responsive_io(interval_s: float = SCAN_SWITCH_INTERVAL_S) -> Iterator[None]:
    """Lower the interpreter's switch interval while scans run (docs/decisions.md, "The
    audit hands the GIL to the driver's I/O thread sooner"). A thread that fingerprints a
    page holds the GIL for 5 ms at a stretch by default, and the driver's I/O thread waits
    that long each time it needs the GIL to read a response: the scan then stops
    overlapping Scylla's work with the client's (measured: 625,000 rows in 5.5 s, 4.2 s with
    0.5 ms). Nested and concurrent uses share one saved value; the last one out restores it."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval_s, _switch_saved))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


def scan(
    session: Session,
    statement: PreparedStatement,
    ranges: Sequence[tuple[int, int]],
    *,
    concurrency: int,
    fetch_size: int,
    profile: str,
    what: str,
    page_timeout_s: float = 120.0,
) -> Iterator[list[tuple[Any, ...]]]:
    """Pages of rows of ``statement`` (bound with each range's first and last token) over
    all ``ranges``, ``concurrency`` ranges at a time, in no particular order. A failed
    request raises the classified error (TransientError for a timeout or a node down)."""
    # Callbacks run on the driver's event loop: they only hand the page over, so no row
    # work ever blocks the I/O thread. They name their range by number, not by future: a
    # future referenced from its own callbacks is a cycle, freed only by the garbage
    # collector, and each such future keeps its last page alive until then.
    pages: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
    futures: dict[int, ResponseFuture] = {}
    pending = enumerate(ranges)

    def start(index: int, token_range: tuple[int, int]) -> None:
        bound = statement.bind(token_range)
        bound.fetch_size = fetch_size
        future = session.execute_async(bound, execution_profile=profile)
        futures[index] = future
        future.add_callbacks(
            callback=_Deliver(pages, index, ok=True), errback=_Deliver(pages, index, ok=False)
        )

    for index, token_range in pending:
        start(index, token_range)
        if len(futures) >= concurrency:
            break
    while futures:
        try:
            index, rows, error = pages.get(timeout=page_timeout_s)
        except queue.Empty:
            raise TransientError(
                f"{what}: no page from Scylla within {page_timeout_s:.0f} s"
            ) from None
        if error is not None:
            raise classify(error, what) from error
        yield rows
        del rows
        future = futures[index]
        if future.has_more_pages:
            future.start_fetching_next_page()
            continue
        # The driver's future sits in reference cycles of its own and holds its last page
        # until the cycle collector runs: let go of the page now, or a scan's memory grows
        # with the table (measured: the whole of a 200,000-row scan stayed alive).
        future._final_result = None
        del futures[index], future
        nxt = next(pending, None)
        if nxt is not None:
            start(*nxt)


class _Deliver:
    """A scan callback: puts (range number, rows or None, error or None) on the queue."""

    __slots__ = ("index", "ok", "pages")

    def __init__(
        self,
        pages: queue.SimpleQueue[tuple[int, Any, BaseException | None]],
        index: int,
        *,
        ok: bool,
    ) -> None:
        self.pages, self.index, self.ok = pages, index, ok

    def __call__(self, result: Any) -> None:
        if self.ok:
            self.pages.put((self.index, result, None))
        else:
            self.pages.put((self.index, None, result))
