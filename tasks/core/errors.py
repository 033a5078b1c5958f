"""Error hierarchy, and the one place that decides what a library's exception means for us.

Transient errors are worth retrying (Prefect task retries and tenacity retry only these, see
``is_transient``); terminal errors are not, and name the problem for a person to fix.
``RejectedData`` is the terminal error of one record: the others of its batch can still be
written, so a consumer sets that one aside (dead-letter topic) instead of stopping.

Adapters turn whatever the Cassandra/Scylla driver, psycopg, confluent-kafka or httpx raise
into one of these with ``raise classify(exc, "what was being done") from exc``."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError


class CqrsSyncError(Exception):
    """Base of every error this package raises on purpose."""


class TransientError(CqrsSyncError):
    """A service is down, slow or overloaded: the same call may succeed later."""


class TerminalError(CqrsSyncError):
    """Bad input, bad configuration or a broken invariant: retrying cannot help."""


class ConfigurationError(TerminalError):
    """A setting, parameter or the environment is wrong (missing slot, bad flow parameter...)."""


class ServiceUnavailable(TransientError):
    """A backing service (Postgres, Scylla, Kafka, Kafka Connect) did not answer."""

    def __init__(self, service: str, detail: str) -> None:
        super().__init__(f"{service} is unavailable: {detail}")
        self.service, self.detail = service, detail

    def __reduce__(self) -> tuple[type[ServiceUnavailable], tuple[str, str]]:
        # Pickled from a loader worker process to its parent: rebuild from both arguments.
        return type(self), (self.service, self.detail)


class RejectedData(TerminalError):
    """This one record or change cannot be written or decoded; others can. ``index``, when
    known, is the position of the offending item in the sequence the call was given."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self) -> tuple[type[RejectedData], tuple[str, int | None]]:
        return type(self), (str(self), self.index)


class DecodeError(RejectedData):
    """A change event could not be decoded or projected: it goes to the dead-letter topic."""


class InvalidInput(TerminalError):
    """Input from a caller (app code, flow parameters) is invalid; nothing was written."""


# --------------------------------------------------------------------------------------------
# Classification

# Errors about one value or statement, not about the schema or the cluster (Cassandra's and
# Scylla's InvalidRequest texts): the record is rejected, the batch's others can be written.
_REJECTED_VALUE: Final = re.compile(
    r"key length|batch too large|too large|larger than|longer than|exceed|oversized"
    r"|invalid (?:null|unset|empty)? ?value|expected \d+ or 0 byte|unable to make"
    r"|invalid utf-?8|not a valid|marshal|cannot be (?:null|empty)|invalid (?:byte|string)",
    re.IGNORECASE,
)
# psycopg connection failures that no retry fixes.
_PG_AUTH: Final = re.compile(
    r"authentication failed|no pg_hba\.conf entry|role .* does not "
    r"exist|database .* does not exist|permission denied",
    re.IGNORECASE,
)
# OSErrors about local files: a wrong path or mode, not an outage.
_LOCAL_FILE_ERRORS: Final = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
_MAX_TEXT: Final = 1000


def _message(exc: BaseException, what: str) -> str:
    text = str(exc)
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT] + "..."
    return (
        f"{what} failed: {type(exc).__name__}: {text}"
        if text
        else f"{what} failed: {type(exc).__name__}"
    )


def classify(exc: BaseException, what: str) -> CqrsSyncError:
    """What ``exc`` means: a ``TransientError`` (a service down, slow or overloaded: retry),
    a ``RejectedData`` (this record cannot be written or decoded: set it aside) or a
    ``TerminalError`` (schema, permissions, configuration, a bug, or anything not known to
    be transient: stop and tell a person). ``exc`` itself if it is already one of ours.
    The message names ``what`` was being done, the exception's class and its text; raise
    the result ``from exc``."""
    if isinstance(exc, CqrsSyncError):
        return exc
    for rule in (_cassandra_kind, _psycopg_kind, _kafka_kind, _httpx_kind, _builtin_kind):
        kind = rule(exc)
        if kind is not None:
            return kind(_message(exc, what))
    return TerminalError(_message(exc, what))


def is_transient(exc: BaseException) -> bool:
    """The one retry predicate (Prefect ``retry_condition_fn`` via ``retry_if_transient``,
    tenacity's ``retry_if_exception``): only transient errors are retried. A foreign
    exception is classified first, so a raw driver timeout is retried and a raw
    ``InvalidRequest`` is not."""
    return isinstance(classify(exc, "call"), TransientError)


def retry_if_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """``is_transient`` for a Prefect task's ``retry_condition_fn`` (task, run, state)."""
    try:
        state.result()
    except Exception as exc:  # only classified here
        return is_transient(exc)
    return False


Kind = type[CqrsSyncError]


