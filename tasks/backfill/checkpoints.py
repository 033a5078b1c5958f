"""Checkpoints of the load stage: one row per (read model, snapshot, chunk) loaded, so a
resume skips finished chunks; and ``truncate_read_models``, which forgets them with the data.

They live in ``<keyspace>.backfill_checkpoints``, next to the data they describe, rather than
in the snapshot folder: they say what one keyspace holds, so loading the same snapshot into
another keyspace or cluster starts from zero as it must; a rebuild (TRUNCATE) forgets them in
the same place; and workers on other machines, or a read-only snapshot store, see the same
state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Final

from cassandra.cluster import Session

from tasks.core.catalog import READ_MODELS
from tasks.core.cql import check_keyspace
from tasks.core.errors import InvalidInput, classify
from tasks.settings import ScyllaSettings

CHECKPOINT_TABLE: Final = "backfill_checkpoints"


class Checkpoints:
    """One row per (read model, snapshot, chunk) loaded. Partitioned by read model so a
    rebuild forgets every snapshot's checkpoints for the models it truncates in one delete.
    ``keyspace`` defaults to the settings' keyspace."""

    def __init__(
        self, session: Session, settings: ScyllaSettings, keyspace: str | None = None
    ) -> None:
        self.session = session
        self.keyspace = check_keyspace(keyspace or settings.keyspace)
        t = f"{self.keyspace}.{CHECKPOINT_TABLE}"
        try:
            self._prepare(session, t, settings.write_consistency_level)
        except Exception as exc:
            raise classify(exc, f"setting up the checkpoints in {t}") from exc

    def _prepare(self, session: Session, t: str, write_consistency: int) -> None:
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {t} (read_model text, snapshot_id text, "
            f"chunk_id text, rows_read bigint, rows_written bigint, seconds double, "
            f"loaded_at timestamp, PRIMARY KEY ((read_model), snapshot_id, chunk_id))",
            timeout=60,
        )
        self._insert = session.prepare(
            f"INSERT INTO {t} (read_model, snapshot_id, chunk_id, rows_read, rows_written, "
            f"seconds, loaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self._select = session.prepare(
            f"SELECT chunk_id, loaded_at FROM {t} WHERE read_model = ? AND snapshot_id = ?"
        )
        self._forget = session.prepare(f"DELETE FROM {t} WHERE read_model = ?")
        for stmt in (self._insert, self._forget):
            # Re-marking a chunk or forgetting twice is harmless: the driver may retry these.
            stmt.consistency_level, stmt.is_idempotent = write_consistency, True

    def loaded(
        self, snapshot_id: str, read_models: Collection[str]
    ) -> dict[str, dict[str, datetime]]:
        """chunk id -> {read model: loaded_at} for the chunks already loaded."""
        out: dict[str, dict[str, datetime]] = {}
        for rm in read_models:
            for row in self.session.execute(self._select, (rm, snapshot_id)):
                out.setdefault(row.chunk_id, {})[rm] = row.loaded_at
        return out

    def mark(
        self, snapshot_id: str, chunk_id: str, written: Counter[str], rows_read: int, seconds: float
    ) -> None:
        now = datetime.now(UTC)
        for rm, n in written.items():
            self.session.execute(
                self._insert, (rm, snapshot_id, chunk_id, rows_read, n, seconds, now)
            )

    def forget(self, read_models: Collection[str]) -> None:
        for rm in read_models:
            self.session.execute(self._forget, (rm,))


def truncate_read_models(
    session: Session,
    settings: ScyllaSettings,
    read_models: Collection[str],
    keyspace: str | None = None,
) -> None:
    """Empty the read models and forget their checkpoints. Checkpoints go first: a crash in
    between then leaves data without checkpoints (a resume reloads it, harmless), never
    checkpoints without data (a resume would skip chunks that are gone)."""
    ks = check_keyspace(keyspace or settings.keyspace)
    if unknown := set(read_models) - set(READ_MODELS):
        raise InvalidInput(f"unknown read model(s) {sorted(unknown)}")
    try:
        Checkpoints(session, settings, ks).forget(read_models)
        for rm in read_models:
            session.execute(f"TRUNCATE {ks}.{rm}", timeout=300)
    except Exception as exc:
        raise classify(exc, f"truncating {sorted(read_models)} in {ks}") from exc
