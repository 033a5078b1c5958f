"""The load's hard limit on rows written per second, for one process or shared by the
worker processes of one load."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.managers import SyncManager

from pyrate_limiter import (
    Duration,
    Limiter,
    MultiprocessStateStore,
    Rate,
    StateBucket,
    TokenBucket,
)

from tasks.backfill.processes import die_with_parent
from tasks.core.errors import InvalidInput, TerminalError

# What a worker process needs to join a limiter: (rows/s, catch-up seconds, shared state).
LimiterSpec = tuple[float, float, MultiprocessStateStore | None]


class RowRateLimiter:
    """A hard cap on rows written per second: pyrate-limiter's token bucket, refilling at the
    limit and holding ``catch_up_s`` seconds of rows, that starts EMPTY. So the rows written
    by any moment t after the start never exceed limit x t, while a stall (GC, a descheduled
    process, a slow write) of up to ``catch_up_s`` is made up afterwards instead of lost; no
    window of T seconds holds more than limit x (T + catch_up_s) rows. Rows are taken in
    pieces of at most 1/10 s, so writes stay smooth.

    ``shared`` makes one limit for the worker processes of one load. Separate backfills (on
    other Prefect workers) each have their own limit; pyrate-limiter's Redis or Postgres
    buckets would make one across machines."""

    _manager: SyncManager | None = None

    def __init__(
        self,
        rows_per_s: float,
        catch_up_s: float = 0.5,
        *,
        store: MultiprocessStateStore | None = None,
        drain: bool = True,
    ) -> None:
        if not rows_per_s > 0:
            raise InvalidInput(f"rate limit must be > 0 rows/s, got {rows_per_s}")
        self.rows_per_s, self.catch_up_s, self.store = rows_per_s, catch_up_s, store
        self.burst = max(1, int(rows_per_s * 0.1))  # rows per acquisition (and write)
        capacity = max(self.burst, int(rows_per_s * catch_up_s))
        # Rate takes an integer limit per interval: rows per 1000 s keeps fractional rates.
        rate = Rate(max(1, round(rows_per_s * 1000)), Duration.SECOND * 1000, burst=capacity)
        # buffer_ms: the library sleeps this much past the computed wait; 1 ms, not the
        # default 50, or short waits would lose most of the rate.
        bucket = (
            StateBucket([rate], algorithm=TokenBucket())
            if store is None
            else StateBucket([rate], algorithm=TokenBucket(), store=store)
        )
        self._limiter = Limiter(bucket, buffer_ms=1)
        if drain:
            # Drain the bucket: a full one would let catch_up_s of rows out at once.
            self._limiter.try_acquire("backfill", weight=capacity)

    @classmethod
    def shared(cls, rows_per_s: float, catch_up_s: float = 0.5) -> RowRateLimiter:
        """One limit for several processes: the token bucket's state lives in a
        multiprocessing manager (pyrate-limiter's MultiprocessStateStore), so N loader
        processes together write at most the limit, however the chunks fall among them."""
        # Lock and manager from the spawn context the loader's workers are started with (a
        # fork-context lock cannot be handed to a spawned process).
        ctx = multiprocessing.get_context("spawn")
        manager = SyncManager(ctx=ctx)
        manager.start(die_with_parent, (os.getpid(),))  # no orphan after a kill
        limiter = cls(
            rows_per_s, catch_up_s, store=MultiprocessStateStore(manager.list(), ctx.RLock())
        )
        limiter._manager = manager
        return limiter

    def for_worker(self) -> LimiterSpec:
        """What a worker process needs to join this limiter (see ``joined``)."""
        return self.rows_per_s, self.catch_up_s, self.store

    @classmethod
    def joined(cls, spec: LimiterSpec) -> RowRateLimiter:
        rows_per_s, catch_up_s, store = spec
        return cls(rows_per_s, catch_up_s, store=store, drain=store is None)

    def acquire(self, rows: int) -> None:
        while rows > 0:
            n = min(rows, self.burst)
            if not self._limiter.try_acquire("backfill", weight=n):
                raise TerminalError(f"rate limiter refused {n} rows (burst {self.burst})")
            rows -= n

    def close(self) -> None:
        self._limiter.close()
        if self._manager is not None:
            self._manager.shutdown()
