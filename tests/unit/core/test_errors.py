"""How foreign exceptions are classified (tasks.core.errors.classify), one test per class, and that
the Scylla writer raises what the classification says: a schema mistake stops, an outage is
retried, a bad value is set aside."""

from __future__ import annotations

import pickle
import struct
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import cassandra
import httpx
import psycopg
import psycopg.errors
import pytest
from cassandra import ConsistencyLevel, protocol
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionShutdown
from cassandra.query import BatchStatement, BoundStatement, PreparedStatement
from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_none

from tasks.core.errors import (
    CqrsSyncError,
    DecodeError,
    InvalidInput,
    RejectedData,
    ServiceUnavailable,
    TerminalError,
    TransientError,
    classify,
    is_transient,
    retry_if_transient,
)
from tasks.core.projection import Upsert

TRANSIENT: list[BaseException] = [
    NoHostAvailable("Unable to connect", {"127.0.0.1:9042": ConnectionRefusedError(111, "no")}),
    NoHostAvailable("Unable to complete the operation against any hosts", {}),
    cassandra.OperationTimedOut("timed out"),
    cassandra.WriteTimeout(
        "write timeout",
        consistency=ConsistencyLevel.LOCAL_QUORUM,
        required_responses=2,
        received_responses=1,
        write_type=1,
    ),
    cassandra.ReadTimeout("read timeout"),
    cassandra.Unavailable("not enough replicas"),
    cassandra.WriteFailure("replica failed"),
    protocol.OverloadedErrorMessage(0x1001, "overloaded", None),
    protocol.IsBootstrappingErrorMessage(0x1002, "bootstrapping", None),
    ConnectionShutdown("connection to 127.0.0.1 was closed"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    OSError(28, "No space left on device"),
    psycopg.OperationalError("connection failed: Connection refused"),
    psycopg.errors.lookup("40001")("could not serialize access"),
    psycopg.errors.lookup("40P01")("deadlock detected"),
    psycopg.errors.lookup("57P01")("terminating connection due to administrator command"),
    psycopg.errors.lookup("57P03")("the database system is starting up"),
    psycopg.errors.lookup("53300")("too many connections"),
    KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down")),
    KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down")),
    KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out")),
    KafkaException(KafkaError(KafkaError.NOT_COORDINATOR, "retry", retriable=True)),
    httpx.ConnectError("connection refused"),
    httpx.ReadTimeout("read timed out"),
    httpx.HTTPStatusError(
        "503", request=httpx.Request("GET", "http://x"), response=httpx.Response(503)
    ),
]

REJECTED: list[BaseException] = [
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    struct.error("required argument is not an integer"),
    cassandra.InvalidRequest(
        'Error from server: code=2200 [Invalid query] message="Key '
        'length of 70000 is longer than maximum of 65535"'
    ),
    cassandra.InvalidRequest(
        'Error from server: code=2200 [Invalid query] message="Batch too large"'
    ),
    psycopg.errors.lookup("22001")("value too long for type character varying(10)"),
    psycopg.errors.lookup("23505")("duplicate key value violates unique constraint"),
    psycopg.errors.lookup("23514")("new row violates check constraint"),
    KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "message too large")),
]

