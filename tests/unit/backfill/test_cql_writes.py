"""The cql load method's writes (pure: a fake writer and session). PipelinedWriter: at most
`concurrency` requests in flight, everything acknowledged by flush(), and a failure anywhere in
the pipeline surfaces as one TransientError with nothing left in flight."""

from __future__ import annotations

from typing import Any

import pytest
from cassandra import OperationTimedOut

from tasks.backfill.cql_writes import PipelinedWriter
from tasks.core.errors import TransientError


class _Future:
    def __init__(self, session: _Session, request: Any) -> None:
        self.session, self.request = session, request

    def result(self) -> None:
        self.session.in_flight -= 1
        if self.request in self.session.failing:
            raise OperationTimedOut("timed out")
        self.session.acked.append(self.request)


class _Session:
    def __init__(self, failing: set[Any] = frozenset()) -> None:  # type: ignore[assignment]
        self.failing, self.acked = set(failing), []  # type: ignore[var-annotated]
        self.in_flight = self.peak = 0

    def execute_async(self, request: Any) -> _Future:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return _Future(self, request)


class _Writer:
    keyspace, concurrency = "ks", 3

    def __init__(self, session: _Session) -> None:
        self.session = session

    def prepare(self, cql: str) -> str:
        if cql == "unpreparable":
            raise OperationTimedOut("prepare timed out")
        return cql

    def requests(self, statements: list[tuple[str, Any]]) -> list[Any]:
        return [params for _, params in statements]  # one request per row


def test_bounded_in_flight_and_all_acknowledged_after_flush() -> None:
    session = _Session()
    w = PipelinedWriter(_Writer(session))  # type: ignore[arg-type]
    assert w.submit_rows("q", [(i,) for i in range(10)]) == 10
    assert session.peak <= 3 and len(session.acked) == 7  # the oldest awaited beyond 3
    w.flush()
    assert session.acked == [(i,) for i in range(10)] and session.in_flight == 0


@pytest.mark.parametrize("where", ["while submitting", "in flush"])
def test_a_failed_request_raises_transient_and_leaves_nothing_in_flight(where: str) -> None:
    session = _Session(failing={(1,) if where == "while submitting" else (9,)})
    w = PipelinedWriter(_Writer(session))  # type: ignore[arg-type]
    with pytest.raises(TransientError, match="OperationTimedOut"):
        w.submit_rows("q", [(i,) for i in range(10)])
        w.flush()
    acked = list(session.acked)
    w.flush()  # nothing left to wait for: the chunk is redone as a whole
    assert session.acked == acked
    with pytest.raises(TransientError, match="prepare timed out"):
        w.submit_rows("unpreparable", [(1,)])


def test_replica_batches_drop_only_the_server_warning_they_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server warns on every batch over 10 partitions; the loader's batches span
    # partitions of one replica set on purpose. Other server warnings still get through.
    from cassandra.protocol import log as driver_log

    from tasks.adapters.scylla import ScyllaWriter
    from tasks.settings import ScyllaSettings

    ScyllaWriter(object(), ScyllaSettings(), keyspace="ks", replica_batch_rows=20)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="cassandra.protocol"):
        driver_log.warning(
            "Server warning: %s",
            "Unlogged batch covering 13 partitions detected against table [ks.t].",
        )
        driver_log.warning("Server warning: %s", "Batch for [ks.t] is of size 6.1KiB")
    assert [r.getMessage() for r in caplog.records] == [
        "Server warning: Batch for [ks.t] is of size 6.1KiB"
    ]


def test_the_loads_batch_rows_default_to_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # One default (CQRS_SCYLLA_REPLICA_BATCH_ROWS): the flow's parameter, the load's config
    # and load_snapshot leave it unset unless given, so the environment decides.
    from tasks.adapters.scylla import ScyllaWriter
    from tasks.backfill.chunk_load import LoadConfig, open_chunk_writer
    from tasks.backfill.params import BackfillParams
    from tasks.settings import ScyllaSettings

    monkeypatch.setenv("CQRS_SCYLLA_REPLICA_BATCH_ROWS", "37")
    settings = ScyllaSettings()
    assert BackfillParams.model_validate({}).write_batch_rows is None
    config = LoadConfig("cql", "ks", settings)
    assert config.replica_batch_rows is None
    built: list[ScyllaWriter] = []

    def pipelined(writer: ScyllaWriter) -> ScyllaWriter:
        built.append(writer)
        return writer

    monkeypatch.setattr("tasks.backfill.chunk_load.PipelinedWriter", pipelined)
    open_chunk_writer(config, object(), None, [])  # type: ignore[arg-type]
    assert [w.replica_batch_rows for w in built] == [37]
    given = LoadConfig("cql", "ks", settings, replica_batch_rows=5)
    open_chunk_writer(given, object(), None, [])  # type: ignore[arg-type]
    assert built[-1].replica_batch_rows == 5
