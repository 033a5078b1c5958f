"""Reconcile: repair the differences an audit found, safely while CDC and dual-writes run
(docs/decisions.md, "Reconcile gives a shadowed row a new version").

- Differences are read again first (their buckets re-diffed now), so nothing is repaired
  that live traffic already fixed, and what a run changes is exactly what is still wrong.
- missing or stale: the source row is read from Postgres and written through the one
  projection module with its version as USING TIMESTAMP, as CDC would: if CDC meanwhile
  writes a newer version, that one wins; an older value never does.
- extra: the row is deleted with a tombstone at its newest cell's write time, which shadows
  exactly what is there and nothing written later.
- still wrong after that (a newer tombstone or a cell written above the source version
  shadows the row): the source row gets a new version in Postgres, above the shadowing
  write (schemas/postgres/0011), and is written with it; CDC carries the same version.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

from tasks.adapters import postgres
from tasks.adapters.scylla import ScyllaWriter
from tasks.audit.diff import Difference, diff_buckets
from tasks.audit.fingerprints import TOKEN_MAX, TOKEN_MIN, shape, typed_key
from tasks.audit.scan import Buckets, ensure_profile
from tasks.core import catalog
from tasks.core.projection import Delete, Mutation, Upsert, change_from_row, project

if TYPE_CHECKING:
    from cassandra.cluster import Session
    from psycopg import Connection

    from tasks.settings import Settings

Action = Literal["rewritten", "deleted", "new_version", "planned", "gone", "failed"]


@dataclass(frozen=True, slots=True)
class Repair:
    """What reconcile did (or, in a dry run, would do) about one difference."""

    read_model: str
    kind: str
    key: dict[str, str | None]
    action: Action
    version_us: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class ReconcileResult:
    dry_run: bool
    repairs: list[Repair] = field(default_factory=list)
    over_limit: int = 0  # differences left for the next run (max_keys)
    remaining: list[Difference] = field(default_factory=list)  # still different afterwards

    def count(self, action: Action) -> int:
        return sum(1 for r in self.repairs if r.action == action)


def _jsonb_as_text(cur: Any) -> None:
    # jsonb as its text, as Debezium and the snapshot carry it: a bare JSON string decoded by
    # psycopg would be ambiguous to the projection.
    cur.adapters.register_loader("jsonb", TextLoader)


def source_row(
    conn: Connection[Any], read_model: str, source_id: str | None
) -> tuple[str, dict[str, Any]] | None:
    """The write-model row that feeds this read-model row, and its table; None if gone."""
    if source_id is None:
        return None
    for table in catalog.SOURCE_TABLES:
        if read_model not in catalog.read_models_of(table):
            continue
        with conn.cursor(row_factory=dict_row) as cur:
            _jsonb_as_text(cur)
            row = cur.execute(
                sql.SQL("SELECT * FROM {} WHERE id = %s").format(sql.Identifier(table)),
                (uuid.UUID(source_id),),
            ).fetchone()
        if row is not None:
            return table, row
    return None


def new_version(
    app: Connection[Any], table: str, source_id: str, above_us: int | None
) -> dict[str, Any] | None:
    """Give the source row a new version (above ``above_us`` if given) and return it. The app
    role may not write ``updated_at`` (schemas/postgres/0014): ``cqrs_new_version`` does, for
    one row of a source table, and nothing else."""
    with app.transaction(), app.cursor(row_factory=dict_row) as cur:
        _jsonb_as_text(cur)
        bumped = cur.execute(
            "SELECT cqrs_new_version(%s, %s, %s)", (table, uuid.UUID(source_id), above_us)
        ).fetchone()
        if not bumped or not next(iter(bumped.values())):
            return None  # the row is gone
        return cur.execute(
            sql.SQL("SELECT * FROM {} WHERE id = %s").format(sql.Identifier(table)),
            (uuid.UUID(source_id),),
        ).fetchone()


def upserts_of(
    read_model: str | None, table: str, row: Mapping[str, Any], *, exclude: str | None = None
) -> list[Mutation]:
    """The source row projected into one read model (None: every one it feeds but
    ``exclude``), through the one projection module."""
    models = (
        [read_model] if read_model else [m for m in catalog.read_models_of(table) if m != exclude]
    )
    return [m for m in project(change_from_row(table, row), models) if isinstance(m, Upsert)]


def current_differences(
    reader: Connection[Any],
    session: Session,
    settings: Settings,
    tokens: Mapping[str, Collection[int]],
) -> list[Difference]:
    """The differences now in the (smallest) buckets holding these tokens, per read model."""
    cfg = settings.audit
    buckets = Buckets(cfg.max_bucket_bits)
    profile = ensure_profile(
        session, settings.scylla.read_consistency_level, settings.scylla.request_timeout_s
    )
    out: list[Difference] = []
    for read_model, toks in tokens.items():
        if toks:
            found, _, _ = diff_buckets(
                reader,
                session,
                settings.scylla.keyspace,
                shape(read_model),
                buckets,
                {buckets.of(t) for t in toks},
                cfg,
                profile,
            )
            out.extend(found)
    return out


def _ident(d: Difference) -> tuple[str, tuple[str | None, ...]]:
    return d.read_model, tuple(d.key.values())


def token_of(partition_key: uuid.UUID) -> int:
    """Murmur3Partitioner's token of a uuid partition key (the driver's MurmurHash3, with
    the partitioner's normalization of Long.MIN_VALUE)."""
    from cassandra.murmur3 import murmur3

    t = int(murmur3(partition_key.bytes))
    return TOKEN_MAX if t == TOKEN_MIN else t


