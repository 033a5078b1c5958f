"""The dual-write's Scylla side: the write within a hard deadline, on a writer that is
connected, and its statements prepared, in the background.

Why not just ``ScyllaWriter.write(timeout=...)`` in the caller's thread: that timeout bounds
each request once sent, not the call. Seen with Cassandra stopping under load: the first
call blocked 2 s inside ``execute_async``, where the driver borrows a connection from a pool
whose connection has just gone defunct (``borrow_connection(timeout=2.0)``, hard-coded). A
statement not yet prepared is prepared synchronously with the session's default timeout
(10 s), and ``connect`` takes seconds when the cluster is down. So:

- the statements the projection can produce are prepared once, up front;
- while no session exists, calls skip the Scylla step (CDC converges) and a background thread
  retries the connection;
- a call's mutations go as one unlogged batch when they are few and small (one round trip),
  else as concurrent writes;
- a small batch whose statements are all prepared, on a session whose connections are all
  open, is sent on the caller's thread with the deadline as its request timeout: nothing on
  that path waits longer (docs/decisions.md, "The dual-write sends on the caller's thread
  while the pool is healthy");
- any other write runs on a small pool of threads and the caller waits at most the
  deadline; a write still running then finishes (or fails) in the background, which is
  harmless since every cell carries its source version. At most ``max_in_flight`` such
  writes exist: beyond that the step is skipped at once rather than queued behind a slow
  cluster.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any

from cassandra.cluster import Session

from tasks.adapters import scylla
from tasks.adapters.replica_batches import batch_bytes
from tasks.adapters.scylla import ScyllaWriter
from tasks.core.errors import ServiceUnavailable, TransientError
from tasks.core.projection import Change, Mutation, normalize_row, project, project_row
from tasks.settings import ScyllaSettings

log = logging.getLogger("cqrs_sync.dual_write")


def _sample_rows() -> dict[str, dict[str, Any]]:
    now, u = datetime.now(UTC), uuid.uuid4()
    base = {"id": u, "session_id": u, "created_at": now, "updated_at": now}
    return {
        "sessions": {
            **base,
            "user_id": u,
            "title": "",
            "last_message": "",
            "last_message_at": None,
            "turn_count": 0,
        },
        "human_turns": {**base, "content": "x"},
        "agent_turns": {**base, "content": "x", "model": ""},
        "steps": {**base, "agent_turn_id": u, "kind": "x", "payload": "{}"},
    }


def warm_up_statements() -> list[Mutation]:
    """One mutation of every statement shape the dual-write produces (an upsert and a delete
    per source table and read model). The CQL text depends only on the read model and the
    column names, and rows read from Postgres always carry every column, so preparing these
    covers every statement later calls will bind."""
    out: list[Mutation] = []
    for table, row in _sample_rows().items():
        out.extend(project_row(table, row))
        out.extend(project(Change(table, "d", normalize_row(table, row), None, 1)))
    return out


def warm_up(writer: ScyllaWriter) -> int:
    """Prepare (and cache in the writer) every statement; writes nothing."""
    return len(writer.bound(warm_up_statements()))


class ScyllaHandle:
    """Holds the writer once it is usable; ``writer()`` and ``write()`` never block for longer
    than the deadline they are given. Connects with ``settings`` (to their keyspace) unless
    given a ``writer``."""

    def __init__(
        self,
        settings: ScyllaSettings,
        writer: ScyllaWriter | None = None,
        *,
        connect: bool = True,
        retry_interval_s: float = 5.0,
        max_in_flight: int = 16,
        batch_max_statements: int = 16,
        batch_max_bytes: int | None = None,
    ) -> None:
        self._batch_max_statements = batch_max_statements
        self._settings = settings
        # The writer's own bound (CQRS_SCYLLA_BATCH_MAX_BYTES, under the server's warning).
        self._batch_max_bytes = batch_max_bytes or settings.batch_max_bytes
        self._executor = ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="dual-write-scylla"
        )
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._writer: ScyllaWriter | None = None
        self._owned: Session | None = None
        self._lock = threading.Lock()
        self._connecting = False
        self._closed = False
        self._last_attempt = float("-inf")
        self._retry_interval_s = retry_interval_s
        self._auto_connect = connect and writer is None
        self._ready = threading.Event()
        if writer is not None:
            try:
                warm_up(writer)
            except Exception as exc:
                log.warning("could not prepare the dual-write statements yet: %s", exc)
            self._writer = writer
            self._ready.set()
        elif self._auto_connect:
            self._start_connect()

    def writer(self) -> ScyllaWriter | None:
        w = self._writer
        if w is None and self._auto_connect:
            self._start_connect()
        return w

    def write(self, mutations: Sequence[Mutation], deadline_s: float) -> None:
        """Apply ``mutations`` within ``deadline_s`` of wall time, or raise what the writer
        raises (``ScyllaWriter``: TransientError, RejectedData, TerminalError)."""
        writer = self.writer()
        if writer is None:
            raise ServiceUnavailable("Scylla", "not connected (a background thread retries)")
        small = (
            len(mutations) <= self._batch_max_statements
            and batch_bytes(mutations) <= self._batch_max_bytes
        )
        if small:
            # The common case, on the caller's thread: nothing here can wait past the
            # deadline, so the hop to a worker thread (~0.35 ms of a ~1 ms step) is saved.
            statements = writer.prepared_statements(mutations)
            if statements is not None and writer.connections_open():
                writer.send_batch(statements, deadline_s)
                return
        if not self._slots.acquire(blocking=False):
            raise ServiceUnavailable(
                "Scylla",
                f"{self._max_in_flight} dual-writes still in "
                "flight past their deadline: the cluster is slow",
            )
        try:
            future = self._executor.submit(
                writer.write_batch if small else writer.write, mutations, deadline_s
            )
        except RuntimeError as exc:  # closed
            self._slots.release()
            raise ServiceUnavailable("Scylla", "the dual-write handle is closed") from exc
        future.add_done_callback(lambda _f: self._slots.release())
        try:
            future.result(timeout=deadline_s)
        except FutureTimeout:
            raise TransientError(
                f"Scylla write of {len(mutations)} mutations exceeded the "
                f"{deadline_s * 1000:g} ms deadline"
            ) from None

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def _start_connect(self) -> None:
        with self._lock:
            now = time.monotonic()
            if (
                self._closed
                or self._connecting
                or now - self._last_attempt < self._retry_interval_s
            ):
                return
            self._connecting, self._last_attempt = True, now
        threading.Thread(
            target=self._connect, name="dual-write-scylla-connect", daemon=True
        ).start()

    def _connect(self) -> None:
        session: Session | None = None
        try:
            session = scylla.connect(self._settings, keyspace=self._settings.keyspace)
            writer = ScyllaWriter(session, self._settings)
            prepared = warm_up(writer)
            with self._lock:
                if self._closed:
                    scylla.close(session)
                    return
                self._owned, self._writer = session, writer
            self._ready.set()
            log.info("dual-write: Scylla connected, %d statements prepared", prepared)
        except Exception as exc:
            if session is not None:
                scylla.close(session)
            log.warning(
                "dual-write: Scylla not reachable, calls leave the read models to CDC "
                "until it is: %s",
                exc,
            )
        finally:
            with self._lock:
                self._connecting = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            owned, self._owned, self._writer = self._owned, None, None
        self._executor.shutdown(wait=True, cancel_futures=True)
        if owned is not None:
            scylla.close(owned)
