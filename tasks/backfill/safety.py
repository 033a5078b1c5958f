"""The checks that keep a backfill from losing or resurrecting changes, run before any work:

- the gap rule (docs/architecture.md, "The gap rule"): CDC must carry every change committed
  after the snapshot, so the replication slot must exist, be streaming, and continue from the
  snapshot it is loaded with;
- the tombstone rule: a snapshot older than the target tables' ``gc_grace_seconds`` could
  bring back rows deleted since, whose tombstones compaction may have purged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cassandra.cluster import Session

from tasks.adapters.postgres import SlotStatus, lsn_to_int, slot_gap
from tasks.backfill.manifest import Manifest
from tasks.core.errors import ConfigurationError


def check_cdc_slot(slot: Mapping[str, Any], slot_name: str) -> None:
    """Refuse a snapshot the CDC slot would not continue from: it must exist and stream."""
    if not slot.get("exists"):
        raise ConfigurationError(
            f"the CDC replication slot {slot_name!r} does not exist: changes committed after "
            f"this snapshot would reach neither the snapshot nor CDC (a silent gap in the read "
            f"models). Create it first (`python -m flows.setup` registers the connector), or "
            f"pass no_cdc=True if CDC is deliberately not running and you accept the gap."
        )
    if not slot.get("active"):
        raise ConfigurationError(
            f"the CDC replication slot {slot_name!r} exists but no connector is streaming from "
            f"it: changes after the snapshot are retained but not applied, and the read models "
            f"will stay stale until CDC runs. Start the Debezium connector, or pass no_cdc=True."
        )


def check_gap(
    slot: SlotStatus,
    debezium_lsn: int | None,
    manifest: Manifest | None,
    warn: Callable[[str], object],
) -> None:
    """The gap rule for this run: with ``manifest`` None a new snapshot will be taken (it
    covers a gap CDC left so far, unless the slot cannot stream at all); an existing snapshot
    must have been taken against this very slot, with no gap since."""
    check_cdc_slot({"exists": slot.exists, "active": slot.active}, slot.name)
    gap = slot_gap(slot, debezium_lsn)
    if manifest is None:
        if slot.wal_status == "lost":
            # CDC cannot stream from this slot at all: nothing would carry later changes.
            raise ConfigurationError(
                f"{gap}: CDC cannot continue from it. Recreate the slot (drop it, then run "
                f"python -m flows.setup), then run this backfill; it covers what was missed."
            )
        if gap:  # a new snapshot holds every change up to now: it is what covers such a gap
            warn(f"{gap}; the new snapshot covers the changes missed so far")
        return
    if not manifest.slot.get("exists"):
        raise ConfigurationError(
            f"snapshot {manifest.snapshot_id} was taken without a CDC slot: changes "
            f"between it and the slot's creation are in neither. Take a new snapshot, or "
            f"pass no_cdc=True."
        )
    if gap:
        raise ConfigurationError(
            f"{gap}: snapshot {manifest.snapshot_id} predates that, so changes between "
            f"it and the slot's recreation are in neither. Take a new snapshot, or pass "
            f"no_cdc=True."
        )
    recorded = manifest.slot.get("confirmed_flush_lsn")
    if (
        recorded
        and slot.confirmed_flush_lsn
        and lsn_to_int(slot.confirmed_flush_lsn) < lsn_to_int(recorded)
    ):
        # A slot's confirmed position never moves back: this is another slot (dropped and
        # recreated, or a restored database), which does not continue from the snapshot.
        raise ConfigurationError(
            f"replication slot {slot.name!r} is at {slot.confirmed_flush_lsn}, behind the "
            f"{recorded} it had confirmed when snapshot {manifest.snapshot_id} was taken: "
            f"it is not the slot the snapshot was taken against, and changes since the "
            f"snapshot may be in neither. Take a new snapshot, or pass no_cdc=True."
        )


def gc_grace_seconds(session: Session, keyspace: str, read_models: Sequence[str]) -> dict[str, int]:
    """gc_grace_seconds of each read-model table, as the target cluster's schema has it."""
    rows = session.execute(
        "SELECT table_name, gc_grace_seconds FROM system_schema.tables WHERE keyspace_name = %s",
        (keyspace,),
    )
    found = {r.table_name: int(r.gc_grace_seconds) for r in rows}
    if missing := [rm for rm in read_models if rm not in found]:
        raise ConfigurationError(
            f"keyspace {keyspace!r} has no table(s) {missing}: apply the "
            f"schema first (`python -m flows.setup`)"
        )
    return {rm: found[rm] for rm in read_models}


def check_snapshot_age(
    taken_at: datetime,
    gc_grace_s: Mapping[str, int],
    *,
    now: datetime | None = None,
    allow: bool = False,
) -> None:
    """Refuse to load a snapshot older than the target tables' ``gc_grace_seconds``.

    A row deleted after the snapshot is kept out of the read model only by its tombstone,
    whose timestamp beats the snapshot row's. Compaction may purge a tombstone once it is
    gc_grace_seconds old, and then loading the snapshot brings the deleted row back.
    """
    if allow or not gc_grace_s:
        return
    age = ((now or datetime.now(UTC)) - taken_at).total_seconds()
    table, grace = min(gc_grace_s.items(), key=lambda kv: kv[1])
    if age > grace:
        raise ConfigurationError(
            f"the snapshot taken at {taken_at.isoformat()} is {age:,.0f} s old, older than "
            f"gc_grace_seconds of {table} ({grace:,} s): tombstones of rows deleted since may "
            f"have been purged, and loading it would bring those rows back. Take a new "
            f"snapshot, or pass allow_old_snapshot=True if no row was deleted since."
        )
