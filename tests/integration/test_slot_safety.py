"""Replication slot safety on the real stack (docs/decisions.md, "The CDC run stops on a slot
gap"):

- heartbeats keep an idle slot advancing: while only another database writes (an idle hour
  of this one, compressed), the WAL the slot retains stays bounded instead of growing with
  what the other database writes;
- a slot that disappears under a running CDC run stops it, Failed, with a message telling
  the operator to backfill, and raises ``cqrs.cdc.slot-gap``; the slot's lag over the limit
  raises ``cqrs.cdc.slot-lag``.

The gap test points a CDC run at a slot of its own (a copy of the pipeline's, then dropped),
so the pipeline's slot, which the other tests need, is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from support.cdc_probe import position_group_at_end
from tasks.adapters import postgres
from tasks.cdc.slot_watch import GAP_EVENT, LAG_EVENT
from tasks.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
OTHER_DB = "cqrs_slot_safety_other"
MIB = 1 << 20
WRITE_S = 60.0


def slot_bytes(conn: psycopg.Connection[Any], slot: str) -> tuple[int, int]:
    """(WAL after the slot's confirmed position, WAL the slot keeps: after restart_lsn)."""
    row = conn.execute(
        """SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = %s""",
        (slot,),
    ).fetchone()
    assert row is not None, f"slot {slot} missing"
    return int(row[0]), int(row[1])


@pytest.fixture
def settings() -> Settings:
    return get_settings()


@pytest.fixture
def other_database(settings: Settings) -> Iterator[str]:
    """A database of its own on the same server: its WAL is the slot's WAL, its changes are
    not the slot's to decode."""
    pg = settings.postgres
    with postgres.connect("admin", pg, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(OTHER_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(OTHER_DB)))
    conninfo = psycopg.conninfo.make_conninfo(pg.conninfo("admin"), dbname=OTHER_DB)
    try:
        yield conninfo
    finally:
        with postgres.connect("admin", pg, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(OTHER_DB))
            )


@pytest.mark.solo  # the slot's bounds hold only without other writers and decoders
def test_heartbeats_keep_an_idle_slot_advancing(settings: Settings, other_database: str) -> None:
    """WAL from another database only, about 3.5 MiB/s for a minute (200 MiB): the
    pipeline's slot confirms past it, because Debezium's heartbeat action query writes to
    this database every 5 s, and releases it. Measured: the unconfirmed WAL stays within
    20-40 MiB, and the WAL the slot keeps on disk (after ``restart_lsn``, which Postgres
    moves at its running-transactions snapshots) is a sawtooth released every ~30 s, then
    under 16 MiB once the writes stop. Without heartbeats both would hold all of it."""
    slot = settings.postgres.slot_name
    samples: list[tuple[float, int, int, int]] = []  # (s, written, unconfirmed, kept)
    with (
        psycopg.connect(other_database, autocommit=True) as other,
        postgres.connect("reader", settings.postgres, autocommit=True) as reader,
    ):
        other.execute("CREATE TABLE filler (id bigserial PRIMARY KEY, pad text)")
        start = other.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert start is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < WRITE_S:
            other.execute(
                "INSERT INTO filler (pad) SELECT repeat('x', 900) FROM generate_series(1, 3500)"
            )
            row = other.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", start
            ).fetchone()
            assert row is not None
            samples.append((time.monotonic() - t0, int(row[0]), *slot_bytes(reader, slot)))
            time.sleep(1)
        written = samples[-1][1]
        deadline = time.monotonic() + 60
        final = slot_bytes(reader, slot)
        while max(final) > 16 * MIB and time.monotonic() < deadline:
            time.sleep(1)
            final = slot_bytes(reader, slot)

    def table() -> str:
        return "\n".join(
            f"{t:5.1f} s {w / MIB:6.0f} {u / MIB:6.0f} {k / MIB:6.0f}" for t, w, u, k in samples
        )

    assert written >= 128 * MIB, table()
    assert max(u for _, _, u, _ in samples) <= 48 * MIB, f"unconfirmed WAL grew:\n{table()}"
    released = any(a[3] - b[3] >= 32 * MIB for a, b in pairwise(samples))
    assert released, f"the kept WAL was never released while written:\n{table()}"
    assert max(k for _, _, _, k in samples) <= written * 3 / 4, table()
    assert max(final) <= 16 * MIB, f"still kept {max(final) / MIB:.0f} MiB:\n{table()}"


def read_events(name: str, since: float, resource_prefix: str = "cqrs-sync.cdc.") -> list[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        resp = client.request(
            "POST",
            "/events/filter",
            json={
                "filter": {
                    "event": {"name": [name]},
                    "occurred": {
                        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 1))
                    },
                },
                "limit": 50,
            },
        )
        resp.raise_for_status()
        return [
            e
            for e in resp.json()["events"]
            if e["resource"]["prefect.resource.id"].startswith(resource_prefix)
        ]


def test_a_slot_dropped_under_a_running_cdc_run_stops_it_failed(
    settings: Settings, tmp_path: Path
) -> None:
    slot = f"cqrs_test_gap_{uuid.uuid4().hex[:8]}"
    with postgres.connect("admin", settings.postgres, autocommit=True) as admin:
        # A copy of the pipeline's slot: it starts where that one is, so not past
        # Debezium's offset (a new slot would, and read as recreated).
        admin.execute(
            "SELECT pg_copy_logical_replication_slot(%s, %s)",
            (settings.postgres.slot_name, slot),
        )
    log = tmp_path / "cdc.log"
    since = time.time()
    env = {
        **os.environ,
        "PREFECT_LOGGING_LEVEL": "INFO",
        "CQRS_PG_SLOT_NAME": slot,
        # Any unconfirmed byte is over the limit: the lag event is raised at the first report.
        "CQRS_AUDIT_MAX_SLOT_LAG_BYTES": "0",
    }
    group = f"slot-safety-{uuid.uuid4().hex[:8]}"
    # At the topics' end: this run is about the slot, not about applying old changes.
    position_group_at_end(settings.kafka.model_copy(update={"consumer_group": group}))
    argv = ["--consumer-group", group, "--report-interval-s", "1", "--max-seconds", "120"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cdc", *argv],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "slot lag" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "slot lag" in log.read_text(), log.read_text()[-3000:]
        with postgres.connect("admin", settings.postgres, autocommit=True) as admin:
            # Writes after the slot's creation: the dropped slot had changes to lose.
            admin.execute("UPDATE cqrs_heartbeat SET beat_at = now() WHERE id = 1")
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        with postgres.connect("admin", settings.postgres, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )
    out = log.read_text()
    assert code == 1, out[-3000:]
    assert f"replication slot '{slot}' does not exist" in out
    assert "ended FAILED" in out and "run a backfill" in out, out[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gaps = [e for e in read_events(GAP_EVENT, since) if e["payload"].get("slot") == slot]
        lags = [e for e in read_events(LAG_EVENT, since) if e["payload"].get("slot") == slot]
        if gaps and lags:
            break
        time.sleep(1)
    assert len(gaps) == 1, gaps
    assert "does not exist" in gaps[0]["payload"]["reason"]
    assert len(lags) == 1 and lags[0]["payload"]["limit_bytes"] == 0, lags
