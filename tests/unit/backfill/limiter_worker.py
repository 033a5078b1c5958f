"""Worker-process side of the shared rate-limit test. Its own module, so spawned processes
import tasks.backfill.rate_limit only, not the test module's flows and Prefect."""

from __future__ import annotations

import os
import time
from typing import Any

from tasks.backfill.rate_limit import RowRateLimiter

_joined: list[RowRateLimiter] = []


def join(spec: tuple[float, float, Any]) -> None:
    # Pool initializer: the shared state's lock can only reach a process as it is spawned.
    _joined.append(RowRateLimiter.joined(spec))


def ready(seconds: float) -> int:
    """Occupies a started worker for a moment, so that N of these reach N processes."""
    time.sleep(seconds)
    return os.getpid()


def take_rows(end_at: float) -> tuple[int, float, float]:
    """Take rows 20 at a time until ``end_at`` (time.monotonic is one clock for all the
    processes of a machine); returns (rows, when the first was granted, when the last was)."""
    limiter = _joined[0]
    limiter.acquire(20)
    started = last = time.monotonic()
    rows = 20
    while last < end_at:
        limiter.acquire(20)
        rows += 20
        last = time.monotonic()
    return rows, started, last
