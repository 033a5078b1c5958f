"""Scylla/Cassandra adapter: the session factory, the read-model migration runner, and the
writer that applies projected mutations with prepared statements, concurrently, each with its
own ``USING TIMESTAMP``.

The same code serves ScyllaDB in production (scylla-driver is shard-aware there) and Apache
Cassandra 5.0 locally and in tests."""

from __future__ import annotations

import hashlib
import re
import ssl
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    ResponseFuture,
    ResultSet,
    Session,
)
from cassandra.metadata import TableMetadata
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)
from cassandra.query import (
    BatchStatement,
    BatchType,
    BoundStatement,
    PreparedStatement,
    Statement,
)

from tasks.adapters.cql_binary import bind_row
from tasks.adapters.replica_batches import (
    bound_bytes,
    drop_replica_batch_warnings,
    replica_batches,
    size_plan,
)
from tasks.core.cql import is_cql_identifier, to_cql
from tasks.core.errors import (
    ConfigurationError,
    RejectedData,
    ServiceUnavailable,
    TransientError,
    classify,
)
from tasks.core.projection import Mutation
from tasks.settings import ScyllaSettings

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "scylla"
# Python's ssl words for a node's certificate that does not verify or match its address.
_TLS_FAILURE: Final = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|mismatch, certificate is not valid"
    r"|WRONG_VERSION_NUMBER"
)


def execution_profile(cfg: ScyllaSettings) -> ExecutionProfile:
    """The session's default profile: token-aware routing in the local DC, and the read
    consistency level (``read_consistency``) for every statement that does not set its own;
    the writer's prepared statements and batches carry ``write_consistency`` themselves."""
    return ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=cfg.local_dc)),
        request_timeout=cfg.request_timeout_s,
        consistency_level=cfg.read_consistency_level,
    )