TERMINAL: list[BaseException] = [
    cassandra.InvalidRequest(
        "Error from server: code=2200 [Invalid query] message="
        '"unconfigured table conversation_timelinez"'
    ),
    cassandra.InvalidRequest(
        'Error from server: code=2200 [Invalid query] message="Keyspace nope does not exist"'
    ),
    cassandra.Unauthorized("User cqrs has no MODIFY permission"),
    cassandra.AuthenticationFailed("Failed to authenticate: bad credentials"),
    protocol.SyntaxException(0x2000, "line 1:0 no viable alternative", None),
    cassandra.ConfigurationException("bad table option"),
    cassandra.AlreadyExists(keyspace="cqrs", table="t"),
    protocol.ServerError(0x0000, "java.lang.AssertionError", None),
    NoHostAvailable(
        "Unable to connect",
        {
            "127.0.0.1:9042": cassandra.AuthenticationFailed(
                "Failed to authenticate: bad credentials"
            )
        },
    ),
    psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "cqrs_app"'
    ),
    psycopg.errors.lookup("28P01")("password authentication failed"),
    psycopg.errors.lookup("42501")("permission denied for table sessions"),
    psycopg.errors.lookup("42P01")('relation "sessionz" does not exist'),
    psycopg.ProgrammingError("syntax error"),
    KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "unknown topic", retriable=True)),
    KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "unknown topic")),
    KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized")),
    KafkaException(KafkaError(KafkaError._FATAL, "fatal", fatal=True)),
    httpx.HTTPStatusError(
        "400", request=httpx.Request("GET", "http://x"), response=httpx.Response(400)
    ),
    FileNotFoundError(2, "No such file or directory"),
    RuntimeError("something nobody thought of"),
    KeyError("id"),
]


def _id(exc: BaseException) -> str:
    return f"{type(exc).__name__}:{str(exc)[:40]}"


@pytest.mark.parametrize("exc", TRANSIENT, ids=_id)
def test_transient(exc: BaseException) -> None:
    err = classify(exc, "Scylla write of 20 mutations")
    assert isinstance(err, TransientError), err
    assert is_transient(exc) and is_transient(err)
    assert str(err).startswith("Scylla write of 20 mutations failed: " + type(exc).__name__)


@pytest.mark.parametrize("exc", REJECTED, ids=_id)
def test_rejected_data(exc: BaseException) -> None:
    err = classify(exc, "writing one row")
    assert isinstance(err, RejectedData), err
    assert isinstance(err, TerminalError) and not is_transient(exc)
    assert type(exc).__name__ in str(err)


@pytest.mark.parametrize("exc", TERMINAL, ids=_id)
def test_terminal(exc: BaseException) -> None:
    err = classify(exc, "Scylla write of 20 mutations")
    assert isinstance(err, TerminalError) and not isinstance(err, RejectedData), err
    assert not is_transient(exc)
    assert "Scylla write of 20 mutations" in str(err) and type(exc).__name__ in str(err)


def test_the_message_names_the_cause() -> None:
    err = classify(TERMINAL[0], "Scylla write of 3 mutations")
    assert "unconfigured table conversation_timelinez" in str(err)


def test_our_own_errors_pass_through() -> None:
    for exc in (
        ServiceUnavailable("Kafka", "down"),
        InvalidInput("bad"),
        DecodeError("x"),
        RejectedData("y", index=3),
    ):
        assert classify(exc, "anything") is exc
    assert is_transient(ServiceUnavailable("Kafka", "down"))
    assert not is_transient(InvalidInput("bad"))


def test_decode_error_is_rejected_data_and_rejected_data_pickles() -> None:
    assert issubclass(DecodeError, RejectedData) and issubclass(RejectedData, TerminalError)
    back = pickle.loads(pickle.dumps(RejectedData("bad value", index=7)))
    assert isinstance(back, RejectedData) and back.index == 7 and str(back) == "bad value"


def test_prefect_retry_condition_and_tenacity_share_is_transient() -> None:
    class State:
        def __init__(self, exc: BaseException | None) -> None:
            self.exc = exc

        def result(self) -> None:
            if self.exc:
                raise self.exc

    assert retry_if_transient(None, None, State(cassandra.OperationTimedOut("slow")))
    assert not retry_if_transient(
        None, None, State(cassandra.InvalidRequest("unconfigured table x"))
    )
    assert not retry_if_transient(None, None, State(None))

    calls: list[int] = []

    @retry(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(5),
        wait=wait_none(),
        reraise=True,
    )
    def flaky(exc: Exception) -> None:
        calls.append(1)
        raise exc

    with pytest.raises(cassandra.InvalidRequest):
        flaky(cassandra.InvalidRequest("unconfigured table x"))
    assert len(calls) == 1  # never retried
    with pytest.raises(cassandra.OperationTimedOut):
        flaky(cassandra.OperationTimedOut("slow"))
    assert len(calls) == 6


