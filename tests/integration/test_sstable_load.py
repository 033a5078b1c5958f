"""The sstable load method's writer process against the real Cassandra: what the cluster
holds is checked by CQL, independently of the writer."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cassandra.cluster import Session

from tasks.adapters import scylla
from tasks.adapters.sstable import SSTableWriterProcess
from tasks.adapters.sstable_setup import table_cql
from tasks.core.columnar import arrow_schema, project_arrow
from tasks.core.errors import TransientError
from tasks.settings import get_settings
from tests.integration.conftest import own_keyspace


@pytest.fixture()
def keyspace() -> Iterator[str]:
    with own_keyspace("sstest") as ks:
        yield ks


def chunk_file(tmp_path: Path, table: str, n: int) -> tuple[Path, pa.RecordBatch]:
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        r: dict[str, Any] = {
            "id": uuid.uuid4().bytes,
            "created_at": now - timedelta(seconds=i),
            "updated_at": now + timedelta(microseconds=i),
        }
        if table == "sessions":
            r.update(
                user_id=uuid.uuid4().bytes,
                title=f"t{i}",
                last_message="",
                last_message_at=None if i % 2 else now,
                turn_count=i,
            )
        else:  # steps
            r.update(
                agent_turn_id=uuid.uuid4().bytes,
                session_id=uuid.uuid4().bytes,
                kind="tool",
                payload=json.dumps({"i": i}),
            )
        rows.append(r)
    schema = arrow_schema(table)
    cols = [
        pa.array(
            [r[f.name] for r in rows],
            type=f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type,
        )
        for f in schema
    ]
    batch = pa.RecordBatch.from_arrays(cols, names=schema.names)
    path = tmp_path / f"{table}.parquet"
    pq.write_table(pa.Table.from_batches([batch]), path)
    return path, batch


def stored(session: Session, keyspace: str, batch: pa.RecordBatch, table: str) -> int:
    """How many of the batch's projected rows Cassandra holds, with their versions."""
    found = 0
    for up in project_arrow(table, batch, keyspace):
        for params in up.params:
            key = dict(zip(up.cql.split("(")[1].split(")")[0].split(", "), params, strict=False))
            rm = up.read_model
            where, value = {
                "steps_by_turn": (
                    ("agent_turn_id", "created_at", "created_at_micros", "step_id"),
                    "kind",
                ),
                "recent_conversations": (("user_id", "created_at", "session_id"), "title"),
                "sessions_by_id": (("session_id",), "title"),
            }[rm]
            row = session.execute(
                f"SELECT writetime({value}) AS wt FROM {keyspace}.{rm} WHERE "
                + " AND ".join(f"{c} = %s" for c in where),
                [key[c] for c in where],
            ).one()
            found += row is not None and row.wt == params[-1]
    return found


def test_a_table_the_writer_did_not_know_fails_the_chunk_then_loads(
    keyspace: str, tmp_path: Path
) -> None:
    """SSTableLoader skips SSTables of a table missing from the ring answer it cached and
    still reports success: the writer must report that chunk as failed (never checkpointed),
    and the retry must load it."""
    cfg = get_settings()
    session = scylla.connect(cfg.scylla)
    steps_cql = table_cql(session, keyspace, "steps_by_turn")
    session.execute(f"DROP TABLE {keyspace}.steps_by_turn", timeout=60)
    try:
        with SSTableWriterProcess(session, keyspace, cfg.sstable, cfg.scylla) as writer:
            path, batch = chunk_file(tmp_path, "sessions", 200)
            writer.stream_chunk(path, "sessions", "c1", None)  # the ring is cached by now
            assert stored(session, keyspace, batch, "sessions") == 400
            session.execute(steps_cql, timeout=60)  # created after the writer asked
            session.cluster.refresh_schema_metadata()
            path, batch = chunk_file(tmp_path, "steps", 300)
            with pytest.raises(TransientError, match="SSTables streamed"):
                writer.stream_chunk(path, "steps", "c2", None)
            assert stored(session, keyspace, batch, "steps") == 0
            read, written, report = writer.stream_chunk(path, "steps", "c2", None)
            assert (read, written["steps_by_turn"], report.rows) == (300, 300, 300)
            assert stored(session, keyspace, batch, "steps") == 300
    finally:
        scylla.close(session)
