"""Writes grouped into UNLOGGED batches that stay on one replica set, and sized as the server
counts them: the way cqlsh COPY and DSBulk load (docs/decisions.md, "Scylla writes in
replica-set batches"). Pure, but for the filter of the driver's log line that such batches
cause."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final, TypeVar

from tasks.core.projection import Mutation, Upsert

T = TypeVar("T")


def replica_batches(
    members: Iterable[tuple[tuple[int, ...], bytes, int, T]], max_rows: int, max_bytes: int
) -> list[list[T]]:
    """Group (replica set, partition key, size, item) into batches: one replica set per
    batch, a partition's items side by side, at most ``max_rows`` items and ``max_bytes``
    (an item larger than that goes alone). Every item lands in exactly one batch."""
    groups: dict[tuple[int, ...], list[tuple[bytes, int, T]]] = {}
    for replicas, key, nbytes, item in members:
        groups.setdefault(replicas, []).append((key, nbytes, item))
    out: list[list[T]] = []
    for group in groups.values():
        group.sort(key=lambda m: m[0])  # stable: a partition's items keep their order
        batch: list[T] = []
        size = 0
        for _key, nbytes, item in group:
            if batch and (len(batch) >= max_rows or size + nbytes > max_bytes):
                out.append(batch)
                batch, size = [], 0
            batch.append(item)
            size += nbytes
        if batch:
            out.append(batch)
    return out


# What Cassandra counts against batch_size_warn_threshold (5 KiB) and
# batch_size_fail_threshold (50 KiB): the sum of its mutations' data sizes
# (IMutation.dataSize, PartitionUpdate.dataSize), i.e. per cell its value plus timestamp (8),
# TTL (4) and local deletion time (4, or 8 in Cassandra 5); per row its clustering values,
# liveness info (8, 16 with a TTL) and deletion time (12, 16); per partition its deletion
# time. It checks only batches that touch more than one partition, and does not count the
# partition key. The estimates below are upper bounds of that. With a statement's size plan
# (``size_plan``) they count what the server counts: regular cells with their overhead,
# clustering values alone, neither the partition key nor USING TIMESTAMP; without one, every
# bound value as a cell. Either way a row's and a partition's overhead for every statement,
# ``_STATEMENT_OVERHEAD``: Cassandra 5.0 counted 50 bytes a statement beside the cells and
# clustering values, for turns and session headers alike
# (tests/integration/test_scylla_adapter.py, test_the_estimate_bounds_what_the_server_counts).
# The plan matters for small rows: a conversation_timeline row with a short message was
# counted about twice its size, so batches held half the rows the server allows, and each
# request costs the client far more than each row in it (docs/decisions.md, "Batches as full
# as the server allows").
_CELL_OVERHEAD: Final = 20
_STATEMENT_OVERHEAD: Final = 56
_FIXED_VALUE_MAX: Final = 16  # the largest fixed-size value these tables hold (uuid)
NOT_COUNTED: Final = -1


def size_plan(
    markers: Sequence[str], partition_key: Collection[int], clustering: Collection[str]
) -> tuple[int, ...]:
    """Per bind marker of a prepared statement (its column names, ``partition_key`` the
    markers' indexes of the partition key), what the server adds to a batch's size beside
    the value's bytes: ``NOT_COUNTED`` for the partition key and markers that are not
    columns (``[timestamp]``), 0 for a clustering column, ``_CELL_OVERHEAD`` for a cell."""
    return tuple(
        NOT_COUNTED
        if i in partition_key or name.startswith("[")
        else 0
        if name in clustering
        else _CELL_OVERHEAD
        for i, name in enumerate(markers)
    )


def bound_bytes(values: Sequence[Any], plan: Sequence[int] | None = None) -> int:
    """A bound statement's size in a batch, as the server counts it (an upper bound):
    ``_STATEMENT_OVERHEAD`` plus, per value, its serialized bytes and the overhead ``plan``
    gives it (``_CELL_OVERHEAD`` each without a plan)."""
    n = _STATEMENT_OVERHEAD
    if plan is None:
        for v in values:
            n += _CELL_OVERHEAD + (len(v) if type(v) is bytes else 0)
        return n
    for v, extra in zip(values, plan, strict=True):
        if extra != NOT_COUNTED:
            n += extra + (len(v) if type(v) is bytes else 0)
    return n


def approx_bytes(params: Sequence[Any]) -> int:
    """``bound_bytes`` before binding: text as UTF-8, blobs, ``_FIXED_VALUE_MAX`` for every
    other value (uuids, timestamps, counts)."""
    n = _STATEMENT_OVERHEAD
    for v in params:
        n += _CELL_OVERHEAD
        if type(v) is str:
            # isascii: O(1) in CPython; surrogatepass: sizing must not fail where binding will
            # (and report it properly)
            n += len(v) if v.isascii() else len(v.encode("utf-8", "surrogatepass"))
        elif type(v) is bytes:
            n += len(v)
        elif v is not None:
            n += _FIXED_VALUE_MAX
    return n


class _ReplicaBatchWarnings(logging.Filter):
    """Drops the driver's log line for Cassandra's "Unlogged batch covering N partitions"
    warning, which the server attaches to every batch over 10 partitions: these batches
    span partitions on purpose (one replica set, like cqlsh COPY's), and one log line per
    request costs a backfill a noticeable share of its CPU under Prefect's console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "Server warning: %s"
            and isinstance(record.args, tuple)
            and str(record.args[0]).startswith("Unlogged batch covering")
        )


_DRIVER_WARNINGS: Final = logging.getLogger("cassandra.protocol")
_REPLICA_BATCH_WARNINGS: Final = _ReplicaBatchWarnings()


def drop_replica_batch_warnings() -> None:
    """Filter the driver's log of the server's warning on batches that span partitions (once:
    a logger's filters are a set)."""
    _DRIVER_WARNINGS.addFilter(_REPLICA_BATCH_WARNINGS)


def batch_bytes(mutations: Iterable[Mutation]) -> int:
    """``_approx_bytes`` of a batch of these mutations."""
    return sum(
        approx_bytes([v for _, v in (*m.key, *(m.values if isinstance(m, Upsert) else ()))])
        for m in mutations
    )
