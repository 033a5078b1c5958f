"""tasks.audit.scan without a stack: buckets of the token ring, how many of them and how many
scan ranges, the partitioner's token of a uuid, and the paged parallel scan against a fake
session whose futures behave like the driver's (callbacks fired once per page, the next page
asked for with start_fetching_next_page)."""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import cassandra
import pytest
from cassandra.cluster import Session
from cassandra.metadata import Murmur3Token
from cassandra.murmur3 import murmur3
from cassandra.query import PreparedStatement
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.audit.fingerprints import TOKEN_MAX, TOKEN_MIN
from tasks.audit.reconcile import token_of
from tasks.audit.scan import Buckets, bucket_bits, scan, scan_parts
from tasks.core.errors import InvalidInput, TerminalError, TransientError

RING = 1 << 64
tokens = st.integers(min_value=TOKEN_MIN, max_value=TOKEN_MAX)
bits = st.integers(min_value=1, max_value=32)

# --------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("b", [0, 33, -1])
def test_bucket_bits_out_of_range_are_refused(b: int) -> None:
    with pytest.raises(InvalidInput, match=r"bucket bits must be within 1\.\.32"):
        Buckets(b)


@pytest.mark.parametrize("b", [1, 2, 7, 18, 32])
def test_the_ring_s_ends_fall_in_the_first_and_last_bucket(b: int) -> None:
    bk = Buckets(b)
    assert bk.count == 2**b and bk.shift == 64 - b
    assert bk.of(TOKEN_MIN) == bk.first == -(2 ** (b - 1))
    assert bk.of(TOKEN_MAX) == bk.first + bk.count - 1
    assert bk.of(-1) == -1 and bk.of(0) == 0


@settings(deadline=None)  # plain arithmetic; no deadline on a loaded machine
@given(bits, tokens)
def test_a_token_lies_in_its_bucket_s_range(b: int, token: int) -> None:
    bk = Buckets(b)
    lo, hi = bk.token_range(bk.of(token))
    assert lo <= token <= hi
    assert hi - lo + 1 == 2**bk.shift


@settings(deadline=None)  # plain arithmetic; no deadline on a loaded machine
@given(bits, st.data())
def test_a_bucket_s_range_is_exactly_its_tokens(b: int, data: st.DataObject) -> None:
    bk = Buckets(b)
    bucket = data.draw(st.integers(bk.first, bk.first + bk.count - 1))
    lo, hi = bk.token_range(bucket)
    assert hi - lo + 1 == 2**bk.shift
    assert bk.of(lo) == bk.of(hi) == bucket
    if lo > TOKEN_MIN:
        assert bk.of(lo - 1) == bucket - 1
    if hi < TOKEN_MAX:
        assert bk.of(hi + 1) == bucket + 1
    assert TOKEN_MIN <= lo <= hi <= TOKEN_MAX


def test_a_range_of_several_buckets() -> None:
    bk = Buckets(4)  # 16 buckets of 2**60 tokens
    assert bk.token_range(-8, -8) == bk.token_range(-8) == (TOKEN_MIN, TOKEN_MIN + 2**60 - 1)
    assert bk.token_range(-1, 1) == (-(2**60), 2 * 2**60 - 1)
    assert bk.token_range(7) == (7 * 2**60, TOKEN_MAX)


def _assert_partition_of_the_ring(bk: Buckets, ranges: list[tuple[int, int]]) -> None:
    assert ranges[0][0] == TOKEN_MIN
    assert ranges[-1][1] == TOKEN_MAX
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert lo == hi + 1  # no gap, no overlap
    assert sum(hi - lo + 1 for lo, hi in ranges) == RING
    for lo, hi in ranges:
        assert lo <= hi
        # Aligned: each range starts at a bucket's first token and ends at one's last.
        assert bk.token_range(bk.of(lo))[0] == lo
        assert bk.token_range(bk.of(hi))[1] == hi