def _cassandra_kind(exc: BaseException) -> Kind | None:
    try:
        import cassandra
        from cassandra import cluster, connection, protocol
    except ImportError:  # pragma: no cover - the driver is a dependency
        return None
    if isinstance(exc, cluster.NoHostAvailable):
        # Every host refused for a reason no retry fixes (bad credentials): terminal.
        inner = [
            classify(e, "")
            for e in (getattr(exc, "errors", None) or {}).values()
            if isinstance(e, BaseException)
        ]
        if inner and all(not isinstance(e, TransientError) for e in inner):
            return TerminalError
        return TransientError
    if isinstance(
        exc,
        (
            cassandra.OperationTimedOut,
            cassandra.Timeout,
            cassandra.Unavailable,
            cassandra.CDCWriteFailure,
            cassandra.CoordinationFailure,
            cassandra.RateLimitReached,
            connection.ConnectionException,
            connection.ConnectionBusy,
            protocol.OverloadedErrorMessage,
            protocol.IsBootstrappingErrorMessage,
            protocol.TruncateError,
            protocol.UnavailableErrorMessage,
            protocol.WriteTimeoutErrorMessage,
            protocol.ReadTimeoutErrorMessage,
        ),
    ):
        # CoordinationFailure: a replica failed the request (disk, a node going down);
        # RateLimitReached: Scylla's per-partition limit, i.e. slow down.
        return TransientError
    if isinstance(exc, (cassandra.InvalidRequest, protocol.InvalidRequestException)):
        return RejectedData if _REJECTED_VALUE.search(str(exc)) else TerminalError
    if isinstance(
        exc, (cassandra.DriverException, protocol.ErrorMessage, cluster.UserTypeDoesNotExist)
    ):
        # Unauthorized, AuthenticationFailed, SyntaxException, ConfigurationException,
        # AlreadyExists, FunctionFailure, ServerError, ProtocolException, BadCredentials,
        # UnsupportedOperation...: a person has to look.
        return TerminalError
    return None


def _psycopg_kind(exc: BaseException) -> Kind | None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(exc, psycopg.Error):
        return None
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate.startswith("28") or isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return TerminalError  # authentication or authorization
    if sqlstate in (
        "40001",
        "40P01",
        "57P01",
        "57P02",
        "57P03",
        "57014",
        "55P03",
    ) or sqlstate.startswith(("08", "53", "58")):
        # serialization failure, deadlock, admin/crash shutdown, cannot connect now, query
        # cancelled (statement timeout), lock not available, connection exceptions,
        # insufficient resources, system errors
        return TransientError
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return RejectedData
    if isinstance(exc, psycopg.OperationalError):
        # A failed connect carries no SQLSTATE: its text tells an outage from bad credentials.
        return TerminalError if _PG_AUTH.search(str(exc)) else TransientError
    if isinstance(exc, psycopg.InterfaceError) and re.search(
        r"connection .*(closed|lost)", str(exc), re.IGNORECASE
    ):
        return TransientError
    return TerminalError  # ProgrammingError, NotSupportedError, InternalError...


def _kafka_kind(exc: BaseException) -> Kind | None:
    try:
        from confluent_kafka import KafkaError, KafkaException
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(exc, KafkaException):
        return None
    err = exc.args[0] if exc.args else None
    if not isinstance(err, KafkaError):
        return TerminalError
    code = err.code()
    if code in _kafka_codes(
        "_UNKNOWN_TOPIC",
        "UNKNOWN_TOPIC_OR_PART",
        "UNKNOWN_TOPIC_ID",
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "SASL_AUTHENTICATION_FAILED",
        "_AUTHENTICATION",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        "_SSL",
        "_INVALID_ARG",
        "_UNKNOWN_PARTITION",
    ):
        return TerminalError
    if code in _kafka_codes(
        "MSG_SIZE_TOO_LARGE",
        "_MSG_SIZE_TOO_LARGE",
        "_KEY_SERIALIZATION",
        "_VALUE_SERIALIZATION",
        "INVALID_RECORD",
        "RECORD_LIST_TOO_LARGE",
    ):
        return RejectedData
    if err.fatal():
        return TerminalError
    if err.retriable() or code in _kafka_codes(
        "_TRANSPORT",
        "_ALL_BROKERS_DOWN",
        "_TIMED_OUT",
        "_MSG_TIMED_OUT",
        "_TIMED_OUT_QUEUE",
        "_QUEUE_FULL",
        "_RESOLVE",
        "_WAIT_COORD",
        "_NODE_UPDATE",
        "REQUEST_TIMED_OUT",
        "NETWORK_EXCEPTION",
        "LEADER_NOT_AVAILABLE",
        "NOT_LEADER_FOR_PARTITION",
        "COORDINATOR_NOT_AVAILABLE",
        "NOT_COORDINATOR",
        "COORDINATOR_LOAD_IN_PROGRESS",
        "REBALANCE_IN_PROGRESS",
        "_ASSIGNMENT_LOST",
        "_MAX_POLL_EXCEEDED",
        "BROKER_NOT_AVAILABLE",
        "NOT_ENOUGH_REPLICAS",
        "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        "KAFKA_STORAGE_ERROR",
        "THROTTLING_QUOTA_EXCEEDED",
    ):
        return TransientError
    return TerminalError


def _kafka_codes(*names: str) -> set[int]:
    from confluent_kafka import KafkaError

    return {getattr(KafkaError, n) for n in names if hasattr(KafkaError, n)}


def _httpx_kind(exc: BaseException) -> Kind | None:
    try:
        import httpx
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, httpx.TransportError):
        return TransientError
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return TransientError if status >= 500 or status in (408, 409, 429) else TerminalError
    return None


def _builtin_kind(exc: BaseException) -> Kind | None:
    if isinstance(exc, (UnicodeError, struct.error)):
        return RejectedData  # a value that cannot be encoded
    if isinstance(exc, _LOCAL_FILE_ERRORS):
        return TerminalError
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, socket errors, ENOSPC...
        return TransientError
    return None


def describe_invalid(exc: ValidationError, title: str) -> str:
    """A pydantic error → one line per bad parameter, each naming it and the value given."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        value = err.get("input")
        if not loc:  # a rule across parameters: the message names them
            lines.append(f"  - {msg}")
        else:
            shown = "" if isinstance(value, Mapping) else f" (got {value!r:.80})"
            lines.append(f"  - {loc}: {msg}{shown}")
    return f"{title}:\n" + "\n".join(lines)