# --------------------------------------------------------------------------------------------
# The Scylla writer, on a fake session: what it raises, and the statements it sends.


class FakeCluster:
    class metadata:  # the driver's attribute name
        keyspaces: ClassVar[dict[str, object]] = {}  # no schema: sized without a plan

        @staticmethod
        def all_hosts() -> list[object]:
            return [object()]


class FakeSession:
    """Prepares real PreparedStatements (text columns only) and fails ``execute`` with
    ``error``; records what it was asked to execute."""

    cluster = FakeCluster()

    def __init__(
        self, error: BaseException | None = None, prepare_error: BaseException | None = None
    ) -> None:
        self.error, self.prepare_error = error, prepare_error
        self.executed: list[Any] = []

    def prepare(self, cql: str) -> PreparedStatement:
        if self.prepare_error:
            raise self.prepare_error
        from cassandra.cqltypes import DateType, Int32Type, LongType, UTF8Type, UUIDType

        # conversation_timeline's INSERT: the only statement these tests write.
        types = [UUIDType, DateType, Int32Type, UUIDType, UTF8Type, UTF8Type, UTF8Type, LongType]
        assert cql.count("?") == len(types), cql
        cols = [protocol.ColumnMetadata("ks", "t", f"c{i}", t) for i, t in enumerate(types)]
        return PreparedStatement(cols, b"id", [0], cql, "ks", 4, None, None)

    def execute(self, statement: Any, *args: Any, **kw: Any) -> None:
        self.executed.append(statement)
        if self.error:
            raise self.error

    def execute_async(self, statement: Any, *args: Any, **kw: Any) -> Any:
        self.executed.append(statement)
        session = self

        class F:
            """Enough of a ResponseFuture for the writer."""

            has_more_pages = False
            _col_names = _col_types = _paging_state = None

            def result(self) -> list[Any]:
                if session.error:
                    raise session.error
                return []

            def add_callbacks(
                self, callback: Any, errback: Any, callback_args: Any = (), errback_args: Any = ()
            ) -> None:
                if session.error:
                    errback(session.error, *errback_args)
                else:
                    callback([], *callback_args)

            def clear_callbacks(self) -> None:
                pass

        return F()


def _turn(content: str) -> Upsert:
    sid = uuid.uuid4()
    now = datetime.now(UTC)
    return Upsert(
        "conversation_timeline",
        (
            ("session_id", sid),
            ("created_at", now),
            ("created_at_micros", 0),
            ("turn_id", uuid.uuid4()),
        ),
        (("role", "user"), ("content", content), ("model", "")),
        1,
    )


def _writer(session: FakeSession, **kw: Any) -> Any:
    from tasks.adapters.scylla import ScyllaWriter
    from tasks.settings import ScyllaSettings

    return ScyllaWriter(session, ScyllaSettings(), keyspace="ks", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["write", "write_batch"])
def test_writer_schema_mistake_is_terminal_not_transient(method: str) -> None:
    error = cassandra.InvalidRequest(
        "Error from server: code=2200 [Invalid query] "
        'message="unconfigured table conversation_timeline"'
    )
    writer = _writer(FakeSession(error=error))
    with pytest.raises(TerminalError, match="unconfigured table conversation_timeline") as info:
        getattr(writer, method)([_turn("a"), _turn("b")])
    assert not is_transient(info.value) and not isinstance(info.value, RejectedData)
    # The same mistake when preparing.
    writer = _writer(FakeSession(prepare_error=error))
    with pytest.raises(TerminalError, match="unconfigured table"):
        getattr(writer, method)([_turn("a")])


@pytest.mark.parametrize("method", ["write", "write_batch"])
def test_writer_outage_is_transient(method: str) -> None:
    writer = _writer(FakeSession(error=NoHostAvailable("no hosts", {})))
    with pytest.raises(TransientError, match="NoHostAvailable"):
        getattr(writer, method)([_turn("a"), _turn("b")])