def ssl_context(settings: ScyllaSettings) -> ssl.SSLContext | None:
    """The TLS context of every connection to the nodes, or None without TLS
    (docs/security.md, "Transport"). It verifies the node's certificate always, and its
    address against the certificate when ``ssl_check_hostname`` (the driver then passes the
    node's address as the server name: the nodes' certificates need it as an IP SAN)."""
    cfg = settings
    if not cfg.ssl:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = cfg.ssl_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if cfg.ssl_ca_file:
            context.load_verify_locations(cafile=cfg.ssl_ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if cfg.ssl_certfile:
            context.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        # The paths are configuration, not secrets: name them.
        files = [f for f in (cfg.ssl_ca_file, cfg.ssl_certfile, cfg.ssl_keyfile) if f]
        raise ConfigurationError(f"Scylla TLS files {files} cannot be used: {exc}") from exc
    return context


def cluster_kwargs(settings: ScyllaSettings) -> dict[str, Any]:
    """Everything ``Cluster`` is built with, transport and authentication included; kept
    apart from ``connect`` so that a test sees them without a cluster."""
    cfg = settings
    auth = (
        PlainTextAuthProvider(cfg.username, cfg.password.get_secret_value())
        if cfg.username and cfg.password
        else None
    )
    return {
        "contact_points": cfg.contact_points,
        "port": cfg.port,
        "auth_provider": auth,
        "ssl_context": ssl_context(cfg),
        "execution_profiles": {EXEC_PROFILE_DEFAULT: execution_profile(cfg)},
        "protocol_version": 4,
        "connect_timeout": 5,
        # The driver's default backs off to 10 minutes: after an outage the consumer and the
        # dual-writes kept failing ~40 s after Cassandra was back (fault suite, 60 s outage),
        # and would for minutes after a long one. Retry a node every 1 s up to every 10 s.
        "reconnection_policy": ExponentialReconnectionPolicy(base_delay=1.0, max_delay=10.0),
    }


def connect(settings: ScyllaSettings, keyspace: str | None = None) -> Session:
    """A connected session (``keyspace`` its default keyspace, if given). Prefer ``session``,
    which also shuts it down."""
    cfg = settings
    cluster = Cluster(**cluster_kwargs(cfg))
    try:
        return cluster.connect(keyspace)
    except Exception as exc:
        cluster.shutdown()
        where = f"connecting to Scylla at {cfg.contact_points}:{cfg.port}"
        if cfg.ssl and _TLS_FAILURE.search(str(exc)):
            # A node whose certificate does not verify: configuration, which no retry fixes
            # (docs/security.md, "Transport").
            raise ConfigurationError(
                f"{where} with TLS (ssl_ca_file={cfg.ssl_ca_file}, "
                f"ssl_check_hostname={cfg.ssl_check_hostname}): {exc}"
            ) from exc
        error = classify(exc, where)
        if isinstance(error, TransientError):
            raise ServiceUnavailable("Scylla", f"{cfg.contact_points}:{cfg.port}: {exc}") from exc
        raise error from exc  # bad credentials, a keyspace that does not exist...


def execute_windowed(
    session: Session,
    requests: Iterable[tuple[Statement | str, Sequence[Any]]],
    concurrency: int,
    execution_profile: object = EXEC_PROFILE_DEFAULT,
) -> Iterator[ResultSet]:
    """Each request's result, in order, with at most ``concurrency`` in flight; raises the
    first failure met in that order (requests still in flight then finish on their own).

    Every request is bounded by its profile's ``request_timeout``. The driver's own
    ``execute_concurrent`` sends with ``timeout=None``: a response that never comes (a node
    that stalls, a lost frame) then blocks its caller for ever, without a log line, which is
    how a CDC consumer once stopped committing (docs/decisions.md, "Every Scylla request has a
    deadline")."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    inflight: deque[ResponseFuture] = deque()
    for statement, params in requests:
        if len(inflight) >= concurrency:
            yield inflight.popleft().result()
        inflight.append(
            session.execute_async(statement, params or None, execution_profile=execution_profile)
        )
    while inflight:
        yield inflight.popleft().result()


def close(session: Session) -> None:
    session.cluster.shutdown()


@contextmanager
def session(settings: ScyllaSettings, keyspace: str | None = None) -> Iterator[Session]:
    """A connected session, shut down on leaving: ``with scylla.session(cfg.scylla) as s:``."""
    s = connect(settings, keyspace)
    try:
        yield s
    finally:
        close(s)


def _statements(cql: str) -> list[str]:
    without_comments = re.sub(r"--[^\n]*", "", cql)
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def migrate(session: Session, settings: ScyllaSettings) -> list[str]:
    """Create the keyspace ``settings.keyspace`` and apply the read-model CQL files not applied
    yet; records them in ``<keyspace>.schema_migrations``. Returns the versions applied now."""
    cfg = settings
    if not is_cql_identifier(cfg.keyspace):
        raise ConfigurationError(f"invalid keyspace name {cfg.keyspace!r}")
    try:
        return _migrate(session, cfg)
    except Exception as exc:
        raise classify(exc, f"Scylla migration of keyspace {cfg.keyspace}") from exc


def _migrate(session: Session, cfg: ScyllaSettings) -> list[str]:
    replication = ", ".join(
        f"'{k}': " + (f"'{v}'" if isinstance(v, str) else str(v))
        for k, v in cfg.replication.items()
    )
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {cfg.keyspace} WITH replication = {{{replication}}}"
    )
    session.set_keyspace(cfg.keyspace)
    session.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version text PRIMARY KEY, checksum text, applied_at timestamp)"
    )
    done = {r.version: r.checksum for r in session.execute("SELECT * FROM schema_migrations")}
    applied: list[str] = []
    for path in sorted(SCHEMA_DIR.glob("*.cql")):
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.stem in done:
            if done[path.stem] != checksum:
                raise ConfigurationError(
                    f"{path.name} changed after it was applied; add a new "
                    f"file instead of editing an applied one"
                )
            continue
        for statement in _statements(path.read_text()):
            session.execute(statement, timeout=60)
        session.execute(
            "INSERT INTO schema_migrations (version, checksum, applied_at) "
            "VALUES (%s, %s, toTimestamp(now()))",
            (path.stem, checksum),
        )
        applied.append(path.stem)
    return applied


class ScyllaWriter:
    """Applies mutations with prepared statements (cached by statement text) and bounded
    concurrency. Every statement carries its own USING TIMESTAMP, so the order in which the
    writes land does not matter, and replaying one is harmless: every statement and batch
    is marked idempotent (the driver may then retry or speculatively re-send it) and sent at
    the write consistency level (``consistency``, default: the settings' ``write_consistency``).
    Every keyword left None takes its value from ``settings``.

    Errors: ``TransientError`` when the cluster is down, slow or overloaded (retry the
    call); ``RejectedData`` when a mutation cannot be bound or serialized (its ``index`` in
    the call's sequence when known) or the store refuses a value; ``TerminalError`` for
    schema or permission problems (an unconfigured table...)."""

    def __init__(
        self,
        session: Session,
        settings: ScyllaSettings,
        *,
        keyspace: str | None = None,
        concurrency: int | None = None,
        replica_batch_rows: int | None = None,
        batch_max_bytes: int | None = None,
        consistency: int | None = None,
    ) -> None:
        cfg = settings
        self.session = session
        self.keyspace = keyspace or cfg.keyspace
        self.concurrency = concurrency or cfg.concurrency
        self.replica_batch_rows = replica_batch_rows or cfg.replica_batch_rows
        self.batch_max_bytes = batch_max_bytes or cfg.batch_max_bytes
        self.consistency = cfg.write_consistency_level if consistency is None else consistency
        if self.replica_batch_rows < 1 or self.batch_max_bytes < 1:
            raise ConfigurationError("batch limits must be >= 1")
        if self.replica_batch_rows > 1:
            drop_replica_batch_warnings()
        self._prepared: dict[str, PreparedStatement] = {}
        self._size_plans: dict[PreparedStatement, tuple[int, ...]] = {}

    def prepare(self, cql: str) -> PreparedStatement:
        stmt = self._prepared.get(cql)
        if stmt is None:
            try:
                stmt = self.session.prepare(cql)
            except Exception as exc:
                raise classify(exc, f"preparing {cql.split(' (', 1)[0]}") from exc
            # Bound statements inherit both from their prepared statement.
            stmt.consistency_level = self.consistency
            stmt.is_idempotent = True
            self._prepared[cql] = stmt
        return stmt

    def bound(self, mutations: Iterable[Mutation]) -> list[tuple[PreparedStatement, Sequence[Any]]]:
        out: list[tuple[PreparedStatement, Sequence[Any]]] = []
        for m in mutations:
            cql, params = to_cql(m, self.keyspace)
            out.append((self.prepare(cql), params))
        return out

    def _batch(self) -> BatchStatement:
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.consistency)
        batch.is_idempotent = True
        return batch

    def write_batch(self, mutations: Sequence[Mutation], timeout: float | None = None) -> int:
        """Write a few mutations as ONE unlogged batch: one request and one round trip
        instead of one per mutation (docs/decisions.md). Unlogged: no batchlog, so it is not
        atomic across partitions, and it needs not be: each statement keeps its own USING
        TIMESTAMP and replaying any subset converges. Meant for small sets (Cassandra warns
        above 5 KiB of mutation data per batch and fails above 50 KiB); callers check
        ``batch_bytes`` first. One mutation goes as a plain statement (a batch of one only
        adds the batch's cost). Without ``timeout`` the profile's ``request_timeout`` bounds
        it."""
        if not mutations:
            return 0
        try:
            statements = self.bound(mutations)
        except Exception as exc:
            raise classify(exc, f"Scylla batch of {len(mutations)} mutations") from exc
        return self.send_batch(statements, timeout)

    def send_batch(
        self, statements: Sequence[tuple[PreparedStatement, Sequence[Any]]], timeout: float | None
    ) -> int:
        """``write_batch`` of statements already prepared and paired with their values
        (``bound`` or ``prepared_statements``)."""
        if not statements:
            return 0
        try:
            request = self._request_of(statements)
            # The driver reads timeout=None as "no deadline": leave it unset then.
            if timeout is None:
                self.session.execute(request)
            else:
                self.session.execute(request, timeout=timeout)
        except Exception as exc:
            raise classify(exc, f"Scylla batch of {len(statements)} mutations") from exc
        return len(statements)

    def batch_request(self, mutations: Sequence[Mutation]) -> BoundStatement | BatchStatement:
        """What ``write_batch`` sends for ``mutations``: one bound statement, or one unlogged
        batch of them (RejectedData if one cannot be bound)."""
        return self._request_of(self.bound(mutations))

    def _request_of(
        self, statements: Sequence[tuple[PreparedStatement, Sequence[Any]]]
    ) -> BoundStatement | BatchStatement:
        if len(statements) == 1:
            return _bind(*statements[0], 0)
        request = self._batch()
        for i, (stmt, params) in enumerate(statements):
            request.add(_bind(stmt, params, i))
        return request

    def prepared_statements(
        self, mutations: Iterable[Mutation]
    ) -> list[tuple[PreparedStatement, Sequence[Any]]] | None:
        """``bound(mutations)`` when every statement is prepared already, else None: preparing
        is a round trip that blocks its caller for up to the session's default timeout."""
        out: list[tuple[PreparedStatement, Sequence[Any]]] = []
        for m in mutations:
            cql, params = to_cql(m, self.keyspace)
            stmt = self._prepared.get(cql)
            if stmt is None:
                return None
            out.append((stmt, params))
        return out

    def connections_open(self) -> bool:
        """Whether the session has connections and none of them is closed or defunct. The
        driver borrows a connection inside ``execute_async``, on the caller's thread, and when
        the one it picks is closed it waits up to 2 s (hard-coded) for another: with every
        connection open, sending does not wait (docs/decisions.md, "The dual-write sends on
        the caller's thread while the pool is healthy")."""
        pools = list(getattr(self.session, "_pools", {}).values())
        if not pools:
            return False
        for pool in pools:
            conns = list(getattr(pool, "_connections", {}).values())
            if getattr(pool, "is_shutdown", True) or not conns:
                return False
            if any(c.is_closed or c.is_defunct for c in conns):
                return False
        return True

    def requests(
        self, statements: Sequence[tuple[PreparedStatement, Sequence[Any]]]
    ) -> list[BoundStatement | BatchStatement]:
        """The statements as requests: UNLOGGED batches of up to ``replica_batch_rows`` rows
        that live on the same replicas, the way cqlsh COPY and DSBulk load. One request per
        ~20 rows instead of one per row cuts the driver's and the store's per-request work,
        which dominated CDC's CPU with one request per row (docs/decisions.md). A batch
        never leaves its replica set, so the coordinator fans out no more than single writes
        would; each statement keeps its own USING TIMESTAMP, so batching changes nothing in
        what wins. A batch holds at most
        ``batch_max_bytes`` as the server counts them (see ``bound_bytes``); a statement
        alone in its group, e.g. a row larger than that, goes as a plain statement, never as
        a batch of one (Cassandra refuses batches over 50 KiB, however many rows)."""
        return self._grouped(
            [_bind(stmt, params, i) for i, (stmt, params) in enumerate(statements)]
        )

    def requests_of_values(
        self, prepared: PreparedStatement, rows: Sequence[Sequence[bytes | None]]
    ) -> list[BoundStatement | BatchStatement]:
        """``requests`` for rows whose values are already in CQL's binary format, as
        ``prepared.bind`` would give them (tasks/adapters/cql_binary.py): the bound statements
        are made without the driver's per-value ``serialize`` (docs/decisions.md, "The cql
        load binds columns, not values")."""
        bounds: list[BoundStatement] = []
        for values in rows:
            bound = BoundStatement(prepared)
            bound.values = list(values)
            bound.raw_values = values  # what its repr shows
            bounds.append(bound)
        return self._grouped(bounds)

    def _grouped(self, bounds: list[BoundStatement]) -> list[BoundStatement | BatchStatement]:
        if self.replica_batch_rows == 1 or len(bounds) <= 1:
            return list(bounds)
        metadata = self.session.cluster.metadata
        # One host: one replica set, nothing to look up (the lookup is costly per row).
        single = len(metadata.all_hosts()) <= 1
        members: list[tuple[tuple[int, ...], bytes, int, BoundStatement]] = []
        for bound in bounds:
            key: bytes = b""
            replicas: tuple[int, ...] = ()
            if not single:
                key = bound.routing_key or b""
                # Host objects live as long as the cluster: their ids name a replica set.
                replicas = tuple(sorted(map(id, metadata.get_replicas(self.keyspace, key))))
            plan = self._size_plan(bound.prepared_statement)
            members.append((replicas, key, bound_bytes(bound.values, plan), bound))
        out: list[BoundStatement | BatchStatement] = []
        for group in replica_batches(members, self.replica_batch_rows, self.batch_max_bytes):
            if len(group) == 1:
                out.append(group[0])
                continue
            batch = self._batch()
            for bound in group:
                batch.add(bound)
            out.append(batch)
        return out

    def _size_plan(self, prepared: PreparedStatement) -> tuple[int, ...] | None:
        """``size_plan`` of ``prepared`` from the cluster's schema metadata, once per
        statement; None (every value counted as a cell) while the metadata does not say."""
        try:
            return self._size_plans[prepared]
        except KeyError:
            pass
        columns = prepared.column_metadata or []
        if not columns or not prepared.routing_key_indexes:
            return None
        keyspace = self.session.cluster.metadata.keyspaces.get(columns[0].keyspace_name)
        table = keyspace.tables.get(columns[0].table_name) if keyspace else None
        if not isinstance(table, TableMetadata):
            return None  # not cached: a table created a moment ago may be in it soon
        plan = size_plan(
            [c.name for c in columns],
            prepared.routing_key_indexes,
            {c.name for c in table.clustering_key},
        )
        self._size_plans[prepared] = plan
        return plan

    def write(self, mutations: Sequence[Mutation], timeout: float | None = None) -> int:
        """Write all mutations (in replica-set batches, see ``requests``, each bounded by
        the profile's ``request_timeout``; with ``timeout``, one request per mutation, each
        bounded by it). Raises TransientError if the cluster
        failed any of them (the caller retries the whole call: the writes are idempotent),
        RejectedData or TerminalError as the class says. Every mutation is bound before any
        is sent, so a RejectedData means nothing of this call was sent."""
        if not mutations:
            return 0
        what = f"Scylla write of {len(mutations)} mutations"
        try:
            statements = self.bound(mutations)
            if timeout is not None:
                requests: list[BoundStatement | BatchStatement] = [
                    _bind(s, p, i) for i, (s, p) in enumerate(statements)
                ]
                futures = [self.session.execute_async(r, timeout=timeout) for r in requests]
                for f in futures:
                    f.result()
                return len(statements)
            for _ in execute_windowed(
                self.session, ((r, ()) for r in self.requests(statements)), self.concurrency
            ):
                pass
        except Exception as exc:
            raise classify(exc, what) from exc
        return len(statements)


# What the driver raises when a value does not fit its column's type: str that is not valid
# UTF-8 (a lone surrogate), an int out of range, a wrong type...
_BIND_ERRORS: Final = (UnicodeError, struct.error, TypeError, ValueError, OverflowError)


def _bind(prepared: PreparedStatement, params: Sequence[Any], index: int) -> BoundStatement:
    """``prepared.bind(params)`` (as ``bind_row`` computes it), or RejectedData naming the
    table and column (not the value, which may be private) and the statement's ``index``."""
    try:
        return bind_row(prepared, params)
    except _BIND_ERRORS as exc:
        column = "?"
        for spec, value in zip(prepared.column_metadata, params, strict=False):
            if value is None:
                continue
            try:
                spec.type.serialize(value, prepared.protocol_version)
            except _BIND_ERRORS:
                column = spec.name
                break
        table = (
            f"{prepared.column_metadata[0].keyspace_name}.{prepared.column_metadata[0].table_name}"
            if prepared.column_metadata
            else "?"
        )
        raise RejectedData(
            f"mutation {index} cannot be written to {table}: column {column}: "
            f"{type(exc).__name__}: {exc}",
            index=index,
        ) from exc
