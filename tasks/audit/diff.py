"""The key-level diff of one read model: Postgres (the expected rows of schemas/postgres/0010)
against Scylla, data-diff's way (docs/decisions.md, "The audit buckets by token, computed in
Postgres"):

1. both sides reduced to (row count, sum of row fingerprints) per token bucket: Postgres in
   one aggregate query, Scylla by a parallel scan of token ranges, at the same time;
2. only the buckets whose sums differ are read row by row on both sides (a filtered pass in
   Postgres, the buckets' token ranges in Scylla), and each difference classified: missing,
   extra, or stale (naming the differing columns, and the write time against the version);
3. differences that live traffic may explain (a source change younger than the freshness
   window, or a row whose source is gone) are read again once after the window; only what
   is still different, and not merely behind, counts as drift.

Memory: a bucket is two integers per side, and the bucket count is capped
(``AuditSettings.max_bucket_bits``); rows are held only for the mismatching buckets.
"""

from __future__ import annotations

import contextlib
import queue
import random
import time
from array import array
from collections.abc import (
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from psycopg import sql

from tasks.audit.fingerprints import (
    Shape,
    fingerprint,
    fingerprint_scanned,
    render,
    shape,
    typed_key,
)
from tasks.audit.scan import (
    Buckets,
    bucket_bits,
    ensure_profile,
    responsive_io,
    scan,
    scan_parts,
)
from tasks.core import catalog
from tasks.core.cql import check_keyspace
from tasks.core.errors import TerminalError, classify

if TYPE_CHECKING:
    from cassandra.cluster import Session
    from psycopg import Connection

    from tasks.settings import AuditSettings, ScyllaSettings

Kind = Literal["missing", "extra", "stale"]
Key = tuple[str | None, ...]
ExpectedRow = tuple[int, tuple[str | None, ...], int]  # token, columns as text, version
FINGERPRINT_MASK = (1 << 64) - 1  # bucket sums are kept mod 2**64 on both sides


@dataclass(frozen=True, slots=True)
class Difference:
    """One row that differs. ``key`` maps the primary key's columns to their compared text;
    values never appear here (reports and logs carry ids only)."""

    read_model: str
    kind: Kind
    key: dict[str, str | None]
    token: int
    columns: tuple[str, ...] = ()  # stale: the columns whose values differ
    expected_version_us: int | None = None  # the source row's version (missing, stale)
    writetime_us: int | None = None  # the version column's write time (extra, stale)
    max_writetime_us: int | None = None  # the newest write time of any value cell

    @property
    def source_id(self) -> str | None:
        return self.key.get(shape(self.read_model).source_id_column)

    def describe(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in self.key.items())
        if self.kind != "stale":
            return f"{self.kind} {self.read_model}({keys})"
        what = ", ".join(self.columns) + " differ" if self.columns else "only the version differs"
        wt, v = self.writetime_us, self.expected_version_us
        when = ""
        if wt is not None and v is not None and wt != v:
            when = "; written at an older version" if wt < v else "; a newer write shadows it"
        return f"stale {self.read_model}({keys}): {what}{when} (writetime {wt}, version {v})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class ModelAudit:
    """What the diff of one read model found, and what it cost."""

    read_model: str
    bucket_bits: int
    rows_expected: int = 0
    rows_actual: int = 0
    mismatched_buckets: int = 0
    drilled_rows: int = 0
    rechecked: int = 0
    settled_by_recheck: int = 0
    differences: list[Difference] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # partition keys, for the GX suites
    read_at_us: int = 0  # Postgres's clock when the differences were read
    seconds: dict[str, float] = field(default_factory=dict)

    def count(self, kind: Kind) -> int:
        return sum(1 for d in self.differences if d.kind == kind)


# --------------------------------------------------------------------------------------------
# Postgres: the expected side


def estimate_rows(conn: Connection[Any], read_model: str) -> int:
    """Rows the read model should hold, from the planner's statistics of its source tables
    (a count where the tables were never analyzed)."""
    tables = [t for t in catalog.SOURCE_TABLES if read_model in catalog.read_models_of(t)]
    total = 0
    for t in tables:
        (tuples,) = conn.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (t,)
        ).fetchone() or (-1,)
        if tuples < 0:
            (tuples,) = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))
            ).fetchone() or (0,)
        total += int(tuples)
    return total