@pytest.mark.parametrize("method", ["write", "write_batch"])
@pytest.mark.parametrize("timeout", [None, 0.05])
def test_writer_unencodable_value_is_rejected_data(method: str, timeout: float | None) -> None:
    session = FakeSession()
    writer = _writer(session)
    with pytest.raises(RejectedData, match="UnicodeEncodeError") as info:
        getattr(writer, method)([_turn("fine"), _turn("lone \ud800 surrogate")], timeout)
    assert info.value.index == 1
    assert not session.executed  # nothing half-sent


def test_a_row_over_the_byte_limit_goes_as_a_plain_statement() -> None:
    session = FakeSession()
    writer = _writer(session, replica_batch_rows=20, batch_max_bytes=4000)
    big = _turn("x" * (1 << 20))
    statements = writer.bound([_turn("a"), _turn("b"), big, _turn("c"), _turn("d")])
    requests = writer.requests(statements)
    plain = [r for r in requests if isinstance(r, BoundStatement)]
    assert len(requests) == 3 and len(plain) == 1 and len(plain[0].values[5]) == 1 << 20
    assert all(
        len(r._statements_and_parameters) <= 20 for r in requests if isinstance(r, BatchStatement)
    )
    writer.write_batch([big])
    assert isinstance(session.executed[-1], BoundStatement)


def _sent(session: FakeSession) -> Sequence[Any]:
    return session.executed


def test_write_consistency_and_idempotence_reach_every_statement() -> None:
    from tasks.settings import ScyllaSettings

    cfg = ScyllaSettings(write_consistency="EACH_QUORUM")
    assert cfg.write_consistency_level == ConsistencyLevel.EACH_QUORUM
    session = FakeSession()
    writer = _writer(session, consistency=cfg.write_consistency_level)
    writer.write_batch([_turn("a"), _turn("b")])
    writer.write_batch([_turn("a")])
    writer.write([_turn("a"), _turn("b")], timeout=1.0)
    prepared = writer.prepare(writer.bound([_turn("a")])[0][0].query_string)
    assert prepared.consistency_level == ConsistencyLevel.EACH_QUORUM and prepared.is_idempotent
    for stmt in _sent(session):
        assert stmt.consistency_level == ConsistencyLevel.EACH_QUORUM, stmt
        assert stmt.is_idempotent, stmt
    batches = writer.requests(writer.bound([_turn("a"), _turn("b"), _turn("c")]))
    for b in batches:
        assert b.consistency_level == ConsistencyLevel.EACH_QUORUM and b.is_idempotent


def test_default_consistency_is_local_quorum_for_writes_and_reads() -> None:
    from tasks.adapters.scylla import execution_profile
    from tasks.settings import ScyllaSettings

    cfg = ScyllaSettings()
    assert cfg.write_consistency_level == ConsistencyLevel.LOCAL_QUORUM
    assert cfg.read_consistency_level == ConsistencyLevel.LOCAL_QUORUM
    assert execution_profile(cfg).consistency_level == ConsistencyLevel.LOCAL_QUORUM
    assert (
        execution_profile(ScyllaSettings(read_consistency="one")).consistency_level
        == ConsistencyLevel.ONE
    )
    writer = _writer(FakeSession())
    assert writer.consistency == ConsistencyLevel.LOCAL_QUORUM


@pytest.mark.parametrize(
    "field,value",
    [
        ("write_consistency", "QUORUMS"),
        ("write_consistency", "SERIAL"),
        ("read_consistency", "ANY"),
        ("read_consistency", "LOCAL_SERIAL"),
    ],
)
def test_consistency_settings_are_validated(field: str, value: str) -> None:
    from tasks.settings import ScyllaSettings

    with pytest.raises(ValidationError):
        ScyllaSettings.model_validate({field: value})


def test_classify_is_total() -> None:
    # Whatever it is given, it answers with one of ours.
    for exc in (*TRANSIENT, *REJECTED, *TERMINAL, KeyboardInterrupt(), ValueError("x")):
        assert isinstance(classify(exc, "x"), CqrsSyncError)