@pytest.mark.parametrize("b", [1, 3, 10, 18])
@pytest.mark.parametrize("parts", [1, 2, 4, 8, 64, 1024])
def test_ranges_partition_the_whole_ring(b: int, parts: int) -> None:
    bk = Buckets(b)
    ranges = bk.ranges(parts)
    assert len(ranges) == min(parts, bk.count)
    _assert_partition_of_the_ring(bk, ranges)
    sizes = {hi - lo + 1 for lo, hi in ranges}
    assert sizes == {RING // len(ranges)}  # equal parts


def test_ranges_clamps_the_number_of_parts_to_the_buckets() -> None:
    bk = Buckets(5)
    ranges = bk.ranges(2**30)
    assert len(ranges) == bk.count
    _assert_partition_of_the_ring(bk, ranges)


@pytest.mark.parametrize("parts", [0, -3, 3, 10**9])
def test_ranges_refuses_a_number_of_parts_not_a_power_of_two(parts: int) -> None:
    with pytest.raises(InvalidInput, match="power of two"):
        Buckets(5).ranges(parts)


def test_runs_merge_adjacent_buckets() -> None:
    bk = Buckets(4)
    r = bk.token_range
    assert bk.runs([]) == []
    assert bk.runs([3]) == [r(3)]
    assert bk.runs([3, 1, 2, 2, 7, -8, 6]) == [r(-8), r(1, 3), r(6, 7)]
    assert bk.runs([-1, 0]) == [r(-1, 0)]  # across token 0
    assert bk.runs(range(-8, 8)) == [(TOKEN_MIN, TOKEN_MAX)]
    assert bk.runs(iter([5, 4])) == [r(4, 5)]  # any iterable, once


@settings(deadline=None)  # plain arithmetic; no deadline on a loaded machine
@given(bits, st.sets(st.integers(-(2**31), 2**31 - 1), max_size=30))
def test_runs_cover_exactly_the_buckets_given(b: int, raw: set[int]) -> None:
    bk = Buckets(b)
    chosen = {x % bk.count + bk.first for x in raw}
    runs = bk.runs(chosen)
    covered: set[int] = set()
    for i, (lo, hi) in enumerate(runs):
        first, last = bk.of(lo), bk.of(hi)
        assert bk.token_range(first, last) == (lo, hi)
        covered |= set(range(first, last + 1))
        if i:
            assert lo > runs[i - 1][1] + 1  # maximal: never two adjacent runs
    assert covered == chosen


# --------------------------------------------------------------------------------------------
# How many buckets, how many scan ranges


@pytest.mark.parametrize(
    ("rows", "per", "cap", "want"),
    [
        (0, 64, 18, 1),
        (1, 64, 18, 1),
        (64, 64, 18, 1),
        (128, 64, 18, 1),
        (129, 64, 18, 2),
        (64 * 1024, 64, 18, 10),
        (64 * 1024 + 1, 64, 18, 11),
        (10**12, 1, 18, 18),
        (10**6, 64, 3, 3),
    ],
)
def test_bucket_bits(rows: int, per: int, cap: int, want: int) -> None:
    assert bucket_bits(rows, per, cap) == want


@settings(deadline=None)  # plain arithmetic; no deadline on a loaded machine
@given(st.integers(0, 10**12), st.integers(1, 10**6), st.integers(1, 32))  # rows, per bucket, cap
def test_bucket_bits_are_the_fewest_that_keep_buckets_small(rows: int, per: int, cap: int) -> None:
    got = bucket_bits(rows, per, cap)
    assert 1 <= got <= cap
    if got < cap:
        assert rows <= per * 2**got  # enough bits...
    if got > 1:
        assert rows > per * 2 ** (got - 1)  # ...and no more


@settings(deadline=None)  # plain arithmetic; no deadline on a loaded machine
@given(st.integers(1, 24), st.integers(0, 10**10), st.integers(100, 100_000), st.integers(1, 256))
def test_scan_parts_bounds(b: int, rows: int, fetch: int, conc: int) -> None:
    bk = Buckets(b)
    parts = scan_parts(bk, rows, fetch, conc)
    assert parts & (parts - 1) == 0  # a power of two: ranges() cuts the ring evenly
    assert 1 <= parts <= bk.count
    if parts < bk.count:
        assert parts >= 4 * conc  # every slot busy
        assert parts * fetch >= rows  # about a page each
    if parts <= 4096:  # (millions of ranges take a while to check)
        _assert_partition_of_the_ring(bk, bk.ranges(parts))


def test_scan_parts_examples() -> None:
    assert scan_parts(Buckets(18), 0, 5000, 8) == 32
    assert scan_parts(Buckets(18), 10**6, 5000, 8) == 256
    assert scan_parts(Buckets(3), 10**6, 5000, 8) == 8


# --------------------------------------------------------------------------------------------
# The partitioner's token of a uuid key


def test_token_of_is_the_drivers_murmur3_of_the_uuid_bytes() -> None:
    rng = random.Random(3)
    keys = [uuid.uuid4() for _ in range(500)]
    keys += [uuid.UUID(int=rng.getrandbits(128)) for _ in range(500)]
    keys += [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]
    for k in keys:
        assert token_of(k) == murmur3(k.bytes) == Murmur3Token.hash_fn(k.bytes)
    assert len({token_of(k) for k in keys}) == len(keys)
    assert any(token_of(k) < 0 for k in keys) and any(token_of(k) > 0 for k in keys)


M64 = (1 << 64) - 1


def canonical_murmur3_h1(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x64_128 as in SMHasher (tail bytes unsigned), the first 64 bits as a signed
    bigint: what hll_hash_bytea(data, 0) gives Postgres (schemas/postgres/0010's cqrs_token).
    Cassandra's own implementation sign-extends the tail bytes, so the two agree only for keys
    whose length is a multiple of 16: a uuid."""

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & M64

    def fmix(k: int) -> int:
        k ^= k >> 33
        k = (k * 0xFF51AFD7ED558CCD) & M64
        k ^= k >> 33
        k = (k * 0xC4CEB9FE1A85EC53) & M64
        return k ^ (k >> 33)

    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = seed
    n = len(data) // 16
    for i in range(n):
        k1 = int.from_bytes(data[16 * i : 16 * i + 8], "little")
        k2 = int.from_bytes(data[16 * i + 8 : 16 * i + 16], "little")
        h1 ^= (rotl((k1 * c1) & M64, 31) * c2) & M64
        h1 = (rotl(h1, 27) + h2) & M64
        h1 = (h1 * 5 + 0x52DCE729) & M64
        h2 ^= (rotl((k2 * c2) & M64, 33) * c1) & M64
        h2 = (rotl(h2, 31) + h1) & M64
        h2 = (h2 * 5 + 0x38495AB5) & M64
    tail = data[16 * n :]
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        h2 ^= (rotl((k2 * c2) & M64, 33) * c1) & M64
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        h1 ^= (rotl((k1 * c1) & M64, 31) * c2) & M64
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & M64
    h2 = (h2 + h1) & M64
    h1, h2 = fmix(h1), fmix(h2)
    h1 = (h1 + h2) & M64
    return h1 - (1 << 64) if h1 >= 1 << 63 else h1


def test_postgres_s_murmur3_gives_the_partitioner_s_token_of_a_uuid() -> None:
    """The Postgres side buckets rows by hll_hash_bytea(uuid_send(k), 0) (canonical
    MurmurHash3), the Scylla side by the partitioner's token: equal for 16-byte keys."""
    rng = random.Random(5)
    for _ in range(300):
        k = uuid.UUID(int=rng.getrandbits(128))
        assert canonical_murmur3_h1(k.bytes) == murmur3(k.bytes)
    # Where a tail byte has its high bit set the two differ: only uuid keys may be bucketed
    # this way.
    assert canonical_murmur3_h1(b"\xff") != murmur3(b"\xff")
    assert canonical_murmur3_h1(b"\x01") == murmur3(b"\x01")


def test_token_of_normalizes_long_min_as_the_partitioner_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Murmur3Partitioner never yields Long.MIN_VALUE; it becomes Long.MAX_VALUE (as
    cqrs_token in schemas/postgres/0010)."""
    monkeypatch.setattr("cassandra.murmur3.murmur3", lambda _: TOKEN_MIN)
    assert token_of(uuid.UUID(int=1)) == TOKEN_MAX
    monkeypatch.setattr("cassandra.murmur3.murmur3", lambda _: TOKEN_MIN + 1)
    assert token_of(uuid.UUID(int=1)) == TOKEN_MIN + 1


# --------------------------------------------------------------------------------------------
# scan(), against a fake session


Item = list[tuple[Any, ...]] | BaseException | None  # a page, a failure, or no answer ever


@dataclass
class Bound:
    token_range: tuple[int, int]
    fetch_size: int | None = None


class Statement:
    def bind(self, values: tuple[int, int]) -> Bound:
        return Bound(tuple(values))  # type: ignore[arg-type]


class Future:
    """A ResponseFuture: callbacks fire once per page; has_more_pages tells whether another
    page is to come; start_fetching_next_page asks for it."""

    def __init__(self, fake: FakeSession, token_range: tuple[int, int]) -> None:
        self.fake, self.token_range = fake, token_range
        self.items = fake.pages[token_range]
        self.current = -1
        self.callback: Callable[[Any], None] | None = None
        self.errback: Callable[[BaseException], None] | None = None

    def add_callbacks(
        self, callback: Callable[[Any], None], errback: Callable[[BaseException], None]
    ) -> None:
        self.callback, self.errback = callback, errback
        self.fake.request(self)

    @property
    def has_more_pages(self) -> bool:
        more = self.current < len(self.items) - 1
        if not more:
            self.fake.finished(self)
        return more

    def start_fetching_next_page(self) -> None:
        self.fake.next_page_asked(self)
        self.fake.request(self)

    def deliver(self) -> None:
        self.current += 1
        item = self.items[self.current]
        if item is None:
            return  # never answers
        if isinstance(item, BaseException):
            assert self.errback is not None
            self.errback(item)
        else:
            assert self.callback is not None
            self.callback(item)


@dataclass
class FakeSession:
    """Pages per token range; records the requests and any breach of the scan's promises."""

    pages: dict[tuple[int, int], list[Item]]
    threaded: bool = False
    seed: int = 0
    started: list[Bound] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    open: set[int] = field(default_factory=set)
    max_open: int = 0
    consumed: set[int] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    timers: list[threading.Timer] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def execute_async(self, bound: Bound, execution_profile: str) -> Future:
        with self.lock:
            self.started.append(bound)
            self.profiles.append(execution_profile)
            fut = Future(self, bound.token_range)
            self.open.add(id(fut))
            self.max_open = max(self.max_open, len(self.open))
        return fut

    def request(self, fut: Future) -> None:
        self.requests += 1
        if self.threaded:
            t = threading.Timer(self.rng.random() / 500, fut.deliver)
            self.timers.append(t)
            t.start()
        else:
            fut.deliver()

    def finished(self, fut: Future) -> None:
        with self.lock:
            self.open.discard(id(fut))

    def next_page_asked(self, fut: Future) -> None:
        page = fut.items[fut.current]
        if id(page) not in self.consumed:
            self.violations.append(f"next page of {fut.token_range} asked before page consumed")

    def consume(self, pages: Iterator[list[tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
        out = []
        for page in pages:
            self.consumed.add(id(page))
            out.append(page)
        return out

    def join(self) -> None:
        for t in self.timers:
            t.join(5)


def _ring(n_ranges: int, seed: int) -> dict[tuple[int, int], list[Item]]:
    """Pages (1..4 per range, some empty, as Scylla's paging may return) of distinct rows."""
    rng = random.Random(seed)
    out: dict[tuple[int, int], list[Item]] = {}
    for r, token_range in enumerate(Buckets(8).ranges(n_ranges)):
        out[token_range] = [
            [(r, p, i) for i in range(rng.choice([0, 1, 3]))] for p in range(rng.randint(1, 4))
        ]
    return out


def _scan(fake: FakeSession, concurrency: int, **kw: Any) -> Iterator[list[tuple[Any, ...]]]:
    return scan(
        cast(Session, fake),
        cast(PreparedStatement, Statement()),
        list(fake.pages),
        concurrency=concurrency,
        fetch_size=kw.pop("fetch_size", 777),
        profile="cqrs-audit-scan",
        what="scanning cqrs.sessions_by_id",
        **kw,
    )


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize(("ranges", "concurrency"), [(16, 1), (16, 3), (16, 16), (4, 8)])
def test_every_page_of_every_range_once_within_the_concurrency(
    threaded: bool, ranges: int, concurrency: int
) -> None:
    fake = FakeSession(_ring(ranges, seed=ranges * 7 + concurrency), threaded=threaded)
    got = fake.consume(_scan(fake, concurrency))
    fake.join()
    expected = [p for ps in fake.pages.values() for p in ps]
    assert Counter(map(id, got)) == Counter(map(id, expected))
    assert [b.token_range for b in fake.started] == list(fake.pages)  # each range once
    assert {b.fetch_size for b in fake.started} == {777}
    assert set(fake.profiles) == {"cqrs-audit-scan"}
    assert fake.max_open == min(concurrency, ranges)  # parallel, and never more than that
    assert not fake.violations
    assert not fake.open  # every range read to its last page


def test_the_next_page_waits_for_the_consumer() -> None:
    """Nothing is fetched ahead of what the caller took: while the caller holds a page, no
    further request for that range has been made."""
    token_range = (TOKEN_MIN, TOKEN_MAX)
    pages: list[Item] = [[(0, p, 0)] for p in range(5)]
    fake = FakeSession({token_range: pages})
    gen = _scan(fake, 4)
    for n, expected in enumerate(pages, start=1):
        page = next(gen)
        assert page is expected
        fake.consumed.add(id(page))
        assert fake.requests == n  # the page held, and none asked for beyond it
    assert list(gen) == []
    assert fake.requests == 5
    assert [b.token_range for b in fake.started] == [token_range]
    assert not fake.violations


def test_nothing_to_scan() -> None:
    fake = FakeSession({})
    assert list(_scan(fake, 4)) == []
    assert fake.started == []


@pytest.mark.parametrize(
    ("failure", "kind", "text"),
    [
        (cassandra.OperationTimedOut("timed out"), TransientError, "OperationTimedOut"),
        (cassandra.Unavailable("not enough replicas"), TransientError, "Unavailable"),
        (cassandra.InvalidRequest("unconfigured table x"), TerminalError, "InvalidRequest"),
    ],
)
@pytest.mark.parametrize("on_page", [0, 2])
def test_a_failed_request_raises_the_classified_error(
    failure: BaseException, kind: type[Exception], text: str, on_page: int
) -> None:
    pages = _ring(8, seed=1)
    bad = list(pages)[3]
    pages[bad] = [[(3, p, 0)] for p in range(on_page)] + [failure]
    fake = FakeSession(pages)
    with pytest.raises(kind, match=f"scanning cqrs.sessions_by_id failed: {text}") as err:
        fake.consume(_scan(fake, 2))
    assert type(err.value) is kind
    assert err.value.__cause__ is failure


def test_no_page_in_time_is_transient() -> None:
    fake = FakeSession({(TOKEN_MIN, -1): [[(0, 0, 0)]], (0, TOKEN_MAX): [None]})
    with pytest.raises(TransientError, match="no page from Scylla within 0 s"):
        fake.consume(_scan(fake, 2, page_timeout_s=0.05))
    assert len(fake.consumed) == 1  # what came was handed over first


def test_responsive_io_lowers_the_switch_interval_and_the_last_user_restores_it() -> None:
    import sys

    from tasks.audit.scan import SCAN_SWITCH_INTERVAL_S, responsive_io

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        outer = responsive_io()
        outer.__enter__()
        assert sys.getswitchinterval() == pytest.approx(SCAN_SWITCH_INTERVAL_S)
        with responsive_io():  # a second, concurrent model's pass
            assert sys.getswitchinterval() == pytest.approx(SCAN_SWITCH_INTERVAL_S)
        assert sys.getswitchinterval() == pytest.approx(SCAN_SWITCH_INTERVAL_S)
        outer.__exit__(None, None, None)
        assert sys.getswitchinterval() == pytest.approx(0.004)
        with pytest.raises(RuntimeError), responsive_io():
            raise RuntimeError("a failed scan restores it too")
        assert sys.getswitchinterval() == pytest.approx(0.004)
        sys.setswitchinterval(0.0001)  # never raised above what the process chose
        with responsive_io():
            assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    finally:
        sys.setswitchinterval(before)
