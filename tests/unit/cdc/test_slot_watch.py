"""tasks.cdc.slot_watch: a slot gap is named with its cause; the lag limit raises one event
per crossing, in each direction."""

from __future__ import annotations

from tasks.adapters.postgres import SlotStatus
from tasks.cdc.slot_watch import GAP_EVENT, LAG_EVENT, LAG_RESOLVED_EVENT, SlotWatch


def slot(lag: int | None = 0, *, exists: bool = True, confirmed: str = "0/100") -> SlotStatus:
    return SlotStatus(
        "cqrs_sync",
        exists,
        active=True,
        wal_status="reserved",
        retained_bytes=lag,
        confirmed_flush_lsn=confirmed,
    )


def names(watch: SlotWatch, s: SlotStatus, lsn: int | None = 0x100) -> list[str]:
    return [e.name for e in watch.verdict(s, lsn).events]


def test_lag_crossings_raise_one_event_each_way() -> None:
    watch = SlotWatch(max_lag_bytes=1000)
    seen = [names(watch, slot(lag)) for lag in (10, 1000, 1001, 5000, None, 999, 10, 2000)]
    assert seen == [[], [], [LAG_EVENT], [], [], [LAG_RESOLVED_EVENT], [], [LAG_EVENT]]
    v = watch.verdict(slot(2500), 0x100)
    assert (v.gap, v.lag_bytes, v.events) == (None, 2500, ())


def test_gaps_are_named_and_raise_the_gap_event() -> None:
    watch = SlotWatch(max_lag_bytes=1 << 30)
    missing = watch.verdict(slot(None, exists=False), 0x100)
    assert missing.gap == "replication slot 'cqrs_sync' does not exist: changes are not captured"
    assert [e.name for e in missing.events] == [GAP_EVENT]
    assert missing.events[0].payload == {"slot": "cqrs_sync", "reason": missing.gap}
    again = watch.verdict(slot(None, exists=False), 0x100)
    assert again.gap == missing.gap and again.events == ()  # raised once per run
    watch = SlotWatch(max_lag_bytes=1 << 30)
    # Maybe recreated: the slot starts past the last LSN Debezium recorded. A healthy
    # pipeline shows that too after a connector restart, so it is a warning, not a gap.
    recreated = watch.verdict(slot(0, confirmed="0/200"), 0x100)
    assert recreated.gap is None and recreated.events == ()
    assert recreated.suspect is not None and "was recreated" in recreated.suspect
    assert names(watch, slot(0, confirmed="0/100"), 0x100) == []
    assert names(watch, slot(0, confirmed="0/200"), None) == []  # Debezium's offset unknown
    lost = SlotStatus("cqrs_sync", True, wal_status="lost", retained_bytes=0)
    assert "lost WAL" in (watch.verdict(lost, None).gap or "")