def reconcile(
    settings: Settings,
    session: Session,
    targets: Iterable[Difference],
    *,
    dry_run: bool = False,
    max_keys: int | None = None,
) -> ReconcileResult:
    """Repair what still differs among ``targets`` (an audit's differences), at most
    ``max_keys`` rows."""
    targets = list(targets)
    tokens: dict[str, set[int]] = {}
    for d in targets:
        tokens.setdefault(d.read_model, set()).add(d.token)
    listed = {_ident(d) for d in targets}
    return _reconcile(settings, session, tokens, lambda d: _ident(d) in listed, dry_run, max_keys)


def reconcile_partitions(
    settings: Settings,
    session: Session,
    partitions: Mapping[str, Collection[uuid.UUID]],
    *,
    dry_run: bool = False,
    max_keys: int | None = None,
) -> ReconcileResult:
    """Repair whatever differs in these partitions (read model -> partition keys)."""
    tokens = {rm: {token_of(k) for k in keys} for rm, keys in partitions.items()}
    wanted = {(rm, str(k)) for rm, keys in partitions.items() for k in keys}

    def in_partitions(d: Difference) -> bool:
        return (d.read_model, d.key[shape(d.read_model).partition_column]) in wanted

    return _reconcile(settings, session, tokens, in_partitions, dry_run, max_keys)


def _reconcile(
    settings: Settings,
    session: Session,
    tokens: Mapping[str, Collection[int]],
    wanted: Callable[[Difference], bool],
    dry_run: bool,
    max_keys: int | None,
) -> ReconcileResult:
    limit = max_keys or settings.audit.reconcile_max_keys
    result = ReconcileResult(dry_run)

    def differences_now() -> list[Difference]:
        return [d for d in current_differences(reader, session, settings, tokens) if wanted(d)]

    with (
        postgres.connect("reader", settings.postgres, autocommit=True) as reader,
        postgres.connect("app", settings.postgres, autocommit=True) as app,
    ):
        now = differences_now()
        result.over_limit = max(0, len(now) - limit)
        now = now[:limit]
        writer = ScyllaWriter(session, settings.scylla)
        repairs: dict[tuple[str, tuple[str | None, ...]], Repair] = {}
        bump: list[Difference] = []
        for d in now:
            repair = _plain_repair(reader, writer, d, dry_run)
            if repair is None:
                bump.append(d)
            else:
                repairs[_ident(d)] = repair
        if dry_run:
            for d in bump:
                repairs[_ident(d)] = Repair(
                    d.read_model,
                    d.kind,
                    d.key,
                    "planned",
                    None,
                    "a newer write shadows it: give the source row a new version",
                )
            result.repairs, result.remaining = list(repairs.values()), now
            return result
        # A row rewritten at its version that still differs is shadowed by a newer write
        # (a tombstone, or cells written above the version).
        still = {_ident(d) for d in differences_now()}
        bump += [
            d
            for d in now
            if d.kind != "extra"
            and _ident(d) in still
            and repairs.get(_ident(d)) is not None
            and repairs[_ident(d)].action == "rewritten"
        ]
        for d in bump:
            repairs[_ident(d)] = _new_version_repair(reader, app, writer, d)
        result.remaining = differences_now()
        failed = {_ident(d) for d in result.remaining}
        result.repairs = [
            Repair(
                r.read_model,
                r.kind,
                r.key,
                "failed",
                r.version_us,
                f"still different after: {r.detail}",
            )
            if ident in failed and r.action != "gone"
            else r
            for ident, r in repairs.items()
        ]
    return result


