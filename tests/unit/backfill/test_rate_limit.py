"""The load's rate limiter, in one process and shared by spawned worker processes."""

from __future__ import annotations

import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from tasks.backfill.rate_limit import RowRateLimiter
from tests.unit.backfill import limiter_worker


@pytest.mark.slow
@pytest.mark.parametrize("limit", [500.0, 4000.0])
def test_rate_limiter_never_runs_ahead_of_the_limit(limit: float) -> None:
    limiter = RowRateLimiter(limit)
    try:
        rows, started = 0, time.monotonic()
        while rows < limit * 0.8:  # ~0.8 s of rows in odd-sized writes
            n = random.randint(1, int(limit // 5))
            limiter.acquire(n)
            rows += n
            # The bucket starts empty: rows taken by any moment never exceed limit x elapsed
            # (plus one 1/10 s piece, taken at the start of its slot).
            assert rows <= limit * (time.monotonic() - started) + limiter.burst + 1
        rate = rows / (time.monotonic() - started)
    finally:
        limiter.close()
    assert limit * 0.85 <= rate <= limit * 1.05, rate


def test_rate_limiter_makes_up_for_a_stall() -> None:
    limiter = RowRateLimiter(1000.0)
    try:
        started = time.monotonic()
        limiter.acquire(100)
        time.sleep(0.3)  # a stall: its tokens are kept (up to 0.5 s), not lost
        limiter.acquire(300)
        elapsed = time.monotonic() - started
    finally:
        limiter.close()
    assert elapsed < 0.45, elapsed


@pytest.mark.slow
def test_one_rate_limit_holds_for_several_worker_processes() -> None:
    # Three spawned processes share one limit (the loader's workers > 1): together they take
    # the limit's rows, not three times as many.
    limit = 600.0
    limiter = RowRateLimiter.shared(limit)
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(
            3, mp_context=ctx, initializer=limiter_worker.join, initargs=(limiter.for_worker(),)
        ) as pool:
            # All three processes started and imported before the clock starts.
            pids: set[int] = set()
            for _ in range(20):
                pids |= {
                    f.result(timeout=120)
                    for f in [pool.submit(limiter_worker.ready, 0.3) for _ in range(3)]
                }
                if len(pids) == 3:
                    break
            assert len(pids) == 3, pids
            end_at = time.monotonic() + 4.0
            futures = [pool.submit(limiter_worker.take_rows, end_at) for _ in range(3)]
            shares = [f.result(timeout=60) for f in futures]
    finally:
        limiter.close()
    rows = sum(n for n, _, _ in shares)
    # The window runs from the first row granted to the last: a worker's last acquisition
    # may start just before end_at and be granted after it, from tokens refilled after it.
    window = max(last for _, _, last in shares) - min(first for _, first, _ in shares)
    assert window > 3, f"a worker took {4 - window:.1f} s to take its first rows"
    # Before the window the bucket refilled at most catch_up_s (0.5 s) of rows; the first
    # process's first 20 rows were granted before its clock read.
    assert limit * window * 0.9 <= rows <= limit * (window + 0.5) + 20, (rows, window)