@dataclass(slots=True)
class BucketSums:
    """(rows, sum of fingerprints mod 2**64) of every bucket, in two flat arrays indexed by
    ``bucket - buckets.first``: 16 bytes a bucket (a dict of Python ints took ~250, which
    made the audit's memory grow with the table up to the bucket cap)."""

    buckets: Buckets
    rows: array[int] = field(init=False)
    sums: array[int] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = array("q", bytes(8 * self.buckets.count))
        self.sums = array("Q", bytes(8 * self.buckets.count))

    def add(self, bucket: int, rows: int, fingerprint_sum: int) -> None:
        i = bucket - self.buckets.first
        self.rows[i] += rows
        self.sums[i] = (self.sums[i] + fingerprint_sum) & FINGERPRINT_MASK

    def total(self) -> int:
        return sum(self.rows)

    def differing(self, other: BucketSums) -> list[int]:
        """The buckets whose rows or sums differ, in order."""
        first, rows, sums = self.buckets.first, self.rows, self.sums
        o_rows, o_sums = other.rows, other.sums
        return [i + first for i in range(len(rows)) if rows[i] != o_rows[i] or sums[i] != o_sums[i]]


def expected_sums(conn: Connection[Any], sh: Shape, buckets: Buckets) -> BucketSums:
    """(rows, sum of fingerprints) per bucket, computed by Postgres, streamed in."""
    out = BucketSums(buckets)
    query = sql.SQL("SELECT token >> %s, count(*), sum(fingerprint) FROM {} GROUP BY 1").format(
        sql.Identifier(sh.view)
    )
    for b, n, total in conn.cursor().stream(query, (buckets.shift,), size=10_000):
        out.add(int(b), int(n), int(total))
    return out