def _plain_repair(
    reader: Connection[Any], writer: ScyllaWriter, d: Difference, dry_run: bool
) -> Repair | None:
    """Repair one difference the plain way; None if only a new source version can."""
    if d.kind == "extra":
        stamp = d.max_writetime_us or d.writetime_us
        if stamp is None:  # a row with no value cells: shadow what exists until now
            (stamp,) = reader.execute("SELECT cqrs_version_us(clock_timestamp())").fetchone() or (
                0,
            )
        if not dry_run:
            writer.write_batch([Delete(d.read_model, typed_key(d.read_model, d.key), int(stamp))])
        return Repair(
            d.read_model,
            d.kind,
            d.key,
            "planned" if dry_run else "deleted",
            stamp,
            "no source row implies it: deleted at its newest write time",
        )
    found = source_row(reader, d.read_model, d.source_id)
    if found is None:
        return Repair(
            d.read_model,
            d.kind,
            d.key,
            "gone",
            None,
            "the source row was deleted meanwhile; CDC deletes the row",
        )
    table, row = found
    upserts = upserts_of(d.read_model, table, row)
    version = upserts[0].timestamp_us if upserts else None
    newest = d.max_writetime_us or d.writetime_us
    if d.kind == "stale" and newest is not None and version is not None and newest >= version:
        return None
    if not dry_run:
        writer.write_batch(upserts)
    return Repair(
        d.read_model,
        d.kind,
        d.key,
        "planned" if dry_run else "rewritten",
        version,
        f"written from {table} at its version",
    )


def _new_version_repair(
    reader: Connection[Any], app: Connection[Any], writer: ScyllaWriter, d: Difference
) -> Repair:
    found = source_row(reader, d.read_model, d.source_id)
    if found is None or d.source_id is None:
        return Repair(
            d.read_model,
            d.kind,
            d.key,
            "gone",
            None,
            "the source row was deleted meanwhile; CDC deletes the row",
        )
    above = max(filter(None, (d.max_writetime_us, d.writetime_us)), default=None)
    row = new_version(app, found[0], d.source_id, above)
    if row is None:
        return Repair(
            d.read_model,
            d.kind,
            d.key,
            "gone",
            None,
            "the source row was deleted meanwhile; CDC deletes the row",
        )
    # The new version is the source row's in every read model it feeds: write them all,
    # as CDC will.
    upserts = upserts_of(d.read_model, found[0], row)
    writer.write_batch(upserts + upserts_of(None, found[0], row, exclude=d.read_model))
    return Repair(
        d.read_model,
        d.kind,
        d.key,
        "new_version",
        upserts[0].timestamp_us if upserts else None,
        "a newer write shadowed the row: the source row got a new version",
    )


def differences_from(rows: Sequence[Mapping[str, Any]]) -> list[Difference]:
    """Differences as an audit report stores them (``Difference.as_dict``)."""
    return [
        Difference(
            read_model=r["read_model"],
            kind=r["kind"],
            key=dict(r["key"]),
            token=int(r["token"]),
            columns=tuple(r.get("columns") or ()),
            expected_version_us=r.get("expected_version_us"),
            writetime_us=r.get("writetime_us"),
            max_writetime_us=r.get("max_writetime_us"),
        )
        for r in rows
    ]
