"""What the CDC run makes of its replication slot, checked at start and at every report
(docs/decisions.md, "The CDC run stops on a slot gap"):

- a gap (the slot missing, or its WAL lost: changes that never reached Kafka) stops the run
  Failed and raises ``cqrs.cdc.slot-gap``: applying what comes next would hide the hole, and
  only a backfill closes it;
- a slot that starts past Debezium's recorded offset *may* have been recreated, but a healthy
  pipeline shows the same when Debezium confirms positions its offsets do not record yet
  (seen after a connector restart), so that is a warning (``suspect``), never a stop;
- the slot's lag (WAL Debezium has not confirmed) over ``max_slot_lag_bytes`` raises
  ``cqrs.cdc.slot-lag`` once per crossing, and ``cqrs.cdc.slot-lag-resolved`` when it is back
  under, so an automation alerts once, not every report.

Pure logic: the flow reads the slot and Debezium's offset and emits what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from tasks.adapters.postgres import SlotStatus, slot_gap_or_suspect
from tasks.core.errors import TerminalError

GAP_EVENT: Final = "cqrs.cdc.slot-gap"
LAG_EVENT: Final = "cqrs.cdc.slot-lag"
LAG_RESOLVED_EVENT: Final = "cqrs.cdc.slot-lag-resolved"
BACKFILL_ADVICE: Final = (
    "changes may be missing from the read models: once the connector streams again "
    "(python -m flows.setup recreates it), run a backfill (python -m flows.backfill), "
    "then start CDC again"
)


class SlotGap(TerminalError):
    """The replication slot lost changes; a retry cannot bring them back."""


@dataclass(frozen=True, slots=True)
class SlotEvent:
    name: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SlotVerdict:
    gap: str | None  # why changes are missing (slot missing or WAL lost), or None
    lag_bytes: int | None  # WAL after the slot's confirmed position
    events: tuple[SlotEvent, ...] = ()
    suspect: str | None = None  # the slot starts past Debezium's offset: maybe recreated


@dataclass(slots=True)
class SlotWatch:
    """Remembers whether the slot was over the lag limit, and whether a gap was reported,
    so that each is raised once, not at every report until the run stops."""

    max_lag_bytes: int
    lagging: bool = False
    gap_reported: bool = False
    suspect_reported: bool = False  # the "maybe recreated" warning, once per run

    def verdict(self, slot: SlotStatus, debezium_lsn: int | None) -> SlotVerdict:
        gap, suspect = slot_gap_or_suspect(slot, debezium_lsn)
        events: list[SlotEvent] = []
        if gap is not None and not self.gap_reported:
            self.gap_reported = True
            events.append(SlotEvent(GAP_EVENT, {"slot": slot.name, "reason": gap}))
        lag = slot.retained_bytes
        if lag is not None:
            over = lag > self.max_lag_bytes
            crossing: Literal["over", "back"] | None = None
            if over != self.lagging:
                crossing = "over" if over else "back"
            self.lagging = over
            if crossing is not None:
                events.append(
                    SlotEvent(
                        LAG_EVENT if crossing == "over" else LAG_RESOLVED_EVENT,
                        {"slot": slot.name, "lag_bytes": lag, "limit_bytes": self.max_lag_bytes},
                    )
                )
        return SlotVerdict(gap, lag, tuple(events), suspect)