def expected_rows(
    conn: Connection[Any], sh: Shape, buckets: Buckets, bucket_ids: Collection[int], chunk: int
) -> Generator[tuple[Key, ExpectedRow]]:
    """The expected rows of these buckets in token order, by key: (token, columns,
    version), streamed ``chunk`` rows at a time. The bucket filter is pushed into each branch
    of the view (a hashed array test in the scan), so only matching rows are rendered; an
    ``IN (SELECT unnest(...))`` was joined above the view instead, rendering every row
    (measured on 625,000 timeline rows and 610 buckets: 2.06 s against 0.80 s)."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in sh.columns)
    query = sql.SQL(
        "SELECT token, version_us, {} FROM {} WHERE token >> %s = ANY(%s::bigint[]) ORDER BY token"
    ).format(cols, sql.Identifier(sh.view))
    # A generator: closed early (an error on the Scylla side), it cancels the query and
    # drains the connection, which is used again after the drill-down.
    rows = cast(
        Generator[tuple[Any, ...]],
        conn.cursor().stream(query, (buckets.shift, list(bucket_ids)), size=chunk),
    )
    with contextlib.closing(rows):
        for token, version, *fields in rows:
            yield tuple(fields[: sh.key_width]), (int(token), tuple(fields), int(version))


# --------------------------------------------------------------------------------------------
# Scylla: the actual side


def actual_sums(
    session: Session,
    keyspace: str,
    sh: Shape,
    buckets: Buckets,
    rows_hint: int,
    cfg: AuditSettings,
    profile: str,
    samples: int,
) -> tuple[BucketSums, list[str]]:
    """(rows, sum of fingerprints) per bucket from a scan of the whole ring, and a uniform
    sample of ``samples`` partition keys (reservoir sampling over rows)."""
    stmt = session.prepare(sh.scan_cql(keyspace))
    parts = scan_parts(buckets, rows_hint, cfg.fetch_size, cfg.scan_concurrency)
    sums = BucketSums(buckets)
    counts, totals = sums.rows, sums.sums
    width, shift, first = len(sh.columns), buckets.shift, buckets.first
    reservoir: list[str] = []
    seen = 0
    rng = random.Random(0x5C4)
    for page in scan(
        session,
        stmt,
        buckets.ranges(parts),
        concurrency=cfg.scan_concurrency,
        fetch_size=cfg.fetch_size,
        profile=profile,
        what=f"scanning {keyspace}.{sh.read_model}",
    ):
        for row in page:  # BucketSums.add, inlined: this loop runs once per row
            i = (row[0] >> shift) - first
            counts[i] += 1
            totals[i] = (totals[i] + fingerprint_scanned(row, width)) & FINGERPRINT_MASK
        if samples:
            for row in page:
                seen += 1
                if len(reservoir) < samples:
                    reservoir.append(row[1])
                elif (j := rng.randrange(seen)) < samples:
                    reservoir[j] = row[1]
    return sums, list(dict.fromkeys(reservoir))


ActualRow = tuple[int, tuple[str | None, ...], int | None, int | None]


def read_back(row: Sequence[Any], width: int, key_width: int) -> tuple[Key, ActualRow]:
    """A row read with all write times (``Shape.scan_cql(writetimes=True)``,
    ``point_cql``): its key, and (token, columns as compared text, the version column's
    write time, the newest write time of any value cell)."""
    fields = tuple(render(v) for v in row[1 : width + 1])
    times = [t for t in row[width + 2 :] if t is not None]
    return fields[:key_width], (row[0], fields, row[width + 1], max(times, default=None))


def actual_rows(
    session: Session,
    keyspace: str,
    sh: Shape,
    buckets: Buckets,
    bucket_ids: Collection[int],
    cfg: AuditSettings,
    profile: str,
) -> Iterator[tuple[Key, ActualRow]]:
    """The rows Scylla holds in these buckets, as they come, by key: (token, columns as
    text, the version column's write time, the newest write time of any value cell)."""
    stmt = session.prepare(sh.scan_cql(keyspace, writetimes=True))
    width = len(sh.columns)
    for page in scan(
        session,
        stmt,
        buckets.runs(bucket_ids),
        concurrency=cfg.scan_concurrency,
        fetch_size=cfg.fetch_size,
        profile=profile,
        what=f"reading differing buckets of {keyspace}.{sh.read_model}",
    ):
        for row in page:
            yield read_back(row, width, sh.key_width)


def expected_by_source(
    conn: Connection[Any], sh: Shape, source_ids: Collection[str]
) -> dict[Key, ExpectedRow]:
    """The expected rows of these source rows (by the source's primary key: index reads)."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in sh.columns)
    query = sql.SQL(
        "SELECT token, version_us, {} FROM {} WHERE source_id = ANY(%s::uuid[])"
    ).format(cols, sql.Identifier(sh.view))
    out: dict[Key, ExpectedRow] = {}
    for token, version, *fields in conn.execute(query, (list(source_ids),)):
        out[tuple(fields[: sh.key_width])] = (int(token), tuple(fields), int(version))
    return out


def actual_by_key(
    session: Session, keyspace: str, sh: Shape, keys: Collection[Key], profile: str
) -> dict[Key, tuple[int, tuple[str | None, ...], int | None, int | None]]:
    """The rows Scylla holds at these keys (single-row reads)."""
    from tasks.adapters.scylla import execute_windowed

    stmt = session.prepare(sh.point_cql(keyspace))
    key_cols = sh.columns[: sh.key_width]
    args = [
        tuple(v for _, v in typed_key(sh.read_model, dict(zip(key_cols, k, strict=True))))
        for k in keys
    ]
    width = len(sh.columns)
    out: dict[Key, tuple[int, tuple[str | None, ...], int | None, int | None]] = {}
    for rows in execute_windowed(session, ((stmt, a) for a in args), 32, profile):
        for row in rows:
            key, actual = read_back(row, width, sh.key_width)
            out[key] = actual
    return out


# --------------------------------------------------------------------------------------------
# Comparison


def compare(
    sh: Shape,
    expected: dict[Key, ExpectedRow],
    actual: Mapping[Any, ActualRow] | Iterable[tuple[Key, ActualRow]],
) -> list[Difference]:
    """Every key whose rows differ, classified. ``actual`` may be a stream of (key, row):
    matched expected rows are dropped as it goes, so only one side is held (and
    ``expected`` is emptied)."""
    out: list[Difference] = []
    key_cols = sh.columns[: sh.key_width]
    items = actual.items() if isinstance(actual, Mapping) else actual
    for key, act in items:
        exp = expected.pop(key, None)
        if exp is None:
            named = dict(zip(key_cols, key, strict=True))
            out.append(
                Difference(
                    sh.read_model,
                    "extra",
                    named,
                    act[0],
                    writetime_us=act[2],
                    max_writetime_us=act[3],
                )
            )
        elif fingerprint(exp[1], exp[2]) != fingerprint(act[1], act[2]):
            named = dict(zip(key_cols, key, strict=True))
            columns = tuple(c for c, e, a in zip(sh.columns, exp[1], act[1], strict=True) if e != a)
            out.append(
                Difference(sh.read_model, "stale", named, exp[0], columns, exp[2], act[2], act[3])
            )
    for key, exp in expected.items():
        named = dict(zip(key_cols, key, strict=True))
        out.append(Difference(sh.read_model, "missing", named, exp[0], expected_version_us=exp[2]))
    expected.clear()
    out.sort(key=lambda d: (d.token, tuple(map(str, d.key.values()))))
    return out


def needs_recheck(d: Difference, now_us: int, window_us: int) -> bool:
    """Whether live traffic may explain the difference: a source version younger than the
    window, or an extra row (its source's delete leaves no version to date it by)."""
    if d.kind == "extra":
        return True
    return d.expected_version_us is None or d.expected_version_us >= now_us - window_us


def settled(first: Difference, again: Difference | None) -> bool:
    """Whether a difference seen twice is only behind: gone, or the source moved on and
    Scylla holds at least the version first expected."""
    if again is None:
        return True
    v1, v2, wt = first.expected_version_us, again.expected_version_us, again.writetime_us
    return v1 is not None and v2 is not None and v2 > v1 and wt is not None and wt >= v1


def diff_buckets(
    conn: Connection[Any],
    session: Session,
    keyspace: str,
    sh: Shape,
    buckets: Buckets,
    bucket_ids: Collection[int],
    cfg: AuditSettings,
    profile: str,
) -> tuple[list[Difference], int, int]:
    """The differences in these buckets, the rows read, and Postgres's clock (µs) before it
    read them. Both sides come in token order, a batch of buckets at a time (about a page of
    rows, ``fetch_size / rows_per_bucket`` buckets): Postgres's rows of the batch are held,
    Scylla's compared as they stream in. So memory holds one batch of one side, however
    many buckets differ (with 0.1% drift their number grows with the table)."""
    if not bucket_ids:
        return [], 0, 0
    (now_us,) = conn.execute("SELECT cqrs_version_us(clock_timestamp())").fetchone() or (0,)
    ordered = sorted(set(bucket_ids))
    per_batch = max(1, cfg.fetch_size // cfg.rows_per_bucket)
    found: list[Difference] = []
    read = 0
    with contextlib.closing(expected_rows(conn, sh, buckets, ordered, cfg.fetch_size)) as rows:
        ahead = next(rows, None)
        for start in range(0, len(ordered), per_batch):
            batch = ordered[start : start + per_batch]
            exp: dict[Key, ExpectedRow] = {}
            while ahead is not None and buckets.of(ahead[1][0]) <= batch[-1]:
                exp[ahead[0]] = ahead[1]
                ahead = next(rows, None)
            read += len(exp)
            counted = _counting(actual_rows(session, keyspace, sh, buckets, batch, cfg, profile))
            found.extend(compare(sh, exp, counted))  # batches come in token order, so does found
            read += counted.count
        if ahead is not None:  # cannot happen: every row's bucket was asked for
            raise TerminalError(f"{sh.view}: a row of token {ahead[1][0]} outside the buckets")
    return found, read, int(now_us)


class _counting:
    """An iterator that counts what went through it."""

    def __init__(self, items: Iterator[tuple[Key, ActualRow]]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[tuple[Key, ActualRow]]:
        for item in self.items:
            self.count += 1
            yield item


def audit_read_model(
    pg_conn: Connection[Any],
    session: Session,
    scylla: ScyllaSettings,
    read_model: str,
    cfg: AuditSettings,
    *,
    window_s: float,
    samples: int = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> ModelAudit:
    """Diff one read model, re-checking what live traffic may explain;
    ``pg_conn`` is a reader-role connection in autocommit mode."""
    result = first_pass(pg_conn, session, scylla, read_model, cfg, samples=samples)
    recheck([result], pg_conn, session, scylla, cfg, window_s=window_s, sleep=sleep)
    return result


def first_pass(
    pg_conn: Connection[Any],
    session: Session,
    scylla: ScyllaSettings,
    read_model: str,
    cfg: AuditSettings,
    *,
    samples: int = 0,
    rows_hint: int | None = None,
) -> ModelAudit:
    """Checksums of both sides, and the rows of the buckets that differ compared: the
    differences before any re-check (see :func:`recheck`). ``rows_hint``: the read model's
    :func:`estimate_rows`, when the caller has it already."""
    keyspace = check_keyspace(scylla.keyspace)
    sh = shape(read_model)
    started = time.perf_counter()
    try:
        if rows_hint is None:
            rows_hint = estimate_rows(pg_conn, read_model)
        buckets = Buckets(bucket_bits(rows_hint, cfg.rows_per_bucket, cfg.max_bucket_bits))
        result = ModelAudit(read_model, buckets.bits)
        profile = ensure_profile(session, scylla.read_consistency_level, scylla.request_timeout_s)
        with ThreadPoolExecutor(1, thread_name_prefix="audit-pg") as pool:
            t0 = time.perf_counter()
            expected_future = pool.submit(expected_sums, pg_conn, sh, buckets)
            actual, result.samples = actual_sums(
                session, keyspace, sh, buckets, rows_hint, cfg, profile, samples
            )
            result.seconds["scylla_scan"] = time.perf_counter() - t0
            expected = expected_future.result()
            result.seconds["checksums"] = time.perf_counter() - t0
        result.rows_expected, result.rows_actual = expected.total(), actual.total()
        mismatched = expected.differing(actual)
        result.mismatched_buckets = len(mismatched)
        t1 = time.perf_counter()
        result.differences, result.drilled_rows, result.read_at_us = diff_buckets(
            pg_conn, session, keyspace, sh, buckets, mismatched, cfg, profile
        )
        result.seconds["drill_down"] = time.perf_counter() - t1
    except Exception as exc:
        raise classify(exc, f"auditing {read_model}") from exc
    result.seconds["total"] = time.perf_counter() - started
    return result


def first_passes(
    conns: Sequence[Connection[Any]],
    session: Session,
    scylla: ScyllaSettings,
    read_models: Sequence[str],
    cfg: AuditSettings,
    *,
    samples: int = 0,
) -> list[ModelAudit]:
    """:func:`first_pass` of several read models, as many at once as ``conns`` (one
    reader-role connection each; the Scylla session is shared). Read models load different
    processes (the timeline's pass waits on Scylla's scan, the steps' on Postgres's
    fingerprints), so two at once finish sooner than one after the other. The largest
    start first, so a small one never delays the longest pass; results keep the order of
    ``read_models``."""
    free: queue.SimpleQueue[Connection[Any]] = queue.SimpleQueue()
    for conn in conns:
        free.put(conn)
    size = {rm: estimate_rows(conns[0], rm) for rm in read_models} if conns else {}
    largest_first = sorted(read_models, key=lambda rm: -size.get(rm, 0))

    def one(read_model: str) -> ModelAudit:
        conn = free.get()
        try:
            return first_pass(
                conn,
                session,
                scylla,
                read_model,
                cfg,
                samples=samples,
                rows_hint=size.get(read_model),
            )
        finally:
            free.put(conn)

    with (
        responsive_io(),
        ThreadPoolExecutor(max(1, len(conns)), thread_name_prefix="audit-model") as pool,
    ):
        done = dict(zip(largest_first, pool.map(one, largest_first), strict=True))
    return [done[rm] for rm in read_models]


def recheck(
    results: Iterable[ModelAudit],
    pg_conn: Connection[Any],
    session: Session,
    scylla: ScyllaSettings,
    cfg: AuditSettings,
    *,
    window_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Read again, once, the differences live traffic may explain (see
    :func:`needs_recheck`), after the freshness window has passed since they were first
    read; keep those still different and not merely behind. One wait serves every read
    model, so an audit of several waits once."""
    results = list(results)
    window_us = int(window_s * 1e6)
    todo = {
        id(r): [d for d in r.differences if needs_recheck(d, r.read_at_us, window_us)]
        for r in results
    }
    if not any(todo.values()):
        return
    t = time.perf_counter()
    (now_us,) = pg_conn.execute("SELECT cqrs_version_us(clock_timestamp())").fetchone() or (0,)
    first_read = min(r.read_at_us for r in results if todo[id(r)])
    sleep(max(0.0, window_s - (int(now_us) - first_read) / 1e6))
    profile = ensure_profile(session, scylla.read_consistency_level, scylla.request_timeout_s)
    try:
        for r in results:
            again_needed = todo[id(r)]
            if not again_needed:
                continue
            sh = shape(r.read_model)
            keys = [tuple(d.key.values()) for d in again_needed]
            wanted = set(keys)
            sources = {d.source_id for d in again_needed if d.source_id is not None}
            exp = {k: v for k, v in expected_by_source(pg_conn, sh, sources).items() if k in wanted}
            act = actual_by_key(session, check_keyspace(scylla.keyspace), sh, keys, profile)
            second = compare(sh, exp, act)
            by_key = {tuple(d.key.values()): d for d in second}
            recheck_keys = {tuple(d.key.values()) for d in again_needed}
            confirmed: list[Difference] = []
            for d in r.differences:
                k = tuple(d.key.values())
                if k not in recheck_keys:
                    confirmed.append(d)
                elif not settled(d, by_key.get(k)):
                    confirmed.append(by_key[k])
            r.rechecked = len(again_needed)
            r.settled_by_recheck = len(r.differences) - len(confirmed)
            r.differences = confirmed
    except Exception as exc:
        raise classify(exc, "re-checking differences") from exc
    elapsed = time.perf_counter() - t
    for r in results:
        if todo[id(r)]:
            r.seconds["recheck"] = elapsed
            r.seconds["total"] = r.seconds.get("total", 0.0) + elapsed


def differing_keys(differences: Iterable[Difference]) -> dict[str, list[Difference]]:
    out: dict[str, list[Difference]] = {}
    for d in differences:
        out.setdefault(d.read_model, []).append(d)
    return out
